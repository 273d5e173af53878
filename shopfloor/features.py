"""Per-operation features of the candidates, for a size-agnostic policy that scores each one.

One row per job (its next operation). Times are divided by the instance's mean job length (mean processing
time x operations per job), so shops of any size and time scale give features of the same order; counts are
fractions. The rules' priorities are all functions of these columns (SPT: duration, MWKR: remaining_work,
MOPNR: remaining_ops, FDD/MWKR: fdd_over_mwkr), so a policy can at least imitate every rule.
"""

from __future__ import annotations

import numpy as np

from shopfloor.dispatch import Dispatcher
from shopfloor.rules import fdd_over_mwkr

FEATURE_NAMES = (
    "duration",  # processing time of the operation
    "start_delay",  # earliest start minus the earliest start among the candidates
    "job_wait",  # earliest start minus the job's ready time (machine-induced waiting)
    "remaining_work",  # work left in the job, this operation included
    "remaining_ops",  # fraction of the job's operations left, this one included
    "machine_load",  # unscheduled work left on the operation's machine, this operation included
    "fdd_over_mwkr",  # flow due date (job work up to and including this op) / work remaining
    "criticality",  # (earliest start + remaining work) / current makespan lower bound
    "progress",  # fraction of all operations already scheduled (same for every row)
)


def candidate_features(d: Dispatcher) -> np.ndarray:
    """float32 (n_jobs, len(FEATURE_NAMES)); rows of finished jobs are zero."""
    inst, c = d.instance, d.candidates
    scale = float(inst.durations.mean()) * inst.n_ops
    live = c.unfinished
    t0 = c.est[live].min() if live.any() else 0
    cols = [
        c.duration / scale,
        (c.est - t0) / scale,
        (c.est - d.job_ready) / scale,
        c.remaining_work / scale,
        c.remaining_ops / inst.n_ops,
        c.machine_load / scale,
        fdd_over_mwkr(c),
        (c.est + c.remaining_work) / max(d.lower_bound(), 1),
        np.full(inst.n_jobs, d.steps / (inst.n_jobs * inst.n_ops)),
    ]
    out = np.stack(cols, axis=1).astype(np.float32)
    out[~live] = 0.0
    return out
