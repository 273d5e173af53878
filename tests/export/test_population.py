"""The population model in the bundle (export/population.py): it is the run's pooled model, it is
hashed and signed like every file, its curves come from validation tasks, and `--pooled` exports it alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from export.bundle import export_bundle
from export.errors import ExportError
from export.signing import generate_keypair
from export.trace import StateLayout
from export_helpers import REPO

TINY = ["train.iterations=15", "train.meta_batch=4", "train.progress=false", "train.checkpoint_every=0",
        "model.hidden=[16,16]", "baselines.pretrain_iterations=40", "baselines.pretrain_batch=64"]


@pytest.fixture(scope="module")
def tiny_quality_run(tmp_path_factory):
    from meta_train.config import load_config
    from meta_train.train import train

    out = tmp_path_factory.mktemp("tiny_quality")
    train(load_config(str(REPO / "configs" / "quality.yaml"), TINY), out)
    return out


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keypair(tmp_path_factory.mktemp("pop_keys"))


@pytest.fixture(scope="module")
def pop_export(tiny_quality_run, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("pop_bundles") / "q"
    return export_bundle(tiny_quality_run, out, sign_key=keys[0], max_support=8, parity_tasks=3, log=lambda *_: None)


def _pooled_state(run) -> np.ndarray:
    from export import population
    from meta_train.trained import load_trained

    trained = load_trained(run)
    p = population.pooled_params(trained, population.source_of(trained))
    return StateLayout(p).flatten(p).numpy()


def test_population_model_is_the_pooled_model_hashed_and_signed(pop_export, tiny_quality_run, keys, tmp_path):
    from edge_agent.errors import BundleError
    from edge_agent.verify import verify_bundle

    m = pop_export.manifest
    assert "population_state.npy" in m["files"] and m["predictors"]["population"]["file"] == "population_state.npy"
    pop = np.load(pop_export.path / "population_state.npy")
    np.testing.assert_allclose(pop, _pooled_state(tiny_quality_run), rtol=1e-5, atol=1e-6)
    verify_bundle(pop_export.path, public_key_path=keys[1])
    # the signature covers it: a swapped population model is refused
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(pop_export.path, bad)
    np.save(bad / "population_state.npy", pop + 1.0)
    with pytest.raises(BundleError):
        verify_bundle(bad, public_key_path=keys[1])


def test_expected_error_curves_cover_every_k_and_the_device_reproduces_population(pop_export, tiny_quality_run):
    run = tiny_quality_run
    from edge_agent.model import Model

    curves = pop_export.manifest["predictors"]["expected_error"]
    assert curves["split"] == "val" and curves["k"] == list(range(9)) and len(curves["adapted"]) == 9
    assert all(np.isfinite(curves["adapted"])) and np.isfinite(curves["population"])
    m = Model(str(pop_export.path), pop_export.manifest)
    assert m.predictors.has_population
    # the device's population prediction (predict.onnx on population_state.npy) is the pooled torch
    # model's, in the same (raw) input units and target units
    import torch
    from torch.func import functional_call

    from meta_train.trained import load_trained

    trained = load_trained(run)
    x = np.array([[200.0, 80.0, 60.0, 30.0], [240.0, 120.0, 100.0, 50.0]], np.float32)  # in RANGES
    layout = StateLayout(trained.params)
    ref = functional_call(trained.model, layout.unflatten(torch.from_numpy(m.predictors.population_state)),
                          (torch.from_numpy(x),)).reshape(-1).detach().numpy()
    np.testing.assert_allclose(m.predict(m.predictors.population_state, x), ref, rtol=1e-4, atol=1e-4)


def test_curves_are_measured_on_validation_tasks_only(tiny_quality_run):
    from export import population
    from export.trace import Functions
    from meta_train.trained import load_trained

    trained = load_trained(tiny_quality_run)
    source = population.source_of(trained)
    asked = []

    class Spy:
        kind = source.kind

        def sample(self, split, *a, **k):
            asked.append(split)
            return source.sample(split, *a, **k)

    fns = Functions(trained)
    curves = population.expected_errors(fns, fns.init_state(), Spy(), 4, tasks=8, query=5)
    assert asked == ["val"]
    # K = 0 is the bare initialisation: here the population state passed is that same init
    assert curves["adapted"][0] == pytest.approx(curves["population"], rel=1e-6)


def test_pooled_bundle_is_the_pooled_model_alone(tiny_quality_run, tmp_path):
    from export.cli import main

    out = tmp_path / "pooled"
    assert main(["--run", str(tiny_quality_run), "--out", str(out), "--pooled", "--max-support", "8"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["inner"]["algorithm"] == "pooled" and m["inner"]["lr_mode"] == "fixed"
    assert not (out / "population_state.npy").exists()
    assert m["predictors"]["population"]["file"] == "init_state.npy"
    np.testing.assert_allclose(np.load(out / "init_state.npy"), _pooled_state(tiny_quality_run), rtol=1e-5, atol=1e-6)

    from edge_agent.model import Model

    model = Model(str(out), m)
    src, state = model.predictors.choose(None, 0, model.init_state)
    assert src == "population" and state is model.init_state


def test_run_without_a_buildable_source_exports_without_population(quality_run, tmp_path, capsys):
    """A run whose task source is not available here: the default export warns and ships no population
    model (the device behaves as before); asking for one explicitly is an error."""
    r = export_bundle(quality_run, tmp_path / "b", max_support=4, parity_tasks=2, log=lambda *_: None)
    assert "predictors" not in r.manifest and not (r.path / "population_state.npy").exists()
    assert "no population model" in capsys.readouterr().err
    with pytest.raises(ExportError, match="task source cannot be built"):
        export_bundle(quality_run, tmp_path / "c", max_support=4, parity_tasks=2, population_model=True,
                      log=lambda *_: None)
    assert not (tmp_path / "c").exists()


def test_vibration_classification_gets_a_population_model_with_a_global_head(tmp_path):
    """Classification: the pooled body with a head for the global classes (the baseline's zero head
    would predict uniform probabilities), error-rate curves on validation machines, no quantiles."""
    from edge_agent.model import Model
    from meta_train.config import load_config
    from meta_train.train import train

    run = tmp_path / "vib"
    train(load_config(str(REPO / "configs" / "vibration.yaml"),
                      ["train.iterations=2", "train.meta_batch=2", "train.progress=false", "train.checkpoint_every=0",
                       "model.hidden=[16]", "baselines.pretrain_iterations=30", "baselines.pretrain_batch=32"]), run)
    r = export_bundle(run, tmp_path / "b", max_support=4, parity_tasks=2, population_tasks=30, log=lambda *_: None)
    curves = r.manifest["predictors"]["expected_error"]
    assert curves["metric"] == "error_rate" and "abs_residual_quantiles" not in curves
    assert len(curves["adapted"]) == 5 and 0 <= curves["population"] <= 1 and curves["tasks"] == 30
    # the fitted head beats chance (0.75 for 4 classes) on validation machines; a zero head would not
    assert curves["population"] < 0.6
    m = Model(str(r.path), r.manifest)
    assert m.predictors.has_population and m.predictors.quantiles is None
    probs = m.predict(m.predictors.population_state, np.zeros((2, 1024), np.float32))
    assert probs.shape == (2, 4) and not np.allclose(probs, 0.25)
