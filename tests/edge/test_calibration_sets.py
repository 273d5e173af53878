"""edge_agent/calibration.py and its hook in prediction_extras: temperature, conformal sets, malformed
sections refused, bundles without calibration unchanged. Torch-free (the exported-bundle checks are
tests/export/test_calibration.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.calibration import Calibration
from edge_agent.prediction_config import Predictions
from edge_agent.prediction_extras import Extras

LEVELS = [0.5, 0.8, 0.9, 0.95]


def _cal(**over) -> Calibration:
    t = {"adapted": [4.0, 1.0], "population": 0.5, **over.pop("temperature", {})}
    q = {"levels": LEVELS, "adapted": [[0.7, 0.74, 0.75, 0.75], [0.2, 0.5, 0.6, 0.9]],
         "population": [0.1, 0.3, 0.4, 0.5], **over.pop("score_quantiles", {})}
    return Calibration(t, q)


def test_temperature_per_source_and_k_and_sets_from_the_quantiles():
    c = _cal()
    p = np.array([[0.6, 0.3, 0.1]])
    np.testing.assert_allclose(c.probabilities("adapted", 1, p), p)  # T = 1
    flat = c.probabilities("meta_init", 0, p)[0]  # T = 4: flatter
    assert flat.max() < 0.6 and abs(flat.sum() - 1) < 1e-12
    sharp = c.probabilities("population", 7, p)[0]  # population's own T = 0.5: sharper
    np.testing.assert_allclose(sharp, p[0] ** 2 / (p[0] ** 2).sum())
    assert c.probabilities("adapted", 99, p)[0] == pytest.approx(p[0])  # K past max_support: the last entry
    # adapted K=1 at 0.9: q = 0.6 -> classes with p >= 0.4; at 0.95 (q = 0.9): p >= 0.1
    assert c.prediction_set("adapted", 1, p[0], 0.9) == [0]
    assert c.prediction_set("adapted", 1, p[0], 0.95) == [0, 1, 2]
    assert c.threshold("adapted", 1, 0.85) == pytest.approx(0.55)  # linear between levels
    assert c.threshold("adapted", 1, 0.99) == 1.0  # past the last level: every class
    # never empty: q = 0.1 at 0.5 for the population rules out every class but the top one stays
    assert c.prediction_set("population", 0, np.array([0.5, 0.5 - 1e-9, 1e-9]), 0.5) == [0]


@pytest.mark.parametrize("over, msg", [
    ({"temperature": {"adapted": [1.0, 0.0]}}, "temperatures"),
    ({"temperature": {"population": float("nan")}}, "temperatures"),
    ({"score_quantiles": {"adapted": [[0.1, 0.2, 0.3, 0.4]]}}, r"\[K\]\[levels\]"),
    ({"score_quantiles": {"levels": [0.9, 0.5, 0.8, 0.95]}}, "increasing"),
    ({"score_quantiles": {"population": [0.1, 0.2, 0.3, 1.5]}}, r"\[0, 1\]"),
])
def test_malformed_calibration_is_refused(over, msg):
    with pytest.raises(ValueError, match=msg):
        _cal(**over)


class _Model:
    task_kind = "classification"
    class_names = ["healthy", "inner", "outer"]

    def __init__(self, calibration):
        self.predictors = type("P", (), {"calibration": calibration})()


def test_extras_hook_adds_calibrated_probabilities_and_a_set_and_leaves_older_bundles_alone():
    ex = Extras(Predictions(coverage=0.9), max_pending=10)
    y = np.array([[0.6, 0.3, 0.1]], np.float32)
    old = _Model(None)  # a bundle without calibration: raw softmax, no set, as before
    assert ex.calibrate(old, "adapted", 1, y) is y and ex.fields(old, "c", "s1", "adapted", 1, y[0]) == ""
    m = _Model(_cal())
    p = ex.calibrate(m, "meta_init", 5, y)[0]  # meta_init reads K = 0 whatever n_support says
    np.testing.assert_allclose(p, _cal().probabilities("adapted", 0, y)[0])
    assert ex.fields(m, "c", "s2", "adapted", 1, np.array([0.6, 0.3, 0.1])) == ',"prediction_set":["healthy"],"coverage":0.9'
