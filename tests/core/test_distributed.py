"""DDP over the task batch: 2 gloo processes give the meta-gradient of 1 process on the combined batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meta_train import checkpoint

WORKER = Path(__file__).with_name("ddp_worker.py")
REPO = Path(__file__).resolve().parents[2]


def launch(nproc: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("algorithm", ["maml", "metasgd"])
def test_two_gloo_processes_give_the_combined_batch_gradient(tmp_path, algorithm):
    launch(2, str(WORKER), str(tmp_path / "two.pt"), algorithm)
    launch(1, str(WORKER), str(tmp_path / "one.pt"), algorithm)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert (two["world"], one["world"]) == (2, 1)
    for key in ("grads", "lr_grads"):
        for n in one[key]:
            assert torch.allclose(two[key][n], one[key][n], atol=1e-6), (key, n)
    assert len(one["lr_grads"]) == (6 if algorithm == "metasgd" else 0)


def test_trainer_runs_unchanged_under_torchrun(tmp_path):
    args = ["train.iterations=20", "train.meta_batch=8", "train.progress=false", "train.log_every=10"]
    launch(2, "-m", "meta_train", "train", "--out", str(tmp_path / "ddp"), *args)
    single = subprocess.run([sys.executable, "-m", "meta_train", "train", "--out", str(tmp_path / "one"), *args],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert single.returncode == 0, single.stderr
    ddp, one = checkpoint.load(tmp_path / "ddp"), checkpoint.load(tmp_path / "one")
    assert ddp["iteration"] == one["iteration"] == 20
    for n in one["params"]:
        assert torch.allclose(ddp["params"][n], one["params"][n], atol=1e-5), n


def test_a_non_finite_average_stops_every_rank_alike(tmp_path):
    """The glitch row is in one rank's shard; the averaged meta-gradient is NaN on both, and both stop.

    Each rank that gets to report names the same iteration. Not every rank always gets to: once the first
    worker exits (code 5), torchrun tears the others down, and on a busy machine that can come before the
    slower rank has printed (seen once in a fresh-clone CI run). So: every report agrees on the iteration,
    the run exits with code 5, and the kept checkpoint is finite."""
    sys.path.insert(0, str(REPO / "tests" / "tasks"))
    from spiky_table import write_spiky_csv

    csv_path = write_spiky_csv(tmp_path / "mill.csv")
    args = [f"task.path={csv_path}", "task.name=table", "task.task_column=exp", "task.target=target",
            "model.hidden=[16]", "algorithm.inner_steps=5", "algorithm.inner_lr=0.3", "train.iterations=60",
            "train.meta_batch=8", "train.shots=10", "train.query=10", "train.meta_lr=0.003",
            "train.checkpoint_every=5", "train.progress=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "meta_train", "train", "--out", str(tmp_path / "ddp"), *args],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode != 0
    errors = [ln for ln in (out.stdout + out.stderr).splitlines() if "meta-train: error: non-finite" in ln]
    assert 1 <= len(errors) <= 2 and len({ln.split(" at iteration ")[1].split(":")[0] for ln in errors}) == 1, errors
    assert "exitcode  : 5" in out.stdout + out.stderr  # torchrun's report of the ranks' exit code
    kept = checkpoint.load(tmp_path / "ddp")
    assert all(bool(torch.isfinite(p).all()) for p in kept["params"].values())
