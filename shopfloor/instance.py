"""A job-shop instance: every job is a fixed route of operations, each on one machine for a fixed time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # identity equality: == on numpy fields would be ambiguous
class JobShopInstance:
    """`machines[j, k]` and `durations[j, k]` describe the k-th operation of job j (route order).

    Every job has the same number of operations (Taillard's instances and our generators both satisfy
    this); a machine may appear more than once in a route. Durations are positive integers so that start
    times, makespans and the dispatcher's comparisons stay exact.
    """

    machines: np.ndarray
    durations: np.ndarray
    n_machines: int
    name: str = ""

    def __post_init__(self):
        m = np.asarray(self.machines)
        d = np.asarray(self.durations)
        if m.ndim != 2 or m.shape != d.shape or m.size == 0:
            raise ValueError(f"{self.name or 'instance'}: machines {m.shape} and durations {d.shape} must be "
                             "the same non-empty (jobs, operations) shape")
        if not np.issubdtype(m.dtype, np.integer) or m.min() < 0 or m.max() >= self.n_machines:
            raise ValueError(f"{self.name or 'instance'}: machine ids must be integers in [0, {self.n_machines})")
        if not np.all(np.isfinite(d)) or np.any(d != np.round(d)) or d.min() < 1:
            raise ValueError(f"{self.name or 'instance'}: durations must be finite integers >= 1")
        m = m.astype(np.int64)
        d = d.astype(np.int64)
        m.setflags(write=False)
        d.setflags(write=False)
        object.__setattr__(self, "machines", m)
        object.__setattr__(self, "durations", d)

    @property
    def n_jobs(self) -> int:
        return self.machines.shape[0]

    @property
    def n_ops(self) -> int:
        """Operations per job."""
        return self.machines.shape[1]

    def trivial_lower_bound(self) -> int:
        """max(longest job, busiest machine): no schedule can finish earlier."""
        machine_load = np.bincount(self.machines.ravel(), weights=self.durations.ravel(), minlength=self.n_machines)
        return int(max(self.durations.sum(axis=1).max(), machine_load.max()))
