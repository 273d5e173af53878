"""agent.yaml `predictions:` (issue 13): interval coverage, and the spec limits that raise alarms.
Kept out of config.py so the prediction features own their schema; config.py only includes it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class Spec:
    lower: Optional[float] = None  # a part below this (target units) is out of spec; None: no lower limit
    upper: Optional[float] = None


@dataclass
class Predictions:
    coverage: float = 0.9  # regression intervals hold the measured value, classification sets the true class, for this share of parts
    aci_gamma: float = 0.005  # adaptive conformal inference step: how fast a context's intervals react
    spec: Optional[Spec] = None  # the target's spec limits; None: no p_out_of_spec, no alarms
    alarm_threshold: float = 0.5  # publish on `alarms` when p_out_of_spec reaches this


def check(p: Predictions, need) -> None:
    need(0.5 <= p.coverage < 1.0, "predictions.coverage", f"must be in [0.5, 1), got {p.coverage}")
    need(0.0 < p.aci_gamma <= 0.5, "predictions.aci_gamma", f"must be in (0, 0.5], got {p.aci_gamma}")
    need(0.0 < p.alarm_threshold < 1.0, "predictions.alarm_threshold", f"must be in (0, 1), got {p.alarm_threshold}")
    if p.spec is not None:
        lo, hi = p.spec.lower, p.spec.upper
        need(lo is not None or hi is not None, "predictions.spec", "give lower, upper or both")
        need(all(v is None or math.isfinite(v) for v in (lo, hi)), "predictions.spec", "limits must be finite")
        need(lo is None or hi is None or lo < hi, "predictions.spec", f"lower ({lo}) must be below upper ({hi})")
