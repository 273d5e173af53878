"""Calibration of a classification bundle's probabilities, fitted at export (issue 13 part 2).

On the run's validation machines (export/population.py draws them; never test machines), for each
predictor (the adapted initialisation at every K, the population model):
  - the first half of the machines (even index) fits the temperature T minimising the query NLL;
  - the other half (odd index) gives the split-conformal quantiles of the score
    1 - (T-calibrated probability of the true class), at `levels`.
Fitting T and measuring the quantiles on disjoint machines keeps the conformal guarantee exact (the
score function is fixed before the calibration samples are seen). The maths the device repeats
(temperature, score) is edge_agent/calibration.py's.
"""

from __future__ import annotations

import math

import numpy as np

from edge_agent.calibration import apply_temperature, nll

# log T grid: NLL is convex in 1/T, so a fine grid finds the minimum; [0.05, 100] covers a model from
# badly over- to badly under-confident (K = 0 of a meta-init whose head means nothing: T large, ~uniform).
LOG_T_GRID = np.linspace(math.log(0.05), math.log(100.0), 401)


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """argmin_T NLL(softmax(log probs / T), y) over LOG_T_GRID; probs [N, C], y [N]."""
    losses = [nll(apply_temperature(probs, math.exp(lt)), y) for lt in LOG_T_GRID]
    return float(math.exp(LOG_T_GRID[int(np.argmin(losses))]))


def conformal_quantiles(scores: np.ndarray, levels) -> list[float]:
    """Split-conformal quantile per level: the ceil((n + 1) l)-th smallest score (1.0 when that
    exceeds n: no finite threshold, the set is every class)."""
    s = np.sort(np.asarray(scores, np.float64))
    n = s.size
    out = []
    for lv in levels:
        r = math.ceil((n + 1) * lv)
        out.append(1.0 if r > n else float(s[r - 1]))
    return out


def calibrate(probs: np.ndarray, y: np.ndarray, levels) -> dict:
    """One predictor: probs [T, Q, C] on T validation machines, y [T, Q]. Returns its temperature, the
    score quantiles, and the NLL / ECE on the conformal half before and after (the record)."""
    fit_p, fit_y = probs[0::2].reshape(-1, probs.shape[-1]), y[0::2].reshape(-1)
    cal_p, cal_y = probs[1::2].reshape(-1, probs.shape[-1]), y[1::2].reshape(-1)
    t = fit_temperature(fit_p, fit_y)
    cal = apply_temperature(cal_p, t)
    scores = 1.0 - cal[np.arange(cal_y.size), cal_y]
    return {"temperature": t, "quantiles": [round(v, 6) for v in conformal_quantiles(scores, levels)],
            "nll_before": nll(cal_p, cal_y), "nll_after": nll(cal, cal_y),
            "ece_before": ece(cal_p, cal_y), "ece_after": ece(cal, cal_y)}


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence, equal-width bins."""
    p = np.asarray(probs, np.float64)
    conf, pred = p.max(-1), p.argmax(-1)
    correct = (pred == np.asarray(y)).astype(float)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() * abs(conf[m].mean() - correct[m].mean())
    return float(total / max(len(conf), 1))


def manifest_section(adapted: list[dict], population: dict | None, levels, tasks: int, query: int) -> dict:
    """`predictors.expected_error.calibration` (docs/bundle.md)."""
    r = lambda v: round(float(v), 6)  # noqa: E731
    sec = {
        "fit": {"split": "val", "temperature_tasks": (tasks + 1) // 2, "conformal_tasks": tasks // 2, "query": query},
        "temperature": {"adapted": [r(a["temperature"]) for a in adapted],
                        "population": None if population is None else r(population["temperature"])},
        "score_quantiles": {"levels": list(levels), "adapted": [a["quantiles"] for a in adapted],
                            "population": None if population is None else population["quantiles"]},
        "nll": {"adapted_before": [r(a["nll_before"]) for a in adapted], "adapted_after": [r(a["nll_after"]) for a in adapted]},
        "ece": {"adapted_before": [r(a["ece_before"]) for a in adapted], "adapted_after": [r(a["ece_after"]) for a in adapted]},
    }
    if population is not None:
        for key in ("nll", "ece"):
            sec[key]["population_before"] = r(population[f"{key}_before"])
            sec[key]["population_after"] = r(population[f"{key}_after"])
    return sec
