"""Small helpers shared by the task sources: split seed streams and per-task parameter hashing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")
_STREAM = 1 << 40  # task ids of one split live in [k * 2**40, (k + 1) * 2**40): the splits never share a task


def check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def task_ids(split: str, batch: int, generator: torch.Generator) -> list[int]:
    """`batch` task ids from the split's own stream (disjoint id ranges -> disjoint task sets)."""
    k = check_split(split)
    ids = torch.randint(0, _STREAM, (batch,), generator=generator, dtype=torch.int64)
    return [int(i) + k * _STREAM for i in ids]


def task_uniforms(seed: int, ids, n: int) -> torch.Tensor:
    """[len(ids), n] float64 uniforms in [0, 1), a pure function of (seed, task id, j): splitmix64 hashing,
    vectorised, so a task's parameters never depend on which batch or split-mates it was drawn with."""
    with np.errstate(over="ignore"):
        ids = np.asarray(ids, dtype=np.uint64)[:, None]
        j = np.arange(n, dtype=np.uint64)[None, :]
        x = (np.uint64(int(seed) % (1 << 64)) * np.uint64(0x9E3779B97F4A7C15)
             + ids * np.uint64(0xD1B54A32D192ED03) + (j + np.uint64(1)) * np.uint64(0xBF58476D1CE4E5B9))
        for _ in range(2):  # two splitmix64 finalisers
            x = x + np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
        return torch.from_numpy((x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53)))


def shared_data_dir(name: str, env: str | None = None) -> str | None:
    """$env when set, else the repo-relative ../shared/data/<name> when it exists (tests and benchmarks);
    a task's config always names its data directory itself."""
    if env and os.environ.get(env):
        return os.environ[env]
    here = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / name
    return str(here.resolve()) if here.exists() else None
