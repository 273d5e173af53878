"""The trainer as a user drives it: config validation, determinism, resume, checkpoints, CLI, reports."""

import json
import subprocess
import sys

import pytest
import torch

from meta_train import checkpoint
from meta_train.cli import main
from meta_train.config import load_config
from meta_train.errors import CheckpointError, ConfigError
from meta_train.train import train
from meta_train.trained import load_trained

FAST = ["train.iterations=30", "train.meta_batch=5", "train.log_every=10", "train.progress=false"]


def test_unknown_keys_are_rejected_by_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  iteratons: 5\n")
    with pytest.raises(ConfigError, match="train.iteratons"):
        load_config(bad)
    with pytest.raises(ConfigError, match="algorithm.inner_stepz"):
        load_config(None, ["algorithm.inner_stepz=3"])
    with pytest.raises(ConfigError, match="train.meta_batch: expected an integer"):
        load_config(None, ["train.meta_batch=many"])
    with pytest.raises(ConfigError, match="algorithm.name"):
        load_config(None, ["algorithm.name=magic"])


def test_cli_names_the_bad_key_and_exits_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "train.batch=3"]) == 2
    assert "train.batch" in capsys.readouterr().err


def test_fixed_seed_gives_identical_runs(tmp_path):
    cfg = load_config(None, FAST + ["algorithm.name=mamlpp", "algorithm.inner_steps=2"])
    a = checkpoint.load(train(cfg, tmp_path / "a"))
    b = checkpoint.load(train(cfg, tmp_path / "b"))
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n])
        assert torch.equal(a["inner_lrs"][n], b["inner_lrs"][n])
    c = checkpoint.load(train(load_config(None, FAST + ["seed=1"]), tmp_path / "c"))
    assert not torch.equal(a["params"]["head.bias"], c["params"]["head.bias"])


def test_resume_continues_exactly(tmp_path):
    cfg = load_config(None, FAST + ["algorithm.name=metasgd"])
    straight = checkpoint.load(train(cfg, tmp_path / "straight"))
    train(cfg, tmp_path / "split", max_iterations=12)
    assert checkpoint.load(tmp_path / "split")["iteration"] == 12
    resumed = checkpoint.load(train(cfg, tmp_path / "split", resume=True))
    assert resumed["iteration"] == 30
    for n in straight["params"]:
        assert torch.allclose(straight["params"][n], resumed["params"][n], atol=1e-6), n
    lines = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines] == [10, 12, 20, 30]
    assert all("meta_loss" in l for l in lines)


def test_checkpoint_is_self_describing_and_weights_only(tmp_path):
    cfg = load_config(None, FAST + ["algorithm.name=anil", "model.hidden=[16,8]"])
    path = train(cfg, tmp_path / "r")
    raw = torch.load(path, weights_only=True)  # no arbitrary unpickling needed
    assert raw["model_spec"]["hidden"] == [16, 8]
    trained = load_trained(tmp_path / "r")
    assert trained.algorithm.inner.head_only
    assert trained.params["body.0.weight"].shape == (16, 1)
    (tmp_path / "evil.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path / "evil.pt")


def test_meta_training_beats_both_baselines_on_sinusoid(tmp_path):
    """A short schedule already separates MAML from scratch and pretrain + fine-tune at 10 steps."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "train.iterations=1500", "train.progress=false"]) == 0
    assert main(["eval", "--run", str(run), "eval.tasks=200", "eval.shots=[10]", "eval.steps=[1,10]",
                 "baselines.pretrain_iterations=500", "baselines.val_tasks=50"]) == 0
    results = json.loads((run / "eval.json").read_text())["by_shots"]["10"]
    meta = results["meta"]["loss"]["10"]["mean"]
    assert meta < results["scratch"]["loss"]["10"]["mean"]
    assert meta < results["pretrain"]["loss"]["10"]["mean"]
    assert (run / "eval.md").read_text().count("| meta |") == 1
    assert (run / "eval.png").stat().st_size > 1000


def test_console_script_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "meta_train", "train", "--out", str(tmp_path / "r")] + FAST,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "r" / "checkpoint.pt").exists()
