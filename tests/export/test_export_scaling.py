"""Scaling inside the graphs: a table run with robust input and standard target scaling exports with parity,
and the bundle takes raw features and labels in the user's units and predicts in them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from edge_agent.model import ort_session
from export.bundle import export_bundle
from export.cli import main as export_main
from meta_train import checkpoint
from meta_train.cli import main as train_main
from meta_train.inner import adapt
from meta_train.tasks import build_source
from meta_train.trained import load_trained

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tasks"))
from spiky_table import write_power_csv  # noqa: E402


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("scaled")
    csv_path = write_power_csv(tmp / "power.csv")
    run = tmp / "run"
    assert train_main(["train", "--out", str(run), f"task.path={csv_path}", "task.name=table", "task.task_column=exp",
                       "task.target=power_w", "task.scaling.inputs=robust", "task.scaling.target=standard",
                       "algorithm.name=metasgd", "algorithm.inner_steps=2", "algorithm.inner_lr=0.05",
                       "train.iterations=20", "train.meta_batch=4", "train.shots=5", "train.query=5",
                       "train.progress=false", "model.hidden=[16,16]"]) == 0
    return run


def _eager_user_units(trained, sx, sy, qx):
    """The torch model by hand: labels into model units, the trained inner loop, predictions back out."""
    c, s = trained.spec["target_transform"]["center"], trained.spec["target_transform"]["scale"]
    inner = trained.algorithm.inner
    with torch.no_grad():
        p = adapt(trained.model, trained.params, trained.inner_lrs, sx, (sy - c) / s, inner, steps=inner.steps)
        return functional_call(trained.model, p, (qx,)).numpy() * s + c


@pytest.mark.parametrize("optimize", [True, False])
def test_bundle_predicts_in_the_users_units_like_the_torch_model(scaled_run, tmp_path, optimize):
    result = export_bundle(scaled_run, tmp_path / "bundle", max_support=16, optimize=optimize, log=lambda *_: None)
    m = result.manifest
    assert m["parity"]["task_source"] == "test split"
    trained = load_trained(scaled_run)
    assert m["preprocessing"]["clip"] == 5.0  # the manifest says what the graphs do
    assert m["preprocessing"]["target"] == {"kind": "affine", **{k: trained.spec["target_transform"][k]
                                                               for k in ("center", "scale")}}
    source = build_source(dict(trained.config.task))
    x, y = source.task_rows(source.split_tasks["test"][0])  # raw rows as the line would publish them
    sx, sy, qx, qy = x[:8], y[:8].astype(np.float32), x[8:30], y[8:30]
    adapt_s, predict_s = ort_session(result.path / "adapt.onnx"), ort_session(result.path / "predict.onnx")
    state = adapt_s.run(None, {"support_x": sx, "support_y": sy, "support_w": np.ones(8, np.float32)})[0]
    pred = predict_s.run(None, {"state": state, "x": qx})[0]
    want = _eager_user_units(trained, torch.from_numpy(sx), torch.from_numpy(sy), torch.from_numpy(qx))
    assert np.abs(pred - want).max() < 1e-4 * trained.spec["target_transform"]["scale"]
    assert 4000 < pred.mean() < 6000 and np.abs(pred - qy).mean() < 2000  # watts, like the labels
    init = np.load(result.path / "init_state.npy")
    pred0 = predict_s.run(None, {"state": init, "x": qx})[0]
    assert 4000 < pred0.mean() < 6000


def test_export_names_a_diverged_checkpoint_instead_of_a_parity_error(scaled_run, tmp_path, capsys):
    payload = checkpoint.load(scaled_run)
    payload["params"]["body.0.weight"][0, 0] = float("nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    torch.save(payload, bad / checkpoint.FILENAME)
    rc = export_main(["--run", str(bad), "--out", str(tmp_path / "bundle")])
    err = capsys.readouterr().err
    assert rc == 5 and "the checkpoint contains non-finite parameters (body.0.weight)" in err
    assert "disagree" not in err and not (tmp_path / "bundle").exists()
