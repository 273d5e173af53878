"""meta-export end to end: every trainer algorithm, Spectrum classification, parity that fails loudly."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch

from export import bundle as bundle_mod
from export.bundle import BUNDLE_FILES, export_bundle
from export.cli import main as cli_main
from export.signing import file_sha256

from export_helpers import REPO, SPECTRUM_SPEC, train_run, write_checkpoint

MANIFEST_FIELDS = {
    "format_version", "model_version", "task_kind", "feature_names", "input_shape", "class_names", "target_name",
    "recommended_k", "max_support", "inner", "loss", "preprocessing", "state_size", "state_layout", "producer",
    "parity", "files",
}


def _check_bundle(path, kind: str):
    m = json.loads((path / "manifest.json").read_text())
    assert MANIFEST_FIELDS <= set(m)
    # runs whose task source is available here also ship the population model (export/population.py)
    files = BUNDLE_FILES + (["population_state.npy"] if "predictors" in m else [])
    assert set(m["files"]) == set(files)
    for name, digest in m["files"].items():
        assert file_sha256(path / name) == digest
    assert sorted(p.name for p in path.iterdir()) == sorted(files + ["manifest.json"] +
                                                           (["manifest.sig"] if (path / "manifest.sig").exists() else []))
    assert m["task_kind"] == kind and len(m["model_version"]) == 16
    init = np.load(path / "init_state.npy", allow_pickle=False)
    assert init.dtype == np.float32 and init.shape == (m["state_size"],)
    last = m["state_layout"][-1]
    assert last["offset"] + math.prod(last["shape"]) == m["state_size"]
    assert m["parity"]["tasks"] >= 20 and 1 in m["parity"]["support_sizes"] and m["max_support"] in m["parity"]["support_sizes"]
    for f in ("adapt.onnx", "predict.onnx"):
        onnx.checker.check_model(onnx.load(str(path / f)), full_check=True)
    return m


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "reptile", "metasgd", "anil", "mamlpp"])
def test_every_trainer_algorithm_exports_with_parity(algorithm, tmp_path):
    run = train_run(tmp_path / "run", algorithm, iterations=20, steps=2)
    result = export_bundle(run, tmp_path / "bundle", max_support=32, log=lambda *_: None)
    m = _check_bundle(result.path, "regression")
    assert m["inner"]["algorithm"] == algorithm and m["inner"]["steps"] == 2
    assert m["inner"]["head_only"] == (algorithm == "anil")
    assert m["parity"]["onnx_max_abs"] <= 1e-4 and m["parity"]["torchscript_max_abs"] <= 1e-4
    assert m["parity"]["task_source"] == "test split"
    if algorithm == "anil":  # only the head moves
        sess = bundle_mod.ort_session(result.path / "adapt.onnx")
        x = np.random.default_rng(0).uniform(-5, 5, (8, 1)).astype(np.float32)
        state = sess.run(None, {"support_x": x, "support_y": np.sin(x[:, 0]), "support_w": np.ones(8, np.float32)})[0]
        init = np.load(result.path / "init_state.npy")
        head = next(e["offset"] for e in m["state_layout"] if e["name"].startswith("head."))
        assert np.array_equal(state[:head], init[:head]) and not np.array_equal(state[head:], init[head:])


@pytest.mark.parametrize("algorithm", ["mamlpp", "metasgd"])
def test_spectrum_classification(algorithm, tmp_path):
    run = write_checkpoint(
        tmp_path / "run", SPECTRUM_SPEC, algorithm=algorithm, steps=3, loss="cross_entropy", lr=0.1, perturb_lrs=True,
        source={"name": "cwru", "kind": "classification", "feature_names": ["accel"], "target_name": None,
                "class_names": ["normal", "inner", "outer", "ball", "cage"]},
    )
    result = export_bundle(run, tmp_path / "bundle", max_support=25, log=lambda *_: None)
    m = _check_bundle(result.path, "classification")
    assert m["input_shape"] == [1024] and m["loss"] == "cross_entropy"
    assert m["class_names"] == ["normal", "inner", "outer", "ball", "cage"]
    assert m["preprocessing"] == {"kind": "spectrum", "window": 1024, "bins": 64}
    assert m["parity"]["argmax_identical"] is True
    assert m["inner"]["lr_mode"] == ("per_layer_per_step" if algorithm == "mamlpp" else "per_param")

    rng = np.random.default_rng(1)
    sx = rng.standard_normal((7, 1024)).astype(np.float32)
    sy = rng.integers(0, 5, 7).astype(np.int64)
    adapt = bundle_mod.ort_session(result.path / "adapt.onnx")
    predict = bundle_mod.ort_session(result.path / "predict.onnx")
    state = adapt.run(None, {"support_x": sx, "support_y": sy, "support_w": np.ones(7, np.float32)})[0]
    probs = predict.run(None, {"state": state, "x": sx[:3]})[0]
    assert probs.shape == (3, 5) and np.allclose(probs.sum(1), 1.0, atol=1e-5)

    ts = torch.jit.load(str(result.path / "model.pt"))
    ts_state = ts.adapt(torch.from_numpy(sx), torch.from_numpy(sy), torch.ones(7))
    assert np.array_equal(ts.predict(ts_state, torch.from_numpy(sx[:3])).argmax(1).numpy(), probs.argmax(1))


def test_steps_override_and_torchscript_signatures(quality_run, tmp_path):
    result = export_bundle(quality_run, tmp_path / "b", steps=3, max_support=8, log=lambda *_: None)
    m = result.manifest
    assert m["inner"]["steps"] == 3 and m["preprocessing"]["kind"] == "standardize"
    assert m["feature_names"] == ["temperature", "pressure", "speed", "feed"] and m["target_name"] == "quality"
    ts = torch.jit.load(str(result.path / "model.pt"))
    x = torch.tensor(m["preprocessing"]["mean"]) + torch.randn(5, 4)
    state = ts.adapt(x, torch.randn(5), torch.ones(5))
    assert state.shape == (m["state_size"],)
    assert ts.predict(state, x).shape == (5,)


def test_parity_failure_exits_nonzero_and_writes_nothing(quality_run, tmp_path, monkeypatch, capsys):
    real = bundle_mod._backends

    def broken(work, script):
        backends = real(work, script)
        adapt, predict = backends["onnx"]
        backends["onnx"] = (lambda *a: adapt(*a) + 1e-3, predict)  # as if the exporter had drifted
        return backends

    monkeypatch.setattr(bundle_mod, "_backends", broken)
    out = tmp_path / "bundle"
    code = cli_main(["--run", str(quality_run), "--out", str(out), "--max-support", "8"])
    err = capsys.readouterr().err
    assert code == 6
    assert "disagree with the PyTorch reference" in err and "onnx" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "scratch directory left behind"


def test_cli_errors_map_to_exit_codes(tmp_path, capsys):
    assert cli_main(["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 4  # CheckpointError
    assert "no checkpoint" in capsys.readouterr().err
    keys = tmp_path / "keys"
    assert cli_main(["keygen", "--out", str(keys)]) == 0
    assert (keys / "signing_key.pem").stat().st_mode & 0o777 == 0o600
    assert cli_main(["keygen", "--out", str(keys)]) == 7
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    assert cli_main(["--run", str(tmp_path), "--out", str(tmp_path / "b"), "--sign-key", str(bad)]) == 7
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "notes.txt").write_text("mine")
    keys_run = write_checkpoint(tmp_path / "run", {"in_features": 1, "hidden": [4], "out_features": 1})
    assert cli_main(["--run", str(keys_run), "--out", str(tmp_path / "occupied")]) == 5
    assert (tmp_path / "occupied" / "notes.txt").exists()


def test_unsigned_export_warns(quality_run, tmp_path, capsys):
    out = tmp_path / "b"
    assert cli_main(["--run", str(quality_run), "--out", str(out), "--max-support", "4"]) == 0
    captured = capsys.readouterr()
    assert "UNSIGNED" in captured.err and not (out / "manifest.sig").exists()
    # Re-exporting over a previous bundle is allowed and leaves no stale files.
    assert cli_main(["--run", str(quality_run), "--out", str(out), "--max-support", "4"]) == 0
    _check_bundle(out, "regression")


@pytest.mark.slow
def test_real_vibration_source(tmp_path):
    """The vibration source (Spectrum on raw 1024-sample windows, 4-way): names and parity on its test split."""
    pytest.importorskip("meta_train.tasks.vibration")
    from meta_train.config import load_config
    from meta_train.train import train

    cfg = load_config(REPO / "configs" / "vibration.yaml", [
        "train.iterations=3", "train.meta_batch=2", "train.progress=false", "algorithm.inner_steps=2",
        "model.hidden=[16]"])
    train(cfg, tmp_path / "run")
    # population_model=False: its pooled model (vibration.yaml's 1000 pretrain iterations) is tested,
    # on a small budget, in test_population.py
    result = export_bundle(tmp_path / "run", tmp_path / "bundle", max_support=24, population_model=False,
                           log=lambda *_: None)
    m = _check_bundle(result.path, "classification")
    assert m["parity"]["task_source"] == "test split" and m["parity"]["argmax_identical"]
    assert m["input_shape"] == [1024] and len(m["class_names"]) == 4 and m["preprocessing"]["kind"] == "spectrum"
