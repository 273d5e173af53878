"""Priority dispatching rules, computed on the dispatcher's candidates (one source of the schedule maths).

Each rule gives a key per candidate, lower = dispatched first; ties go to the lowest job index (documented
because rule makespans on Taillard's instances move by several percent with the tie-break):
- SPT: shortest processing time;
- MWKR: most work remaining in the job (this operation included);
- FDD/MWKR: smallest ratio of flow due date (job work up to and including this operation) to work remaining;
- MOPNR: most operations remaining in the job (this operation included).
"""

from __future__ import annotations

import numpy as np

from shopfloor.dispatch import Candidates, Dispatcher
from shopfloor.instance import JobShopInstance


def _spt(c: Candidates) -> np.ndarray:
    return c.duration.astype(float)


def _mwkr(c: Candidates) -> np.ndarray:
    return -c.remaining_work.astype(float)


def fdd_over_mwkr(c: Candidates) -> np.ndarray:
    """Flow due date (job work up to and including the operation) over work remaining (operation included)."""
    return (c.done_work + c.duration) / np.maximum(c.remaining_work, 1)


def _mopnr(c: Candidates) -> np.ndarray:
    return -c.remaining_ops.astype(float)


RULES = {"SPT": _spt, "MWKR": _mwkr, "FDD/MWKR": fdd_over_mwkr, "MOPNR": _mopnr}


def choose(rule: str, d: Dispatcher) -> int:
    """The eligible job the rule dispatches next."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {tuple(RULES)}")
    key = np.where(d.eligible, RULES[rule](d.candidates), np.inf)
    return int(np.argmin(key))  # argmin returns the first minimum: lowest job index on ties


def run_rule(instance: JobShopInstance, rule: str, scheme: str = "active") -> tuple[int, np.ndarray]:
    """(makespan, start times (n_jobs, n_ops)) of the schedule the rule builds under the scheme."""
    d = Dispatcher(instance, scheme)
    while not d.done:
        d.step(choose(rule, d))
    return d.makespan, d.start.copy()
