"""The predictor choice (edge_agent/predictors.py): population model vs meta-init vs adapted, by the
expected errors the manifest carries; older bundles without them behave as before. Torch-free."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import numpy as np
import pytest

from conftest import write_config
from edge_agent.errors import BundleError
from edge_agent.model import Model
from edge_agent.predictors import Predictors, of
from edge_agent.simulator import play
from linear_bundle import LinearFamily, make_linear_bundle


def _curves(bundle_dir, fam: LinearFamily, pop_state, max_support: int, tasks: int = 60) -> dict:
    """Validation curves measured the way export/population.py does, here with the bundle's own graphs."""
    m = Model(str(bundle_dir), json.loads((bundle_dir / "manifest.json").read_text()))
    adapted = np.zeros((tasks, max_support + 1))
    pop = np.zeros(tasks)
    res_a, res_p = [[] for _ in range(max_support + 1)], []
    for t in range(tasks):
        theta = fam.sample_task(10_000 + t)
        sx, sy = fam.sample(theta, max_support, seed=20_000 + t)
        qx, qy = fam.sample(theta, 50, seed=30_000 + t)
        r = m.predict(pop_state, qx) - qy
        pop[t], _ = np.mean(r ** 2), res_p.extend(np.abs(r))
        for k in range(max_support + 1):
            state = m.init_state if k == 0 else m.adapt(sx[:k], sy[:k])
            r = m.predict(state, qx) - qy
            adapted[t, k] = np.mean(r ** 2)
            res_a[k].extend(np.abs(r))
    levels = [round(0.02 * i, 2) for i in range(1, 50)] + [0.99, 0.995, 0.999]
    quantiles = {"levels": levels, "population": np.quantile(res_p, levels).tolist(),
                 "adapted": [np.quantile(r, levels).tolist() for r in res_a]}
    return {"metric": "mse", "split": "val", "tasks": tasks, "k": list(range(max_support + 1)),
            "population": float(pop.mean()), "adapted": adapted.mean(0).tolist(), "abs_residual_quantiles": quantiles}


def add_population(bundle_dir, pop_state: np.ndarray, curves: dict) -> None:
    """Give an (unsigned) bundle a population model the way meta-export writes it."""
    np.save(bundle_dir / "population_state.npy", pop_state.astype(np.float32), allow_pickle=False)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"]["population_state.npy"] = hashlib.sha256(
        (bundle_dir / "population_state.npy").read_bytes()).hexdigest()
    manifest["predictors"] = {"population": {"file": "population_state.npy", "graph": "predict.onnx"},
                              "expected_error": curves}
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.fixture(scope="module")
def pop_bundle(tmp_path_factory):
    """A poor initialisation (zeros: 0-label predictions are far off) next to a better, not perfect,
    population model (half the family mean), with curves measured on 'validation' tasks of the family:
    the population wins at few labels, adaptation at more."""
    fam = LinearFamily()
    d = make_linear_bundle(tmp_path_factory.mktemp("pop") / "bundle", fam, init=np.zeros(5, np.float32),
                           max_support=16, steps=10, lr=0.2)
    pop = (0.5 * fam.theta0).astype(np.float32)
    add_population(d, pop, _curves(d, fam, pop, 16))
    return d, fam


def _load(d) -> Model:
    from edge_agent.model import load_manifest

    return Model(str(d), load_manifest(str(d), None, allow_unsigned=True))


def test_choice_follows_the_expected_errors():
    init, pop, adapted = np.zeros(2, np.float32), np.ones(2, np.float32), np.full(2, 2, np.float32)
    p = Predictors(pop, 1.0, [9.0, 3.0, 0.5, 0.4])
    assert p.choose(None, 0, init)[0] == "population"  # 0 labels: population 1.0 < bare init 9.0
    src, state = p.choose(adapted, 1, init)
    assert src == "population" and state is pop  # adapted on 1 label expected 3.0 > 1.0
    src, state = p.choose(adapted, 2, init)
    assert src == "adapted" and state is adapted
    assert p.choose(adapted, 50, init)[0] == "adapted"  # beyond the curve: its last point
    plain = Predictors(None, None, None)  # an older bundle: as before
    assert plain.choose(None, 0, init) == ("meta_init", init)
    assert plain.choose(adapted, 1, init) == ("adapted", adapted)

    class Stub:  # a model object without predictors (unit-test stubs) predicts as before
        pass

    assert of(Stub()).choose(None, 0, init)[0] == "meta_init"


def test_bundle_population_model_is_loaded_and_chosen_by_k(pop_bundle):
    d, fam = pop_bundle
    m = _load(d)
    assert m.predictors.has_population
    np.testing.assert_array_equal(m.predictors.population_state, 0.5 * fam.theta0)
    curves = m.manifest["predictors"]["expected_error"]
    assert curves["adapted"][0] > curves["population"]  # the zero init is worse than the population at 0 labels
    k_switch = next(k for k, v in enumerate(curves["adapted"]) if v < curves["population"])
    assert m.predictors.choose(None, 0, m.init_state)[0] == "population"
    state = m.adapt(*fam.sample(fam.sample_task(1), 16, seed=2))
    assert m.predictors.choose(state, k_switch, m.init_state)[0] == "adapted"
    if k_switch > 1:
        assert m.predictors.choose(state, k_switch - 1, m.init_state)[0] == "population"


def test_older_bundle_without_predictors_loads_as_before(tmp_path):
    from edge_agent.prediction_config import Predictions
    from edge_agent.prediction_extras import Extras

    m = _load(make_linear_bundle(tmp_path / "old", LinearFamily()))
    assert Extras(Predictions(), 10).fields(m, "c", "s1", "meta_init", 0, 1.0) == ""  # no interval fields
    assert not m.predictors.has_population
    state = np.ones(5, np.float32)
    assert m.predictors.choose(None, 0, m.init_state) == ("meta_init", m.init_state)
    assert m.predictors.choose(state, 3, m.init_state)[0] == "adapted"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_population_file_must_be_listed_and_well_formed(pop_bundle, tmp_path):
    d, _ = pop_bundle
    bad = _copy(d, tmp_path / "unlisted")
    man = json.loads((bad / "manifest.json").read_text())
    man["predictors"]["population"]["file"] = "elsewhere.npy"
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="not a listed"):
        _load(bad)

    bad = _copy(d, tmp_path / "nan")
    man = json.loads((bad / "manifest.json").read_text())
    man["predictors"]["expected_error"]["adapted"] = []
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="empty or non-finite"):
        _load(bad)

    bad = _copy(d, tmp_path / "quantiles")
    man = json.loads((bad / "manifest.json").read_text())
    man["predictors"]["expected_error"]["abs_residual_quantiles"]["levels"][3] = 0.0  # not increasing
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="abs_residual_quantiles"):
        _load(bad)

    bad = _copy(d, tmp_path / "shape")
    np.save(bad / "population_state.npy", np.zeros(3, np.float32))
    man = json.loads((bad / "manifest.json").read_text())
    man["files"]["population_state.npy"] = hashlib.sha256((bad / "population_state.npy").read_bytes()).hexdigest()
    (bad / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(BundleError, match="expected float32"):
        _load(bad)


def test_agent_says_which_predictor_answered(tmp_path, broker, line, agent_factory, pop_bundle):
    """Real agent, real mosquitto: 0 labels -> the population model's value; then the adapted model."""
    d, fam = pop_bundle

    class Info:
        path = d

    agent = agent_factory(write_config(tmp_path, broker, Info, **{"adaptation.min_labels": 1})).start(line)
    x, y = fam.sample(fam.sample_task(555), 60, seed=7)
    ids = play(line, x, y, "src", rate=500, label_delay=5)
    assert line.wait_predictions(ids, 30), agent.log()
    time.sleep(0.2)
    m = _load(d)
    first = [line.predictions[i][0] for i in ids[:5]]  # no label yet
    assert all(p["source"] == "population" and p["adapted"] is False for p in first)
    np.testing.assert_allclose([p["prediction"] for p in first], m.predict(m.predictors.population_state, x[:5]),
                               rtol=1e-5, atol=1e-5)
    last = line.predictions[ids[-1]][0]
    assert last["source"] == "adapted" and last["adapted"] is True
    # every prediction carries its 90 % interval around the value; narrower once adapted
    for p in (first[0], last):
        lo, hi = p["interval"]
        assert p["coverage"] == 0.9 and lo < p["prediction"] < hi
    assert np.diff(last["interval"])[0] < np.diff(first[0]["interval"])[0]
    assert agent.terminate() == 0


def test_out_of_spec_probability_and_alarms_on_their_own_topic(tmp_path, broker, line, agent_factory, pop_bundle):
    """Real agent, real mosquitto: p_out_of_spec on every prediction; an alarm (QoS 1, sample id,
    evidence) exactly for the predictions at or above the threshold."""
    d, fam = pop_bundle

    class Info:
        path = d

    x, y = fam.sample(fam.sample_task(777), 80, seed=9)
    upper = float(np.quantile(y, 0.7))  # about 30 % of this line's parts are out of spec
    cfg = write_config(tmp_path, broker, Info, **{"adaptation.min_labels": 1,
                                                  "predictions.spec": {"upper": upper},
                                                  "predictions.alarm_threshold": 0.5})
    agent = agent_factory(cfg).start(line)
    ids = play(line, x, y, "spec", rate=500, label_delay=5)
    assert line.wait_predictions(ids, 30), agent.log()
    preds = {i: line.predictions[i][0] for i in ids}
    flagged = {i for i, p in preds.items() if p["p_out_of_spec"] >= 0.5}
    assert flagged and len(flagged) < len(ids)
    assert line.wait_for(lambda: len(line.alarms) >= len(flagged), 10), (len(line.alarms), len(flagged))
    time.sleep(0.2)
    assert {a["id"] for a in line.alarms} == flagged and len(line.alarms) == len(flagged)
    a = line.alarms[0]
    p = preds[a["id"]]
    assert a["_qos"] == 1 and a["spec"] == {"lower": None, "upper": upper} and a["threshold"] == 0.5
    assert a["evidence"]["prediction"] == pytest.approx(p["prediction"], abs=1e-5)
    assert a["evidence"]["interval"] == pytest.approx(p["interval"], abs=1e-5)
    assert a["evidence"]["source"] == p["source"] and a["p_out_of_spec"] == pytest.approx(p["p_out_of_spec"], abs=1e-6)
    # the probability follows the prediction: above the limit -> over 1/2, well below it -> small
    for p in preds.values():
        if p["prediction"] > upper:
            assert p["p_out_of_spec"] > 0.5
        if p["interval"][1] < upper:
            assert p["p_out_of_spec"] < 0.5 * (1 - p["coverage"]) + 0.02
    assert agent.terminate() == 0


def test_simulator_plays_many_tasks_each_in_its_own_context(tmp_path, broker, line, agent_factory, pop_bundle):
    """`edge-agent simulate --task-dir`: every line in its own context, scored against the population
    model and the adapted meta-init on the same samples; at 0 labels the agent IS the population model."""
    import subprocess
    import sys

    from linear_bundle import write_task_file

    d, fam = pop_bundle

    class Info:
        path = d

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for t in range(4):
        write_task_file(tasks / f"line{t}.npz", *fam.sample(fam.sample_task(900 + t), 40, seed=t))
    agent = agent_factory(write_config(tmp_path, broker, Info, **{"adaptation.min_labels": 1})).start(line)
    out = subprocess.run([sys.executable, "-m", "edge_agent", "simulate", "--host", broker.host, "--port",
                          str(broker.port), "--prefix", "factory/line1/dev1", "--task-dir", str(tasks), "--bundle",
                          str(d), "--k", "10", "--out", str(tmp_path / "rep")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr + agent.log()
    rows = json.loads((tmp_path / "rep" / "report_many.json").read_text())
    zero = rows[0]
    assert zero["labels"] == "0" and zero["tasks"] == 4 and zero["sources"] == {"population": 4 * 6}
    assert zero["agent"] == pytest.approx(zero["population"], rel=1e-5)
    assert all(r["no_worse"] for r in rows), out.stdout
    assert "| 0 | 4 |" in out.stdout
    assert agent.terminate() == 0
