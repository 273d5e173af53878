"""Prediction intervals for regression that keep their coverage (issue 13 part 2).

An interval [prediction - h, prediction + h] claims: "the measured value will lie in here for
`coverage` of the parts" (default 90 %).

- Before a line has evidence of its own, h is the quantile of the predictor's absolute error measured
  on the workstation's validation lines, for the predictor that answers (population / adapted on K
  labels / bare initialisation): manifest `predictors.expected_error.abs_residual_quantiles`.
- Each label that arrives for a part whose prediction was made before the label was known (an
  *honest* residual) tells whether that part's interval held. Adaptive conformal inference (Gibbs &
  Candes, NeurIPS 2021) then moves the level the quantile is read at: alpha <- alpha + gamma (target
  - miss), per context. A line whose errors are larger than the validation lines' (drift, an odd
  product) widens its intervals until they hold again; one that is easier narrows them. Over any long
  stretch the miss rate is within (max alpha step)/(gamma T) of 1 - coverage, whatever the data do.

The quantile function is read by linear interpolation between the shipped levels; below the lowest
level the width goes to 0, above the highest it is extended linearly in -log(1 - level) (an
exponential tail), so a context that keeps missing still gets wider intervals, never infinite ones.
Torch-free; the per-context state and the remembered predictions are bounded (oldest dropped).
"""

from __future__ import annotations

import collections
import math

import numpy as np


class Quantiles:
    """|residual| quantiles per predictor ("population", "adapted": [K][level]) from the manifest."""

    def __init__(self, levels, adapted, population=None):
        self.levels = np.asarray(levels, float)
        self.adapted = np.asarray(adapted, float)
        self.population = None if population is None else np.asarray(population, float)
        if (self.levels.ndim != 1 or self.levels.size < 2 or np.any(np.diff(self.levels) <= 0)
                or self.levels[0] <= 0 or self.levels[-1] >= 1):
            raise ValueError("levels must be increasing, inside (0, 1)")
        if self.adapted.ndim != 2 or self.adapted.shape[1] != self.levels.size:
            raise ValueError("adapted must be [K][levels]")
        if self.population is not None and self.population.shape != self.levels.shape:
            raise ValueError("population must have one value per level")
        for a in (self.adapted, self.population):
            if a is not None and (not np.all(np.isfinite(a)) or np.any(a < 0)):
                raise ValueError("quantiles must be finite and >= 0")
        self._tail = -np.log1p(-self.levels)

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Quantiles | None":
        q = ((manifest.get("predictors") or {}).get("expected_error") or {}).get("abs_residual_quantiles")
        if q is None:
            return None
        return cls(q["levels"], q["adapted"], q.get("population"))

    def half_width(self, source: str, k: int, level: float) -> float:
        row = self.population if source == "population" and self.population is not None else \
            self.adapted[min(max(int(k), 0), len(self.adapted) - 1)]
        if level <= self.levels[0]:
            return float(row[0] * max(level, 0.0) / self.levels[0])
        if level <= self.levels[-1]:
            return float(np.interp(level, self.levels, row))
        # beyond the last level: linear in -log(1 - level), slope of the last two levels
        t = -math.log1p(-min(level, 1 - 1e-12))
        slope = (row[-1] - row[-2]) / (self._tail[-1] - self._tail[-2])
        return float(row[-1] + max(slope, 0.0) * (t - self._tail[-1]))


    def exceed(self, source: str, k: int, d: float) -> float:
        """P(|residual| > d): the inverse of half_width, with the same tails."""
        row = self.population if source == "population" and self.population is not None else \
            self.adapted[min(max(int(k), 0), len(self.adapted) - 1)]
        if d <= 0:
            return 1.0
        if d <= row[0]:
            return float(1.0 - self.levels[0] * d / row[0]) if row[0] > 0 else 1.0 - float(self.levels[0])
        if d <= row[-1]:
            return float(1.0 - np.interp(d, row, self.levels))
        slope = (row[-1] - row[-2]) / (self._tail[-1] - self._tail[-2])
        if slope <= 0:
            return 0.0
        return float(math.exp(-(self._tail[-1] + (d - row[-1]) / slope)))


class Intervals:
    """Per-context adaptive conformal inference over the manifest's quantiles."""

    def __init__(self, coverage: float = 0.9, gamma: float = 0.005, max_contexts: int = 1024,
                 max_pending: int = 10_000):
        self.coverage = float(coverage)
        self.gamma = float(gamma)
        self._alpha: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._pending: collections.OrderedDict[str, tuple[str, float, float]] = collections.OrderedDict()
        self.max_contexts, self.max_pending = max_contexts, max_pending

    @staticmethod
    def _quantiles(model) -> "Quantiles | None":
        # Validated when the bundle was loaded (predictors.py): a malformed section refuses the bundle.
        preds = getattr(model, "predictors", None)
        return getattr(preds, "quantiles", None)

    def alpha(self, ctx: str) -> float:
        return self._alpha.get(ctx, 1.0 - self.coverage)

    def interval(self, model, ctx: str, sid: str, source: str, k: int, y_hat: float) -> tuple[float, float] | None:
        """The interval for this prediction (None: the bundle has no quantiles); remembered for its label."""
        q = self._quantiles(model)
        if q is None or not math.isfinite(y_hat):
            return None
        h = q.half_width(source, k, 1.0 - self.alpha(ctx))
        lo, hi = y_hat - h, y_hat + h
        self._pending[sid] = (ctx, lo, hi)
        if len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)
        return lo, hi

    def p_outside(self, model, ctx: str, source: str, k: int, y_hat: float, lower, upper) -> float | None:
        """P(measured value < lower or > upper) for this prediction: the residual's distribution from
        the manifest (taken symmetric about the prediction), widened or narrowed by the context's
        adaptive-conformal correction (the ratio of its current half-width to the nominal one)."""
        q = self._quantiles(model)
        if q is None or not math.isfinite(y_hat):
            return None
        nominal = q.half_width(source, k, self.coverage)
        scale = q.half_width(source, k, 1.0 - self.alpha(ctx)) / nominal if nominal > 0 else 1.0
        scale = max(scale, 1e-6)

        def tail(limit_distance: float) -> float:  # P(y beyond a limit at this signed distance from y_hat)
            if limit_distance >= 0:
                return 0.5 * q.exceed(source, k, limit_distance / scale)
            return 1.0 - 0.5 * q.exceed(source, k, -limit_distance / scale)

        p = 0.0
        if upper is not None:
            p += tail(upper - y_hat)
        if lower is not None:
            p += tail(y_hat - lower)
        return min(max(p, 0.0), 1.0)

    def observe(self, sid: str, y: float) -> bool | None:
        """A label arrived: did its (honest) interval hold? Updates the context's level. None: no
        interval was made for it before (inline label, restart, evicted)."""
        got = self._pending.pop(sid, None)
        if got is None:
            return None
        ctx, lo, hi = got
        miss = not (lo <= float(y) <= hi)
        a = self.alpha(ctx) + self.gamma * ((1.0 - self.coverage) - float(miss))
        self._alpha[ctx] = a
        self._alpha.move_to_end(ctx)
        if len(self._alpha) > self.max_contexts:
            self._alpha.popitem(last=False)
        return not miss
