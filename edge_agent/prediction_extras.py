"""What a prediction carries beyond the value, for a quality engineer: its interval, the probability
that the part is out of spec, and an alarm when that probability reaches the configured threshold
(issue 13 parts 2-3); for classification, calibrated probabilities and a prediction set. The worker
calls `calibrate` on the graph's output, `fields` per prediction, `observe` per label and publishes
`take_alarms()` after its durable commit; the maths lives in intervals.py and calibration.py."""

from __future__ import annotations

import collections
import json
import math
import time

import numpy as np

from .intervals import Intervals
from .prediction_config import Predictions


def _num(v: float) -> str:
    return repr(round(v, 6)) if math.isfinite(v) else "null"


MAX_ALARMS = 10_000  # alarms waiting for the worker's next publish (it drains them every batch)


class Extras:
    def __init__(self, cfg: Predictions, max_pending: int):
        self.cfg = cfg
        self.intervals = Intervals(cfg.coverage, cfg.aci_gamma, max_pending=max_pending)
        self.alarms: collections.deque[str] = collections.deque(maxlen=MAX_ALARMS)

    def take_alarms(self) -> list[str]:
        out = list(self.alarms)
        self.alarms.clear()
        return out

    @staticmethod
    def _calibration(model):
        return getattr(getattr(model, "predictors", None), "calibration", None)

    def calibrate(self, model, source: str, k: int, y):
        """The graph's class probabilities [N, C] with the bundle's temperature for this predictor and K
        (unchanged for regression or a bundle without calibration)."""
        cal = self._calibration(model)
        if model.task_kind != "classification" or cal is None:
            return y
        return cal.probabilities(source, 0 if source == "meta_init" else k, y)

    def _set(self, model, source: str, k: int, probs) -> str:
        cal = self._calibration(model)
        if cal is None or not np.all(np.isfinite(probs)):
            return ""
        members = cal.prediction_set(source, k, np.asarray(probs, float), self.cfg.coverage)
        names = model.class_names
        return f',"prediction_set":{json.dumps([names[i] for i in members])},"coverage":{self.cfg.coverage}'

    def fields(self, model, ctx: str, sid: str, source: str, k: int, y_hat) -> str:
        """A JSON fragment (leading comma) to append to the prediction; '' when there is nothing to add."""
        if model.task_kind != "regression":
            return self._set(model, source, 0 if source == "meta_init" else k, y_hat)
        k = 0 if source == "meta_init" else k
        y_hat = float(y_hat)
        iv = self.intervals.interval(model, ctx, sid, source, k, y_hat)
        if iv is None:
            return ""
        out = f',"interval":[{_num(iv[0])},{_num(iv[1])}],"coverage":{self.cfg.coverage}'
        spec = self.cfg.spec
        if spec is not None:
            p = self.intervals.p_outside(model, ctx, source, k, y_hat, spec.lower, spec.upper)
            out += f',"p_out_of_spec":{_num(p)}'
            if p >= self.cfg.alarm_threshold:
                self.alarms.append(json.dumps({
                    "id": sid, "ts": time.time(), "context": ctx, "model_version": model.version,
                    "p_out_of_spec": round(p, 6), "threshold": self.cfg.alarm_threshold,
                    "spec": {"lower": spec.lower, "upper": spec.upper},
                    "evidence": {"prediction": round(y_hat, 6), "interval": [round(iv[0], 6), round(iv[1], 6)],
                                 "coverage": self.cfg.coverage, "source": source, "n_support": k},
                }))
        return out

    def observe(self, sid: str, y) -> None:
        if isinstance(y, (int, float)) and not isinstance(y, bool):
            self.intervals.observe(sid, float(y))
