"""task.scaling: robust / standard / no input scaling and target scaling of a table, fitted on the meta-train
tasks only, carried in the model spec; eval reports MSE in the user's units."""

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

from meta_train.cli import main
from meta_train.errors import ConfigError
from meta_train.tasks import build_source
from meta_train.trained import load_trained
from spiky_table import write_power_csv, write_spiky_csv

POWER = {"name": "table", "task_column": "exp", "target": "power_w"}


def _train_rows(source):
    x = torch.cat([source.tasks[t]["x"] for t in source.split_tasks["train"]]).double().numpy()
    y = torch.cat([source.tasks[t]["y_raw"] for t in source.split_tasks["train"]]).double().numpy()
    return x, y


def test_robust_inputs_are_median_iqr_fitted_on_train_tasks_and_clipped(tmp_path):
    path = write_spiky_csv(tmp_path / "mill.csv")
    s = build_source({"name": "table", "path": str(path), "task_column": "exp", "target": "target",
                      "scaling": {"inputs": "robust", "clip": 4.0}})
    t = s.model_spec_defaults()["input_transform"]
    x, _ = _train_rows(s)
    q1, med, q3 = np.percentile(x, [25, 50, 75], axis=0)
    assert np.allclose(t["mean"], med) and np.allclose(t["std"], (q3 - q1) / 1.349) and t["clip"] == 4.0
    # the glitch neither inflates the scale nor reaches the network 50 units out
    assert max(t["std"]) < 1.2
    from meta_train.model import build_model

    model = build_model({**s.model_spec_defaults(), "hidden": [4]})
    z = model.transform(torch.from_numpy(x).float())
    assert float(z.abs().max()) == pytest.approx(4.0)
    assert s.describe()["scaling"] == {"inputs": "robust", "target": "none", "clip": 4.0}
    none = build_source({"name": "table", "path": str(path), "task_column": "exp", "target": "target",
                         "scaling": {"inputs": "none"}})
    assert none.model_spec_defaults()["input_transform"] is None


@pytest.mark.parametrize("mode", ["standard", "robust"])
def test_target_scaling_puts_episodes_in_model_units_and_keeps_the_users(tmp_path, mode):
    path = write_power_csv(tmp_path / "power.csv")
    s = build_source({**POWER, "path": str(path), "scaling": {"target": mode}})
    tt = s.model_spec_defaults()["target_transform"]
    _, y = _train_rows(s)
    if mode == "standard":
        assert tt == pytest.approx({"kind": "affine", "center": y.mean(), "scale": y.std()})
    else:
        q1, med, q3 = np.percentile(y, [25, 50, 75])
        assert tt == pytest.approx({"kind": "affine", "center": med, "scale": (q3 - q1) / 1.349})
    b = s.sample("train", 20, 5, 5, torch.Generator().manual_seed(0))
    assert abs(float(b.query_y.mean())) < 1.0 and 0.3 < float(b.query_y.std()) < 3.0  # O(1), not ~5000
    x_raw, y_raw = s.task_rows(s.split_tasks["test"][0])
    assert 4000 < y_raw.mean() < 6000 and x_raw.shape[1] == 3
    assert s.pretrain_batch(8, torch.Generator().manual_seed(0))[1].abs().max() < 10


def test_bad_scaling_keys_are_config_errors(tmp_path):
    path = write_power_csv(tmp_path / "power.csv")
    for bad, match in [({"inputs": "minmax"}, "task.scaling.inputs"), ({"target": "log"}, "task.scaling.target"),
                       ({"clip": 0}, "task.scaling.clip"), ({"center": 1}, "unknown config key 'task.scaling.center'")]:
        with pytest.raises(ConfigError, match=match):
            build_source({**POWER, "path": str(path), "scaling": bad})
    with pytest.raises(ConfigError, match="regression only"):
        build_source({**POWER, "path": str(path), "kind": "classification", "target": "exp",
                      "features": ["speed"], "scaling": {"target": "standard"}})


def test_eval_reports_mse_in_the_users_units_after_target_scaling(tmp_path, capsys):
    path = write_power_csv(tmp_path / "power.csv")
    run = tmp_path / "run"
    common = [f"task.path={path}", "task.name=table", "task.task_column=exp", "task.target=power_w",
              "task.scaling.target=standard", "task.scaling.inputs=robust"]
    assert main(["train", "--out", str(run), *common, "train.iterations=30", "train.meta_batch=4", "train.shots=5",
                 "train.query=5", "train.progress=false", "model.hidden=[16]", "algorithm.inner_lr=0.05"]) == 0
    assert main(["eval", "--run", str(run), "--methods", "meta", "eval.tasks=8", "eval.shots=[5]",
                 "eval.steps=[1]", "eval.query=10", "eval.chunk=8"]) == 0
    capsys.readouterr()
    result = json.loads((run / "eval.json").read_text())["by_shots"]["5"]["meta"]
    # the unadapted init's query MSE (step 0), recomputed here on the same tasks, in watts^2
    trained = load_trained(run)
    center, scale = trained.spec["target_transform"]["center"], trained.spec["target_transform"]["scale"]
    source = build_source(dict(trained.config.task))
    batch = source.sample("test", 8, 5, 10, torch.Generator().manual_seed(trained.config.eval.seed + 5))
    with torch.no_grad():
        pred_w = functional_call(trained.model, trained.params, (batch.query_x,)) * scale + center
    truth_w = batch.query_y.double() * scale + center
    expected = float(((pred_w.double() - truth_w) ** 2).mean())
    assert result["loss_curve"][0] == pytest.approx(expected, rel=1e-4)
    assert expected > 100  # watts^2, not the O(1) model units the network trained in
