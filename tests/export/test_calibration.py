"""Calibrated probabilities and conformal prediction sets for a classification bundle (issue 13 part 2):
fitted on validation machines only, checked on held-out *test* machines through the device's own
code (onnxruntime graphs + edge_agent/calibration.py), and end to end through a real agent."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from export import calibration as export_calibration
from export import population
from export.bundle import export_bundle
from export_helpers import REPO

from edge_agent.calibration import Calibration, apply_temperature

MAX_SUPPORT = 10
TEST_TASKS, TEST_QUERY = 300, 30  # 9000 held-out parts per K on 300 machines
VAL_TASKS = 400  # the exporter's validation machines: 200 fit T, 200 give the conformal quantiles
# Coverage tolerance: parts of one machine share its adapted model, so coverage varies by machine; with
# a few hundred machines on each side (calibration, check) the sampling error is ~1.5 points.
TOLERANCE = 0.04


pytestmark = pytest.mark.slow  # one small vibration run + export (~30 s on 2 cores), shared by the module


@pytest.fixture(scope="module")
def vib_export(tmp_path_factory):
    """A small vibration run exported; records which splits the exporter drew its tasks from."""
    from meta_train.config import load_config
    from meta_train.train import train

    base = tmp_path_factory.mktemp("calib")
    train(load_config(str(REPO / "configs" / "vibration.yaml"),
                      ["train.iterations=5", "algorithm.inner_steps=2", "train.meta_batch=4", "train.progress=false", "train.checkpoint_every=0",
                       "model.hidden=[32]", "baselines.pretrain_iterations=60", "baselines.pretrain_batch=64"]),
          base / "run")
    splits = []
    real = population.global_label_tasks

    def spy(source, split, *a, **kw):
        splits.append(split)
        return real(source, split, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(population, "global_label_tasks", spy)
    try:
        r = export_bundle(base / "run", base / "bundle", max_support=MAX_SUPPORT, parity_tasks=2,
                          population_tasks=VAL_TASKS, log=lambda *_: None)
    finally:
        mp.undo()
    return r, base / "run", splits


def _held_out(run):
    """Test machines (never seen by training or calibration), parts labelled with the global classes."""
    import torch
    from meta_train.trained import load_trained

    source = population.source_of(load_trained(run))
    x, y = population.global_label_tasks(source, "test", TEST_TASKS, MAX_SUPPORT + TEST_QUERY,
                                         torch.Generator().manual_seed(2024))
    return x.numpy(), y.numpy()


def _device_probs(r, x, y, k: int | None) -> np.ndarray:
    """Raw predict.onnx probabilities [T, Q, C] of held-out machines: adapted on k labels (0: the bare
    init), or the population model (k None), through the device's Model."""
    from edge_agent.model import Model

    m = Model(str(r.path), r.manifest)
    out = []
    for t in range(x.shape[0]):
        if k is None:
            state = m.predictors.population_state
        else:
            state = m.init_state if k == 0 else m.adapt(x[t, :k], y[t, :k])
        out.append(m.predict(state, x[t, MAX_SUPPORT:]))
    return np.stack(out)


def test_temperatures_fitted_on_validation_only(vib_export):
    r, _, splits = vib_export
    cal = r.manifest["predictors"]["expected_error"]["calibration"]
    assert splits and set(splits) == {"val"}, splits  # no test (or train) machine reached the fit
    assert cal["fit"]["split"] == "val" and cal["fit"]["temperature_tasks"] + cal["fit"]["conformal_tasks"] == VAL_TASKS
    assert len(cal["temperature"]["adapted"]) == MAX_SUPPORT + 1 and cal["temperature"]["population"] > 0
    assert len(cal["score_quantiles"]["adapted"]) == MAX_SUPPORT + 1


def test_calibration_improves_ece_and_sets_cover_on_held_out_machines(vib_export):
    r, run, _ = vib_export
    x, y = _held_out(run)
    qy = y[:, MAX_SUPPORT:].reshape(-1)
    cal = Calibration.from_manifest(r.manifest)
    before, after, moved = [], [], []
    for k, source in ((None, "population"), (0, "meta_init"), (2, "adapted"), (5, "adapted"), (MAX_SUPPORT, "adapted")):
        raw = _device_probs(r, x, y, k)
        raw = raw.reshape(-1, raw.shape[-1])
        calibrated = cal.probabilities(source, k or 0, raw)
        before.append(export_calibration.ece(raw, qy))
        after.append(export_calibration.ece(calibrated, qy))
        moved.append(abs(np.log(cal._row(source, k or 0)[0])))
        for coverage in (0.8, 0.9):
            sets = [cal.prediction_set(source, k or 0, p, coverage) for p in calibrated]
            covered = np.mean([t in s for t, s in zip(qy, sets)])
            size = np.mean([len(s) for s in sets])
            assert abs(covered - coverage) <= TOLERANCE or (covered > coverage and size <= 1.05), \
                (source, k, coverage, covered, size)
            print(f"{source} K={k} coverage {coverage}: covered {covered:.3f}, mean set size {size:.2f}")
            if source == "population":  # the best tiny predictor: informative sets, not all 4 classes
                assert size < 3.5, (source, k, coverage, size)
    before, after = np.array(before), np.array(after)
    print("ECE before", before.round(4), "after", after.round(4), "|log T|", np.round(moved, 3))
    # not vacuous: the raw probabilities are miscalibrated and the temperatures do move them
    assert before.mean() > 0.03 and max(moved) > 0.2, (before, moved)
    assert after.mean() < 0.7 * before.mean(), (before, after)
    assert np.all(after <= before + 0.02), (before, after)


def test_temperature_is_the_graph_softmax_at_logits_over_t():
    logits = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 0.3, -5.0]])
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for t in (0.3, 1.0, 4.0):
        want = np.exp(logits / t) / np.exp(logits / t).sum(-1, keepdims=True)
        np.testing.assert_allclose(apply_temperature(p.astype(np.float32), t), want, rtol=1e-5, atol=1e-7)


def test_conformal_quantile_is_the_finite_sample_one():
    s = np.arange(1, 10) / 10.0  # 9 scores 0.1..0.9
    # level 0.5: ceil(10 * 0.5) = 5th smallest; level 0.95: ceil(9.5) = 10 > 9 -> every class
    assert export_calibration.conformal_quantiles(s, [0.5, 0.95]) == [0.5, 1.0]


def test_agent_publishes_calibrated_probabilities_and_a_prediction_set(vib_export, tmp_path):
    """Real agent process, real mosquitto: a vibration window's prediction has calibrated probabilities
    (summing to 1, equal to the device maths on the graph's output) and a non-empty prediction set."""
    import yaml
    from edge_agent.model import Model
    from edge_agent.simulator import LineClient
    from tests.edge.conftest import AgentProc
    from tests.support.mosquitto import start_mosquitto

    r, run, _ = vib_export
    x, y = _held_out(run)
    broker = start_mosquitto(tmp_path, extra_conf="max_queued_messages 0\nmax_inflight_messages 0\n")
    line = agent = None
    try:
        cfg = {"topic_prefix": "f/l/d", "state_dir": str(tmp_path / "state"), "log_level": "info",
               "broker": {"host": broker.host, "port": broker.port, "client_id": "calib-agent"},
               "bundle": {"dir": str(r.path), "allow_unsigned": True},
               "adaptation": {"support_size": MAX_SUPPORT, "adapt_every": 1, "min_labels": 1},
               "predictions": {"coverage": 0.9}}
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(cfg))
        line = LineClient(broker.host, broker.port, "f/l/d")
        agent = AgentProc(tmp_path / "agent.yaml", tmp_path / "agent.log").start(line)
        line.sample("a0", x[0, 0])
        for i in range(5):  # five labelled parts, then one more to predict with the adapted model
            line.sample(f"l{i}", x[0, i], label=int(y[0, i]))
        line.sample("a1", x[0, MAX_SUPPORT])
        assert line.wait_predictions(["a0", "a1"], 30), agent.log()
        time.sleep(0.2)
        m = Model(str(r.path), r.manifest)
        cal = Calibration.from_manifest(r.manifest)
        names = r.manifest["class_names"]
        for sid, xi in (("a0", x[0, 0]), ("a1", x[0, MAX_SUPPORT])):
            p = line.predictions[sid][0]
            probs = np.array([p["probabilities"][n] for n in names])
            assert abs(probs.sum() - 1.0) < 1e-6 and p["coverage"] == 0.9
            assert p["prediction_set"] and set(p["prediction_set"]) <= set(names)
            assert p["prediction"] == p["prediction_set"][0] == names[int(np.argmax(probs))]
            if sid == "a0":  # no label yet: the population model, its temperature
                assert p["source"] == "population" or p["source"] == "meta_init"
                raw = m.predict(m.predictors.population_state if p["source"] == "population" else m.init_state, xi[None])
                np.testing.assert_allclose(probs, cal.probabilities(p["source"], 0, raw)[0], atol=1e-6)
                assert not np.allclose(probs, raw[0], atol=1e-4)  # the temperature was applied
        assert line.predictions["a1"][0]["n_support"] == 5
        assert agent.terminate() == 0
    finally:
        if agent is not None:
            agent.stop_quietly()
        if line is not None:
            line.close()
        broker.kill()
