"""`meta-train dump-task`: a line-simulator task file (docs/protocol.md) from a table run or any source."""

import csv

import numpy as np

from meta_train.cli import main
from meta_train.trained import load_trained
from spiky_table import write_power_csv

TASK = ["task.name=table", "task.task_column=exp", "task.target=power_w", "task.scaling.target=standard",
        "task.scaling.inputs=robust"]
FAST = ["train.iterations=3", "train.meta_batch=2", "train.shots=3", "train.query=3", "train.progress=false",
        "model.hidden=[8]"]


def test_a_table_task_is_dumped_as_its_raw_rows_in_the_users_units(tmp_path, capsys):
    csv_path = write_power_csv(tmp_path / "power.csv", tasks=8, rows=30)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), f"task.path={csv_path}", *TASK, *FAST]) == 0
    test_task = load_trained(run).split["split_tasks"]["test"][0]
    assert main(["dump-task", "--run", str(run), "--out", str(tmp_path / "task.npz"), "--rows", "25"]) == 0
    assert f"task {test_task!r}" in capsys.readouterr().out
    data = np.load(tmp_path / "task.npz", allow_pickle=False)  # as edge-agent simulate reads it
    with open(csv_path) as f:
        rows = [r for r in csv.DictReader(f) if r["exp"] == test_task][:25]
    assert data["x"].dtype == np.float32 and data["x"].shape == (25, 3) and data["y"].dtype == np.float32
    want_x = np.array([[float(r[c]) for c in ("speed", "feed", "depth")] for r in rows], dtype=np.float32)
    assert np.array_equal(data["x"], want_x)  # raw: the bundle scales inputs itself
    assert np.allclose(data["y"], [float(r["power_w"]) for r in rows])  # watts, not model units
    assert data["feature_names"].tolist() == ["speed", "feed", "depth"]
    assert main(["dump-task", "--run", str(run), "--out", str(tmp_path / "t2.npz"), "--task", "E999"]) == 3
    assert main(["dump-task", "--run", str(run), "--out", str(tmp_path / "t3.npz"), "train.iterations=3"]) == 2
    # another split would make "test" tasks the run may have trained on: refused as in eval
    assert main(["dump-task", "--run", str(run), "--out", str(tmp_path / "t4.npz"), "task.seed=3"]) == 2
    assert main(["dump-task", "--run", str(run), "--out", str(tmp_path / "t4.npz"), "task.seed=3", "--new-tasks"]) == 0
    assert "may overlap" in capsys.readouterr().out


def test_a_synthetic_source_draws_one_task(tmp_path, capsys):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("task: {name: sinusoid}\n")
    assert main(["dump-task", "--config", str(cfg), "--out", str(tmp_path / "s.npz"), "--rows", "40"]) == 0
    data = np.load(tmp_path / "s.npz", allow_pickle=False)
    assert data["x"].shape == (40, 1) and data["y"].shape == (40,)
    # one task: a single sinusoid A sin(x - phase) = a sin x + b cos x through every sample
    x = data["x"][:, 0].astype(np.float64)
    basis = np.stack([np.sin(x), np.cos(x)], 1)
    coef, *_ = np.linalg.lstsq(basis, data["y"].astype(np.float64), rcond=None)
    assert np.abs(basis @ coef - data["y"]).max() < 1e-4 and 0.1 <= np.hypot(*coef) <= 5.0
    assert main(["dump-task", "--config", str(cfg), "--out", str(tmp_path / "s.npy")]) == 2
