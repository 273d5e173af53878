"""The dispatching core: state, eligible operations, one decision per step, a makespan-tied reward.

Each decision picks a job; the job's next unscheduled operation is placed on its machine. At most one
operation per job can be a candidate (routes are sequences), so the action space is "a job index" and the
eligible set is a boolean mask over jobs. Which candidates are eligible, and where the chosen operation is
placed, is the schedule-generation scheme (a rule's makespan depends on it as much as on the rule):

- "active" (default): Giffler-Thompson. Among the candidates take the one with the earliest completion
  time C*; its machine M*. Eligible: candidates on M* that can start before C*. Each operation is appended
  to its machine at its earliest start. Every schedule built is active (no operation can start earlier
  without delaying another) and the set of reachable schedules contains an optimal one.
- "non_delay": eligible are the candidates that can start at the earliest possible start time t*; no
  machine is left idle while an operation could run on it. Reachable schedules may all be suboptimal.
- "semi_active": every job's next operation is eligible and is appended to its machine at its earliest
  start. All semi-active schedules are reachable; a rule that ignores start times (SPT) can build a poor one.
- "insertion": every job's next operation is eligible and is placed in the earliest idle gap of its machine
  that fits after the job's previous operation (left shift), as in L2D (Zhang et al., NeurIPS 2020).
  Schedules are active; whether the set of reachable ones contains an optimum is not claimed.

Reward: with LB(s) = max(max_j job_ready_j + remaining_work_j, max_m machine_end_m + remaining_load_m), a
lower bound on the makespan of any completion of the partial schedule s, the reward of a step is
LB(s_t) - LB(s_t+1). At the end LB = makespan, so an episode's return is LB(s_0) - makespan exactly, where
LB(s_0) = instance.trivial_lower_bound() is a constant of the instance: maximising the return minimises the
makespan. With append-only schemes LB never decreases (rewards <= 0); under "insertion" an operation put
into an earlier gap can lower the machine term, so a step's reward can be positive (the sum still telescopes).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from shopfloor.instance import JobShopInstance

SCHEMES = ("active", "non_delay", "semi_active", "insertion")


@dataclass(frozen=True)
class Candidates:
    """The next operation of every job (row j = job j); rows of finished jobs hold op = n_ops, unfinished=False."""

    unfinished: np.ndarray  # bool (n_jobs,)
    op: np.ndarray  # index of the operation in its job's route
    machine: np.ndarray
    duration: np.ndarray
    est: np.ndarray  # earliest start under the scheme's placement
    remaining_work: np.ndarray  # this operation and the rest of its job
    remaining_ops: np.ndarray  # this operation and the rest of its job
    done_work: np.ndarray  # work of the job's already scheduled operations
    machine_load: np.ndarray  # unscheduled work on this operation's machine, this operation included


class Dispatcher:
    """Builds one schedule of one instance, one operation per `step`. numpy only; no gymnasium."""

    def __init__(self, instance: JobShopInstance, scheme: str = "active"):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r}; expected one of {SCHEMES}")
        self.instance = instance
        self.scheme = scheme
        d = instance.durations
        # suffix[j, k] = work of operations k.. of job j (suffix[j, n_ops] = 0)
        self._suffix = np.concatenate([np.cumsum(d[:, ::-1], axis=1)[:, ::-1], np.zeros((d.shape[0], 1), np.int64)],
                                      axis=1)
        self.reset()

    def reset(self) -> None:
        inst = self.instance
        n, k = inst.n_jobs, inst.n_ops
        self.next_op = np.zeros(n, np.int64)
        self.job_ready = np.zeros(n, np.int64)
        self.machine_end = np.zeros(inst.n_machines, np.int64)
        self.machine_load = np.bincount(inst.machines.ravel(), weights=inst.durations.ravel(),
                                        minlength=inst.n_machines).astype(np.int64)
        self.start = np.full((n, k), -1, np.int64)
        self._gaps = [[] for _ in range(inst.n_machines)]  # sorted (start, end) per machine, "insertion" only
        self.steps = 0
        self._lb = self.lower_bound()
        self._refresh()

    # --- what the policy sees -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.steps == self.instance.n_jobs * self.instance.n_ops

    @property
    def makespan(self) -> int:
        if not self.done:
            raise RuntimeError("makespan asked before the schedule is complete")
        return int(self.job_ready.max())

    def lower_bound(self) -> int:
        job_term = (self.job_ready + self._suffix[np.arange(self.instance.n_jobs), self.next_op]).max()
        return int(max(job_term, (self.machine_end + self.machine_load).max()))

    @property
    def candidates(self) -> Candidates:
        return self._cand

    @property
    def eligible(self) -> np.ndarray:
        """bool (n_jobs,): the jobs whose next operation may be dispatched now."""
        return self._eligible

    # --- one decision ---------------------------------------------------------------------------------
    def step(self, job: int) -> int:
        """Dispatch the next operation of `job`; returns the reward LB(before) - LB(after)."""
        if not (0 <= job < self.instance.n_jobs) or not self._eligible[job]:
            raise ValueError(f"job {job} is not eligible (eligible: {np.flatnonzero(self._eligible).tolist()})")
        c = self._cand
        k, m, p, s = int(c.op[job]), int(c.machine[job]), int(c.duration[job]), int(c.est[job])
        self.start[job, k] = s
        self.job_ready[job] = s + p
        self.machine_end[m] = max(self.machine_end[m], s + p)
        self.machine_load[m] -= p
        if self.scheme == "insertion":
            bisect.insort(self._gaps[m], (s, s + p))
        self.next_op[job] += 1
        self.steps += 1
        lb = self.lower_bound()
        reward, self._lb = self._lb - lb, lb
        self._refresh()
        return reward

    # --- scheme -----------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        inst = self.instance
        n, n_ops = inst.n_jobs, inst.n_ops
        unfinished = self.next_op < n_ops
        op = self.next_op
        k = np.minimum(op, n_ops - 1)  # finished jobs: any valid index, masked below
        rows = np.arange(n)
        machine = np.where(unfinished, inst.machines[rows, k], 0)
        duration = np.where(unfinished, inst.durations[rows, k], 0)
        if self.scheme == "insertion":
            est = np.array([self._insertion_start(int(machine[j]), int(duration[j]), int(self.job_ready[j]))
                            if unfinished[j] else 0 for j in range(n)], np.int64)
        else:
            est = np.where(unfinished, np.maximum(self.job_ready, self.machine_end[machine]), 0)
        remaining_work = self._suffix[rows, op]
        self._cand = Candidates(
            unfinished=unfinished, op=op.copy(), machine=machine, duration=duration, est=est,
            remaining_work=remaining_work, remaining_ops=n_ops - op,
            done_work=self._suffix[:, 0] - remaining_work,
            machine_load=np.where(unfinished, self.machine_load[machine], 0),
        )
        self._eligible = self._eligible_mask(unfinished, machine, duration, est)

    def _eligible_mask(self, unfinished, machine, duration, est) -> np.ndarray:
        if not unfinished.any() or self.scheme in ("semi_active", "insertion"):
            return unfinished.copy()
        if self.scheme == "non_delay":
            t_star = est[unfinished].min()
            return unfinished & (est == t_star)
        # active (Giffler-Thompson): the earliest-completing candidate fixes the machine; ties -> lowest job
        ect = np.where(unfinished, est + duration, np.iinfo(np.int64).max)
        first = int(np.argmin(ect))
        return unfinished & (machine == machine[first]) & (est < ect[first])

    def _insertion_start(self, machine: int, duration: int, ready: int) -> int:
        prev_end = 0
        for s, e in self._gaps[machine]:
            if max(ready, prev_end) + duration <= s:
                return max(ready, prev_end)
            prev_end = e
        return max(ready, prev_end)
