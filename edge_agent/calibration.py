"""Calibrated class probabilities and conformal prediction sets for classification (issue 13 part 2).

- Temperature: predict.onnx returns softmax probabilities p. Dividing the log-probabilities by a
  temperature T and renormalising is softmax(logits / T) exactly (the log-sum-exp cancels), so the
  device can calibrate the graph's output without a second graph. T is fitted at export per predictor
  and per number of labels K (a model adapted on 1 label is over-confident in a different way than one
  adapted on 20) by minimising the negative log-likelihood on validation machines (export/population.py).
- Prediction set: split conformal with the score s = 1 - (calibrated probability of the true class).
  The manifest ships the quantiles of s on other validation machines at a grid of levels; the set at
  coverage c holds every class whose score is at most the level-c quantile, so it contains the true
  class for c of the parts (marginally over machines like the validation ones). The most probable class
  is always in it (a set is never empty; this only raises coverage).

One source of truth: export fits with `apply_temperature` and `nll` from here; torch-free (numpy).
"""

from __future__ import annotations

import numpy as np

TINY = 1e-38  # float32 softmax underflows to 0; log(0) would make one class impossible at any T


def apply_temperature(probs: np.ndarray, t: float) -> np.ndarray:
    """softmax(log(probs) / t) over the last axis, float64."""
    z = np.log(np.maximum(np.asarray(probs, np.float64), TINY)) / float(t)
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the integer labels y under probs [N, C]."""
    p = np.asarray(probs, np.float64)[np.arange(len(y)), np.asarray(y)]
    return float(-np.log(np.maximum(p, TINY)).mean())


class Calibration:
    """Per-predictor temperatures and conformal score quantiles from manifest
    `predictors.expected_error.calibration` (docs/bundle.md)."""

    def __init__(self, temperature: dict, score_quantiles: dict):
        self.t_adapted = np.asarray(temperature["adapted"], float)
        self.t_population = None if temperature.get("population") is None else float(temperature["population"])
        self.levels = np.asarray(score_quantiles["levels"], float)
        self.q_adapted = np.asarray(score_quantiles["adapted"], float)
        pop = score_quantiles.get("population")
        self.q_population = None if pop is None else np.asarray(pop, float)
        if self.t_adapted.ndim != 1 or self.t_adapted.size < 1:
            raise ValueError("temperature.adapted must be a non-empty list (one per K)")
        temps = list(self.t_adapted) + ([self.t_population] if self.t_population is not None else [])
        if not all(np.isfinite(t) and t > 0 for t in temps):
            raise ValueError("temperatures must be finite and > 0")
        if (self.levels.ndim != 1 or self.levels.size < 2 or np.any(np.diff(self.levels) <= 0)
                or self.levels[0] <= 0 or self.levels[-1] >= 1):
            raise ValueError("score_quantiles.levels must be increasing, inside (0, 1)")
        if self.q_adapted.shape != (self.t_adapted.size, self.levels.size):
            raise ValueError("score_quantiles.adapted must be [K][levels], one row per temperature")
        if self.q_population is not None and self.q_population.shape != self.levels.shape:
            raise ValueError("score_quantiles.population must have one value per level")
        for q in (self.q_adapted, self.q_population):
            if q is not None and (not np.all(np.isfinite(q)) or np.any(q < 0) or np.any(q > 1)):
                raise ValueError("score quantiles must be in [0, 1]")

    @classmethod
    def from_manifest(cls, manifest: dict) -> "Calibration | None":
        c = ((manifest.get("predictors") or {}).get("expected_error") or {}).get("calibration")
        if c is None:
            return None
        return cls(c["temperature"], c["score_quantiles"])

    def _row(self, source: str, k: int):
        if source == "population" and self.t_population is not None and self.q_population is not None:
            return self.t_population, self.q_population
        i = min(max(int(k), 0), self.t_adapted.size - 1)  # beyond max_support the device adapts on max_support
        return float(self.t_adapted[i]), self.q_adapted[i]

    def probabilities(self, source: str, k: int, probs: np.ndarray) -> np.ndarray:
        return apply_temperature(probs, self._row(source, k)[0])

    def threshold(self, source: str, k: int, coverage: float) -> float:
        """The score quantile at `coverage` (linear between shipped levels; past the last level: 1,
        i.e. every class)."""
        row = self._row(source, k)[1]
        if coverage > self.levels[-1]:
            return 1.0
        if coverage <= self.levels[0]:
            return float(row[0])
        return float(np.interp(coverage, self.levels, row))

    def prediction_set(self, source: str, k: int, calibrated: np.ndarray, coverage: float) -> list[int]:
        """Class indices in the set, most probable first (never empty)."""
        q = self.threshold(source, k, coverage)
        order = np.argsort(-calibrated, kind="stable")
        return [int(i) for j, i in enumerate(order) if j == 0 or 1.0 - calibrated[i] <= q]
