"""What a prediction carries beyond the value, for a quality engineer: its interval and the share of
it that lies out of spec (issue 13 parts 2-3). The worker calls `fields` per prediction and `observe`
per label; the maths lives in intervals.py. Regression only (classification has neither yet)."""

from __future__ import annotations

import math

from .intervals import Intervals
from .prediction_config import Predictions


def _num(v: float) -> str:
    return repr(round(v, 6)) if math.isfinite(v) else "null"


class Extras:
    def __init__(self, cfg: Predictions, max_pending: int):
        self.cfg = cfg
        self.intervals = Intervals(cfg.coverage, cfg.aci_gamma, max_pending=max_pending)

    def fields(self, model, ctx: str, sid: str, source: str, k: int, y_hat: float) -> str:
        """A JSON fragment (leading comma) to append to the prediction; '' when there is nothing to add."""
        if model.task_kind != "regression":
            return ""
        iv = self.intervals.interval(model, ctx, sid, source, 0 if source == "meta_init" else k, float(y_hat))
        if iv is None:
            return ""
        return f',"interval":[{_num(iv[0])},{_num(iv[1])}],"coverage":{self.cfg.coverage}'

    def observe(self, sid: str, y) -> None:
        if isinstance(y, (int, float)) and not isinstance(y, bool):
            self.intervals.observe(sid, float(y))
