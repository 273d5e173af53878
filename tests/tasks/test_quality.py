"""The process-quality family: physical units, disjoint splits, determinism, the task dump for the simulator."""

import json

import numpy as np
import pytest
import torch

from meta_train.errors import ConfigError
from meta_train.tasks import build_source
from meta_train.tasks.common import task_ids
from meta_train.tasks.quality import FEATURES, RANGES, main, unseen_task_id, write_task_file


def test_batches_are_in_physical_units_with_train_statistics():
    s = build_source({"name": "quality"})
    b = s.sample("train", 64, 10, 20, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (64, 10, 4) and b.query_y.shape == (64, 20)
    for i, f in enumerate(FEATURES):
        lo, hi = RANGES[f]
        assert lo <= float(b.query_x[..., i].min()) and float(b.query_x[..., i].max()) <= hi
    spec = s.model_spec_defaults()["input_transform"]
    x = b.query_x.reshape(-1, 4)
    assert np.allclose(spec["mean"], x.mean(0), rtol=0.05)
    assert np.allclose(spec["std"], x.std(0), rtol=0.1)
    assert s.describe()["feature_names"] == FEATURES and s.describe()["target_name"] == "quality"


def test_splits_come_from_disjoint_streams_and_tasks_are_pure_functions_of_their_id():
    g = torch.Generator().manual_seed(0)
    train = set(task_ids("train", 2000, g))
    test = set(task_ids("test", 2000, g))
    val = set(task_ids("val", 2000, g))
    assert not train & test and not train & val and not val & test
    s = build_source({"name": "quality"})
    ids = sorted(test)[:5]
    assert torch.equal(s.task_params(ids)[2], s.task_params([ids[2]])[0])
    assert not torch.equal(s.task_params(ids), build_source({"name": "quality", "seed": 1}).task_params(ids))
    a = s.sample("test", 4, 5, 5, torch.Generator().manual_seed(3))
    b = s.sample("test", 4, 5, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a.support_y, b.support_y)


def test_response_peaks_at_the_task_optimum():
    s = build_source({"name": "quality", "noise": 0.0})
    p = s.task_params([12345])
    opt = p[:, 0:4].clone()
    opt[:, 0] += p[:, 10]  # measured temperature = true + sensor offset
    at_opt = s.response(p, opt[:, None, :])
    off = s.response(p, (opt + torch.tensor([10.0, 10, 10, 5]))[:, None, :])
    assert float(at_opt) == pytest.approx(s.opts.peak + float(p[0, 11]))
    assert float(off) < float(at_opt)


def test_dump_task_writes_an_unseen_test_task(tmp_path, capsys):
    out = tmp_path / "task.npz"
    assert main(["--dump-task", str(out), "--n", "50", "--seed", "7"]) == 0
    info = json.loads(capsys.readouterr().out)
    with np.load(out, allow_pickle=False) as z:
        assert z["x"].shape == (50, 4) and z["y"].shape == (50,) and z["x"].dtype == np.float32
        assert list(z["feature_names"]) == FEATURES and str(z["target_name"]) == "quality"
        assert int(z["task_id"]) == info["task_id"] == unseen_task_id(7)
        assert np.abs(z["y"] - z["y_clean"]).max() < 1.0
        x = z["x"]
    write_task_file(tmp_path / "again.npz", 50, 7)
    with np.load(tmp_path / "again.npz") as z:
        assert np.array_equal(z["x"], x)
    assert unseen_task_id(7) >= 2 * (1 << 40)  # the test stream


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="task.noisee"):
        build_source({"name": "quality", "noisee": 0.1})
    with pytest.raises(ConfigError, match="interaction_max"):
        build_source({"name": "quality", "interaction_max": 3.0})
