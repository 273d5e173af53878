"""User tables: splits by task, episodes, normalisation on meta-train only, clear errors, the CLI end to end."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from meta_train.cli import main
from meta_train.errors import ConfigError, DataError
from meta_train.tasks import build_source
from meta_train.tasks.table import DataWarning

REG = {"name": "table", "task_column": "line", "target": "quality", "features_except": ["ts", "grade"]}
CLS = {"name": "table", "task_column": "line", "target": "grade", "features": ["temp", "pressure"],
       "kind": "classification", "n_way": 3}
FAST = ["train.iterations=6", "train.meta_batch=4", "train.shots=3", "train.query=4", "train.progress=false",
        "train.log_every=2", "model.hidden=[8]"]
EVAL_FAST = ["eval.tasks=6", "eval.shots=[2]", "eval.steps=[1,2]", "eval.query=4", "baselines.pretrain_iterations=3",
             "baselines.pretrain_batch=8"]


def src(cfg, path, **kw):
    return build_source({**cfg, "path": str(path), **kw})


def test_splits_are_by_task_deterministic_and_disjoint(lines_csv):
    a = src(REG, lines_csv)
    b = src(REG, lines_csv)
    assert a.split_tasks == b.split_tasks
    parts = [set(a.split_tasks[s]) for s in ("train", "val", "test")]
    assert set().union(*parts) == {f"L{i}" for i in range(8)}
    assert sum(len(p) for p in parts) == 8 and all(parts)
    other = [src(REG, lines_csv, seed=k).split_tasks for k in range(1, 6)]
    assert any(o != a.split_tasks for o in other)  # the seed decides the split
    # every row of an episode comes from one task of its split
    batch = a.sample("test", 5, 4, 6, torch.Generator().manual_seed(0))
    test_rows = torch.cat([a.tasks[t]["x"] for t in a.split_tasks["test"]])
    for task in range(5):
        rows = torch.cat([batch.support_x[task], batch.query_x[task]])
        owners = {t for t in a.split_tasks["test"] for r in rows if (a.tasks[t]["x"] == r).all(1).any()}
        assert len(owners) == 1
    assert len(test_rows) > 0


def test_regression_support_and_query_are_disjoint(lines_csv):
    s = src(REG, lines_csv)
    b = s.sample("train", 10, 5, 10, torch.Generator().manual_seed(1))
    assert b.support_x.shape == (10, 5, 2) and b.query_y.shape == (10, 10) and b.support_y.dtype == torch.float32
    for t in range(10):
        sup = {tuple(r.tolist()) for r in b.support_x[t]}
        assert not sup & {tuple(r.tolist()) for r in b.query_x[t]}


def test_normalisation_is_fitted_on_meta_train_tasks_only(tmp_path, make_csv):
    path = make_csv(tmp_path / "l.csv")
    s = src(REG, path)
    train_x = torch.cat([s.tasks[t]["x"] for t in s.split_tasks["train"]]).double()
    spec = s.model_spec_defaults()
    assert spec["input_transform"]["kind"] == "standardize" and spec["in_features"] == 2
    assert np.allclose(spec["input_transform"]["mean"], train_x.mean(0).numpy(), atol=1e-3)
    assert np.allclose(spec["input_transform"]["std"], train_x.std(0, unbiased=False).numpy(), atol=1e-3)
    all_x = torch.cat([v["x"] for v in s.tasks.values()]).double()
    assert not np.allclose(spec["input_transform"]["mean"], all_x.mean(0).numpy(), atol=1e-3)
    d = s.describe()
    assert d["feature_names"] == ["temp", "pressure"] and d["target_name"] == "quality" and d["kind"] == "regression"


def test_classification_episodes_shuffle_labels_and_use_global_labels_for_pretraining(lines_csv):
    s = src(CLS, lines_csv)
    assert s.describe()["class_names"] == ["A", "B", "C"] and s.pretrain_classes == 3
    assert s.model_spec_defaults()["out_features"] == 3
    b = s.sample("train", 20, 2, 3, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (20, 6, 2) and b.query_y.shape == (20, 9)
    assert b.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    # the class behind label 0 changes between episodes: check the true grade of support rows
    grade_of = {}
    for t, e in s.tasks.items():
        for x, y in zip(e["x"], e["y"]):
            grade_of[tuple(x.tolist())] = int(y)
    first = {grade_of[tuple(b.support_x[i, 0].tolist())] for i in range(20)}
    assert len(first) > 1
    x, y = s.pretrain_batch(16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 2) and y.dtype == torch.int64 and int(y.max()) <= 2


def test_parquet_reads_like_csv(lines_csv, tmp_path):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pq.write_table(pacsv.read_csv(lines_csv), tmp_path / "lines.parquet")
    a, b = src(REG, lines_csv), src(REG, tmp_path / "lines.parquet")
    assert a.split_tasks == b.split_tasks
    assert np.allclose(a.mean, b.mean)


def test_tasks_with_too_few_rows_or_classes_are_named_and_skipped(tmp_path):
    path = tmp_path / "few.csv"
    lines = ["line,temp,pressure,quality,grade"]
    for t, n in (("big1", 30), ("big2", 30), ("big3", 30), ("big4", 30), ("tiny", 3)):
        lines += [f"{t},{200 + i},{100 + i},{i * 0.1},{'AB'[i % 2] if t != 'big4' else 'A'}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    s = src(REG, path, features=["temp", "pressure"], features_except=None, split={"val": 0.0, "test": 0.2})
    s.split_tasks["train"] = ["big1", "big2", "tiny"]  # force the tiny task into a split we sample
    with pytest.warns(DataWarning, match=r"'tiny' has 3 rows, needs K\+1 = 6"):
        b = s.sample("train", 8, 5, 5, torch.Generator().manual_seed(0))
    assert b.support_x.shape == (8, 5, 2)
    with warnings.catch_warnings():  # reported once, not on every batch
        warnings.simplefilter("error")
        s.sample("train", 2, 5, 5, torch.Generator())
    with pytest.warns(DataWarning, match=r"fewer than n_way=2 classes: 'big4' has 1"):
        c = src(CLS, path, n_way=2, split={"val": 0.0, "test": 0.0})
    assert "big4" in c.split_tasks["train"]
    with pytest.raises(DataError, match="no train task can make a K=30 episode"):
        with pytest.warns(DataWarning):
            s.sample("train", 2, 30, 5, torch.Generator())


@pytest.mark.parametrize("body, match", [
    ("line,temp,pressure,quality\nL1,200,1,0.5\nL1,201,2,0.6\n", r"missing column 'ts'|missing feature column\(s\) \['ts'\]"),
    ("line,temp,ts,quality\nL1,200,1,0.5\nL1,hot,2,0.6\nL2,1,1,1\nL2,1,1,1\nL3,1,1,1\nL3,2,2,2\n",
     r"column 'temp' is not numeric: 'hot' at row 2 \(line 3 of the file\)"),
    ("line,temp,ts,quality\nL1,200,1,0.5\nL1,201,2,\nL2,1,1,1\nL2,1,1,1\nL3,1,1,1\nL3,2,2,2\n",
     r"column 'quality' has a missing value \(empty/NaN\) at row 2"),
    ("line,temp,ts,quality\nL1,200,1,0.5\nL1,NaN,2,1\nL2,1,1,1\nL2,1,1,1\nL3,1,1,1\nL3,2,2,2\n",
     r"column 'temp' has a missing value \(empty/NaN\) at row 2"),
    ("line,temp,ts,quality\nL1,200,1,0.5\nL1,201,2,1\nL2,1,1,1\nL3,1,1,1\nL3,2,2,2\n",
     r"task 'L2' \(column 'line'\) has only one row \(row 3"),
])
def test_bad_regression_input_names_file_row_and_column(tmp_path, body, match):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(DataError, match=match) as e:
        src({**REG, "features": ["temp", "ts"], "features_except": None}, path)
    assert str(path) in str(e.value)


def test_one_class_label_column_and_unknown_keys(tmp_path, lines_csv):
    path = tmp_path / "one.csv"
    path.write_text("line,temp,pressure,grade\n" + "".join(f"L{i % 3},{i},{i},ok\n" for i in range(12)))
    with pytest.raises(DataError, match=r"label column 'grade' has only one class \('ok'\)"):
        src(CLS, path)
    with pytest.raises(ConfigError, match="task.task_colum"):
        src(REG, lines_csv, task_colum="line")
    with pytest.raises(ConfigError, match="task.split.vall"):
        src(REG, lines_csv, split={"vall": 0.1})
    with pytest.raises(ConfigError, match="task.kind"):
        src(REG, lines_csv, kind="ranking")
    with pytest.raises(DataError, match="file not found"):
        src(REG, tmp_path / "nope.csv")


def test_cli_trains_and_evaluates_a_user_csv(tmp_path, lines_csv, capsys):
    cfg = tmp_path / "table.yaml"
    cfg.write_text(f"task:\n  name: table\n  path: {lines_csv}\n  task_column: line\n  target: quality\n"
                   "  features_except: [ts, grade]\n  split: {val: 0.15, test: 0.25}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), *FAST]) == 0
    assert main(["eval", "--run", str(tmp_path / "run"), *EVAL_FAST]) == 0
    out = capsys.readouterr().out
    assert "| meta | 2 |" in out and "| pretrain | 2 |" in out
    from meta_train.trained import load_trained

    t = load_trained(tmp_path / "run")
    assert t.spec["input_transform"]["kind"] == "standardize" and t.source["feature_names"] == ["temp", "pressure"]
    # classification through the CLI, with a subprocess for the real exit code
    cls = tmp_path / "cls.yaml"
    cls.write_text(f"task:\n  name: table\n  path: {lines_csv}\n  task_column: line\n  target: grade\n"
                   "  features: [temp, pressure]\n  kind: classification\n  n_way: 3\n")
    r = subprocess.run([sys.executable, "-m", "meta_train", "train", "--config", str(cls), "--out",
                        str(tmp_path / "crun"), *FAST], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert main(["eval", "--run", str(tmp_path / "crun"), *EVAL_FAST]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_reports_broken_csv_with_exit_code_3_and_bad_key_with_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("line,temp,quality\nL1,200,0.5\nL1,201,oops\nL2,1,1\nL2,2,2\nL3,1,1\nL3,2,2\n")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"task: {{name: table, path: {bad}, task_column: line, target: quality}}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), *FAST]) == 3
    err = capsys.readouterr().err
    assert "column 'quality' is not numeric: 'oops' at row 2" in err and str(bad) in err
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "task.targett=q", *FAST]) == 2
    assert "task.targett" in capsys.readouterr().err
    cfg.write_text(f"task: {{name: table, path: {bad}, task_column: machine, target: quality}}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), *FAST]) == 3
    assert "missing column 'machine' (task.task_column)" in capsys.readouterr().err
