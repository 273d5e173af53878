"""Cross-validation over tasks (issue 11): folds, task-level intervals, and a verdict that goes each way."""

import csv
import json

import numpy as np
import pytest

from meta_train.cli import main
from meta_train.config import load_config
from meta_train.crossval import cross_validate, fold_splits, parse_folds, verdict
from meta_train.errors import ConfigError

CV = ["model.hidden=[16]", "algorithm.name=metasgd", "algorithm.inner_steps=1", "algorithm.inner_lr=0.1",
      "train.iterations=60", "train.meta_batch=4", "train.shots=5", "train.query=10", "train.meta_lr=0.01",
      "train.threads=1", "train.progress=false", "eval.tasks=10", "eval.shots=[5]", "eval.steps=[1]", "eval.query=10",
      "baselines.pretrain_batch=32", "baselines.pretrain_lr=0.01", "baselines.val_tasks=10",
      "baselines.pretrain_val_every=20"]


def offsets_table(path, offsets, rows=40, seed=0):
    """Every task: the same function of x1, x2 plus the task's own offset (and a little noise)."""
    rng = np.random.default_rng(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "x1", "x2", "y"])
        for t, off in enumerate(offsets):
            for _ in range(rows):
                x1, x2 = rng.uniform(-1, 1, 2)
                w.writerow([f"T{t}", round(x1, 4), round(x2, 4), round(np.sin(2 * x1) + 0.5 * x2 + off + 0.1 * rng.normal(), 4)])
    return path


def config(tmp_path, path):
    cfg = tmp_path / "cv.yaml"
    cfg.write_text(f"task: {{name: table, path: {path}, task_column: task, target: y, split: {{val: 0.2, test: 0.2}}}}\n")
    return load_config(cfg, CV)


def test_folds_hold_every_task_out_once_and_never_validate_on_it():
    tasks = [f"T{i}" for i in range(7)]
    for folds in ("loto", "kfold:3"):
        splits = fold_splits(tasks, *parse_folds(folds), val_fraction=0.2, seed=0)
        assert sorted(t for s in splits for t in s["test"]) == tasks
        for s in splits:
            assert not set(s["test"]) & set(s["val"]) and not set(s["train"]) & set(s["val"] + s["test"])
            assert s["val"] and s["train"] and sorted(s["train"] + s["val"] + s["test"]) == tasks
    assert len(fold_splits(tasks, "loto", None, 0.2, 0)) == 7
    with pytest.raises(ConfigError, match="loto or kfold"):
        parse_folds("kfold:1")
    with pytest.raises(ConfigError, match=">= 3 tasks"):
        fold_splits(["a", "b"], "loto", None, 0.2, 0)


def test_the_interval_is_over_tasks_with_a_t_quantile():
    ratios = np.array([1.5, 3.0, 2.0, 4.0])  # pooled MSE / meta MSE per held-out task
    per_task = {f"T{i}": {"5": {"meta": 0.1, "pooled": 0.1 * r}} for i, r in enumerate(ratios)}
    v = verdict(per_task, "regression", "5")
    logs = np.log(ratios)
    half = 3.182 * logs.std(ddof=1) / 2  # t(0.975, 3 df), 4 tasks
    assert v["n_tasks"] == 4 and v["ci95"] == pytest.approx([logs.mean() - half, logs.mean() + half])
    assert v["meta_helps"] and f"helps on your data by a factor {np.exp(logs.mean()):.2f}" in v["line"]
    assert "only 4 held-out tasks" in v["notes"][0]
    # one task where the pooled model fails badly does not decide it: the others favour the pooled model
    skewed = {"A": {"5": {"meta": 1.0, "pooled": 50.0}}, **{f"B{i}": {"5": {"meta": 1.0, "pooled": 0.8}} for i in range(5)}}
    v = verdict(skewed, "regression", "5")
    assert not v["meta_helps"] and "a pooled model is as good or better: use it" in v["line"] and v["wins"] == 1
    # classification: higher accuracy is the gain, in points
    acc = {f"T{i}": {"1": {"meta": 0.9, "pooled": 0.7 + 0.01 * i}} for i in range(6)}
    assert verdict(acc, "classification", "1")["meta_helps"]


def test_identical_tasks_verdict_is_use_the_pooled_model(tmp_path):
    path = offsets_table(tmp_path / "same.csv", [0, 0, 0, 0, 0])
    res = cross_validate(config(tmp_path, path), tmp_path / "cv", "loto", log=lambda *_: None)
    v = res["verdicts"][0]
    assert v["n_tasks"] == 5 and not v["meta_helps"]
    assert v["line"].startswith("K=5: a pooled model is as good or better: use it")
    md = (tmp_path / "cv" / "cv.md").read_text()
    assert v["line"] in md and "only 5" not in md  # 5 tasks: no small-sample note
    assert all(f["budgets"]["pretrain"]["budget_fair"] for f in res["fold_info"])


def test_task_specific_offsets_verdict_is_meta_learning_helps(tmp_path, capsys):
    path = offsets_table(tmp_path / "off.csv", [-3, 2, -2, 3, 2.5])
    cfg = tmp_path / "cv.yaml"
    cfg.write_text(f"task: {{name: table, path: {path}, task_column: task, target: y, split: {{val: 0.2, test: 0.2}}}}\n")
    assert main(["cv", "--config", str(cfg), "--out", str(tmp_path / "cv"), "--folds", "loto", *CV]) == 0
    out = capsys.readouterr().out
    assert "5 folds, each meta-training 60 iterations" in out  # the compute is announced before it is spent
    res = json.loads((tmp_path / "cv" / "cv.json").read_text())
    v = res["verdicts"][0]
    assert v["meta_helps"] and v["ci95"][0] > 0 and "meta-learning helps on your data by" in out
    assert sorted(res["per_task"]) == [f"T{i}" for i in range(5)]


def test_too_many_folds_are_refused_before_any_training(tmp_path):
    path = offsets_table(tmp_path / "t.csv", [0] * 6, rows=12)
    with pytest.raises(ConfigError, match="--max-folds 4"):
        cross_validate(config(tmp_path, path), tmp_path / "cv", "loto", max_folds=4, log=lambda *_: None)
    assert not (tmp_path / "cv").exists()


def test_cli_eval_writes_the_ks_it_could_and_exits_3(tmp_path, make_csv):
    path = make_csv(tmp_path / "lines.csv", tasks=6, rows=12)
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"task: {{name: table, path: {path}, task_column: line, target: quality, features: [temp, pressure]}}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "train.iterations=5", "train.meta_batch=2",
                 "train.shots=2", "train.query=3", "train.progress=false", "model.hidden=[8]"]) == 0
    with pytest.warns(UserWarning, match="K=40"):
        code = main(["eval", "--run", str(tmp_path / "r"), "eval.tasks=5", "eval.shots=[3,40]", "eval.steps=[1]",
                     "baselines.val_tasks=5", "baselines.pretrain_batch=16"])
    assert code == 3
    res = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert list(res["by_shots"]) == ["3"] and "K=40" in res["skipped"]["40"]
    assert "K=40 skipped" in (tmp_path / "r" / "eval.md").read_text()
