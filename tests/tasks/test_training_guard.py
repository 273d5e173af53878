"""Training that cannot end silently wrong: a non-finite meta-loss or gradient stops the run (exit code 5)
with the last finite checkpoint kept, or is skipped a bounded number of times (train.on_nonfinite)."""

import json
import math

import pytest
import torch

from meta_train import checkpoint
from meta_train.cli import main
from meta_train.config import load_config
from meta_train.errors import NonFiniteError
from meta_train.tasks import build_source
from meta_train.train import train
from spiky_table import write_spiky_csv

# MAML, 5 inner steps at inner_lr 0.3 (the rate): a support set that holds a glitch row blows up
SPIKY = ["task.name=table", "task.task_column=exp", "task.target=target", "model.hidden=[16]",
         "algorithm.name=maml", "algorithm.inner_steps=5", "algorithm.inner_lr=0.3", "train.iterations=60",
         "train.meta_batch=8", "train.shots=10", "train.query=10", "train.meta_lr=0.003", "train.log_every=5",
         "train.checkpoint_every=10", "train.progress=false"]


def _finite(ckpt: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*ckpt["params"].values(), *ckpt["inner_lrs"].values()])


def test_glitchy_table_stops_with_exit_code_5_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    csv_path = write_spiky_csv(tmp_path / "mill.csv")
    run = tmp_path / "run"
    rc = main(["train", "--out", str(run), f"task.path={csv_path}", *SPIKY])
    err = capsys.readouterr().err
    assert rc == NonFiniteError.exit_code == 5
    assert "non-finite meta-loss" in err and "training stopped" in err and "task.scaling" in err
    kept = checkpoint.load(run)
    assert kept["iteration"] in (10, 20, 30, 40, 50) and _finite(kept)
    assert f"iteration {kept['iteration']}), is kept" in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "error" in records[-1] and records[-1]["iteration"] > kept["iteration"]
    assert all(math.isfinite(r["meta_loss"]) for r in records if "meta_loss" in r)


def test_robust_scaling_trains_the_same_glitchy_table_to_the_end(tmp_path, capsys):
    csv_path = write_spiky_csv(tmp_path / "mill.csv")
    source = build_source({"name": "table", "path": str(csv_path), "task_column": "exp", "target": "target"})
    x = torch.cat([source.tasks[t]["x"] for t in source.split_tasks["train"]]).double().numpy()
    assert ((x - source.mean) / source.std).max() > 40  # the glitch really is ~50 standard deviations out
    run = tmp_path / "run"
    rc = main(["train", "--out", str(run), f"task.path={csv_path}", *SPIKY, "task.scaling.inputs=robust"])
    out = capsys.readouterr().out
    assert rc == 0, out
    ckpt = checkpoint.load(run)
    assert ckpt["iteration"] == 60 and _finite(ckpt) and math.isfinite(ckpt["meta_loss"])
    assert ckpt["model_spec"]["input_transform"]["clip"] == 5.0
    assert f"checkpoint: {run}" in out and f"final meta-loss {ckpt['meta_loss']:.6g}" in out


class PoisonedSource:
    """The sinusoid source, with NaN labels in the meta-batches of the given (0-based) iterations."""

    def __init__(self, cfg, poisoned: set[int]):
        self.inner, self.poisoned, self.calls = build_source(cfg.task), poisoned, 0
        self.kind, self.loss = self.inner.kind, self.inner.loss

    def sample(self, split, batch, shots, query, generator):
        b = self.inner.sample(split, batch, shots, query, generator)
        if split == "train" and self.calls in self.poisoned:
            b.support_y[0, 0] = float("nan")
        self.calls += 1
        return b

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _cfg(*overrides):
    return load_config(None, ["train.iterations=12", "train.meta_batch=4", "train.progress=false",
                              "train.checkpoint_every=5", "model.hidden=[8]", *overrides])


@pytest.mark.parametrize("clip", ["10.0", "0"])  # found through the clipping norm, or by its own check
def test_a_nan_batch_stops_training_before_the_outer_step(tmp_path, clip):
    cfg = _cfg(f"train.grad_clip={clip}")
    with pytest.raises(NonFiniteError, match="non-finite meta-loss nan at iteration 7"):
        train(cfg, tmp_path / "r", source=PoisonedSource(cfg, {6}))
    kept = checkpoint.load(tmp_path / "r")
    assert kept["iteration"] == 5 and _finite(kept)


def test_a_nan_batch_before_any_checkpoint_says_none_was_written(tmp_path):
    cfg = _cfg("train.checkpoint_every=0")
    with pytest.raises(NonFiniteError, match="no checkpoint of this run was written"):
        train(cfg, tmp_path / "r", source=PoisonedSource(cfg, {2}))
    assert not (tmp_path / "r" / checkpoint.FILENAME).exists()


def test_skip_batch_policy_skips_a_bounded_number_of_non_finite_batches(tmp_path):
    cfg = _cfg("train.on_nonfinite=skip_batch", "train.max_nonfinite_skips=2")
    path = train(cfg, tmp_path / "ok", source=PoisonedSource(cfg, {3, 8}))
    ckpt = checkpoint.load(path)
    assert ckpt["iteration"] == 12 and ckpt["nonfinite_skips"] == 2 and _finite(ckpt)
    skipped = [json.loads(line) for line in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()
               if "skipped" in line]
    assert [r["iteration"] for r in skipped] == [4, 9]
    with pytest.raises(NonFiniteError, match="after skipping 2 non-finite batch"):
        train(cfg, tmp_path / "bad", source=PoisonedSource(cfg, {1, 2, 3}))


def test_the_skip_count_survives_a_resume(tmp_path):
    cfg = _cfg("train.on_nonfinite=skip_batch", "train.max_nonfinite_skips=1")
    train(cfg, tmp_path / "r", max_iterations=6, source=PoisonedSource(cfg, {2}))
    assert checkpoint.load(tmp_path / "r")["nonfinite_skips"] == 1
    with pytest.raises(NonFiniteError, match="after skipping 1 non-finite batch"):  # the bound is per run
        train(cfg, tmp_path / "r", resume=True, source=PoisonedSource(cfg, {1}))
    assert checkpoint.load(tmp_path / "r")["iteration"] == 6
