"""The shipped configs load and run end to end through the CLI with a few iterations."""

from pathlib import Path

import pytest
import torch

from meta_train.cli import main
from meta_train.config import BaselineConfig, EvalConfig, load_config
from meta_train.evaluate import evaluate
from meta_train.tasks import build_source
from meta_train.tasks.featurized import featurized
from meta_train.trained import load_trained

ROOT = Path(__file__).resolve().parents[2]
TINY = ["train.iterations=3", "train.meta_batch=2", "train.progress=false", "train.log_every=1", "model.hidden=[8]"]
TINY_EVAL = ["eval.tasks=4", "eval.shots=[1]", "eval.steps=[1,2]", "eval.chunk=4", "baselines.pretrain_iterations=2",
             "baselines.pretrain_batch=4"]


@pytest.mark.parametrize("name", ["quality", "vibration", "table.example"])
def test_synthetic_and_example_configs_train_and_eval(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    cfg = ROOT / "configs" / f"{name}.yaml"
    load_config(cfg)
    extra = ["task.window=256", "task.bins=16", "eval.query=3"] if name == "vibration" else []
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), *TINY, *extra]) == 0
    assert main(["eval", "--run", str(tmp_path / "r"), *TINY_EVAL]) == 0
    assert "| meta | 1 |" in capsys.readouterr().out
    spec = load_trained(tmp_path / "r").spec
    assert spec["input_transform"]["kind"] == ("spectrum" if name == "vibration" else "standardize")


def test_cwru_config_trains_on_a_slice(cwru_dir, tmp_path, capsys):
    cfg = ROOT / "configs" / "cwru.yaml"
    over = [f"task.data_dir={cwru_dir}", "task.max_samples=20000", "task.window=256", "task.bins=16", "train.query=2"]
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "c"), *TINY, *over]) == 0
    assert main(["eval", "--run", str(tmp_path / "c"), *TINY_EVAL, "eval.query=2"]) == 0
    assert "accuracy" in capsys.readouterr().out
    over[-1] = "task.protocol=healthy10"
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "h"), *TINY, *over]) == 0
    assert load_trained(tmp_path / "h").source["class_names"][-1] == "normal"
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "x"), *TINY,
                 "task.data_dir=/nonexistent/cwru"]) == 3
    assert "no 12k_drive_end" in capsys.readouterr().err


def test_featurized_evaluation_is_the_same_function(tmp_path):
    cfg = load_config(ROOT / "configs" / "vibration.yaml", TINY + ["task.window=256", "task.bins=16"])
    from meta_train.train import train

    train(cfg, tmp_path / "v")
    trained = load_trained(tmp_path / "v")
    source = build_source(dict(trained.config.task))
    e = EvalConfig(tasks=6, shots=[2], steps=[1, 3], query=3, chunk=6)
    b = BaselineConfig(pretrain_iterations=3, pretrain_batch=8, finetune_lr=0.1)
    direct = evaluate(trained, source, e, b)
    ft, fs = featurized(trained, source)
    fast = evaluate(ft, fs, e, b)
    for m in ("meta", "scratch", "pretrain"):
        a, c = direct["by_shots"]["2"][m], fast["by_shots"]["2"][m]
        assert torch.allclose(torch.tensor(a["loss_curve"]), torch.tensor(c["loss_curve"]), rtol=1e-4, atol=1e-5), m
