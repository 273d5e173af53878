"""Regression intervals (edge_agent/intervals.py): the manifest's per-K quantiles before a line has
evidence, adaptive conformal inference on its honest residuals after. Torch-free, no broker needed."""

from __future__ import annotations

import types

import numpy as np
import pytest

from edge_agent.config import config_from_dict
from edge_agent.errors import ConfigError
from edge_agent.intervals import Intervals, Quantiles

LEVELS = [round(0.02 * i, 2) for i in range(1, 50)] + [0.99, 0.995, 0.999]


def _half_normal_quantiles(scale: float) -> list[float]:
    rng = np.random.default_rng(0)
    r = np.abs(rng.normal(0, scale, 200_000))
    return np.quantile(r, LEVELS).tolist()


class M:
    """What the interval code reads of a model: the quantiles its predictors loaded from the manifest."""

    def __init__(self, adapted_scales, population_scale=None):
        ee = {"abs_residual_quantiles": {"levels": LEVELS, "adapted": [_half_normal_quantiles(s) for s in adapted_scales]}}
        if population_scale is not None:
            ee["abs_residual_quantiles"]["population"] = _half_normal_quantiles(population_scale)
        self.manifest = {"predictors": {"expected_error": ee}}
        self.task_kind = "regression"
        self.predictors = types.SimpleNamespace(quantiles=Quantiles.from_manifest(self.manifest))


def test_quantiles_per_source_and_k_with_bounded_tails():
    q = Quantiles.from_manifest(M([4.0, 2.0, 1.0], population_scale=3.0).manifest)
    assert q.half_width("adapted", 0, 0.9) == pytest.approx(1.645 * 4.0, rel=0.02)
    assert q.half_width("adapted", 2, 0.9) == pytest.approx(1.645, rel=0.02)
    assert q.half_width("adapted", 99, 0.9) == q.half_width("adapted", 2, 0.9)  # beyond the curve: its end
    assert q.half_width("population", 5, 0.9) == pytest.approx(1.645 * 3.0, rel=0.02)
    # beyond the last level: wider, finite; below the first: narrower, >= 0
    assert q.half_width("adapted", 2, 0.999) < q.half_width("adapted", 2, 0.99999) < 100
    assert 0 <= q.half_width("adapted", 2, 0.001) < q.half_width("adapted", 2, 0.02)
    assert Quantiles.from_manifest({}) is None  # older bundle: no intervals
    with pytest.raises(ValueError):
        Quantiles([0.5, 0.4], [[1, 2]])


def _stream(iv: Intervals, model, residual_scale: float, n: int, seed: int = 1) -> float:
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n):
        lo, hi = iv.interval(model, "line", f"s{i}", "adapted", 1, 0.0)
        y = rng.normal(0, residual_scale)
        hits += bool(iv.observe(f"s{i}", y))
    return hits / n


def test_calibrated_line_keeps_nominal_coverage():
    m = M([1.0, 1.0])
    for cov in (0.9, 0.8):
        got = _stream(Intervals(coverage=cov, gamma=0.005), m, 1.0, 4000)
        assert abs(got - cov) < 0.02, (cov, got)


def test_aci_recovers_coverage_on_a_line_noisier_than_validation():
    """Residuals twice the validation ones: the manifest's quantiles alone cover ~59 %; ACI adapts."""
    m = M([1.0, 1.0])
    fixed = _stream(Intervals(coverage=0.9, gamma=1e-9), m, 2.0, 4000)
    adaptive = _stream(Intervals(coverage=0.9, gamma=0.02), m, 2.0, 4000)
    assert fixed < 0.7
    assert abs(adaptive - 0.9) < 0.025, adaptive


def test_only_honest_residuals_count_and_memory_is_bounded():
    m = M([1.0])
    iv = Intervals(coverage=0.9, gamma=0.1, max_contexts=2, max_pending=3)
    assert iv.observe("never-predicted", 5.0) is None  # no interval was made before the label: ignored
    assert iv.alpha("line") == pytest.approx(0.1)
    for i in range(10):
        iv.interval(m, f"ctx{i}", f"s{i}", "adapted", 0, 0.0)
    assert len(iv._pending) == 3
    for i in range(7, 10):
        iv.observe(f"s{i}", 100.0)  # misses
    assert len(iv._alpha) == 2
    assert iv.alpha("ctx9") < 0.1  # a miss lowers alpha: wider intervals next time


def test_predictions_config_keys_are_checked():
    base = {"topic_prefix": "f/l", "state_dir": "/tmp/x", "bundle": {"dir": "/tmp/b", "allow_unsigned": True}}
    cfg = config_from_dict({**base, "predictions": {"coverage": 0.8, "spec": {"upper": 60.0}}})
    assert cfg.predictions.coverage == 0.8 and cfg.predictions.spec.upper == 60.0 and cfg.predictions.spec.lower is None
    assert config_from_dict(base).predictions.coverage == 0.9
    for bad, match in (({"coverage": 1.0}, "coverage"), ({"coverage": 0.9, "covrage": 1}, "unknown key"),
                       ({"spec": {"lower": 5.0, "upper": 1.0}}, "below"), ({"spec": {}}, "lower, upper")):
        with pytest.raises(ConfigError, match=match):
            config_from_dict({**base, "predictions": bad})
