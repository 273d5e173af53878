"""A trained run, rebuilt from its checkpoint alone: what evaluation and export start from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .algorithms import Algorithm
from .config import Config, from_dict
from .inner import InnerConfig
from .model import MLP, build_model


@dataclass
class Trained:
    spec: dict
    model: MLP
    params: dict[str, torch.Tensor]
    inner_lrs: dict[str, torch.Tensor]
    algorithm: Algorithm
    config: Config
    source: dict
    iteration: int
    path: Path
    split: dict | None = None  # meta_train/split_guard.py's identity; None in checkpoints from before it


def load_trained(run: str | Path) -> Trained:
    payload = checkpoint.load(run)
    alg = dict(payload["algorithm"])
    alg["inner"] = InnerConfig(**alg["inner"])
    model = build_model(payload["model_spec"])
    model.eval()
    return Trained(
        spec=payload["model_spec"],
        model=model,
        params=dict(payload["params"]),
        inner_lrs=dict(payload["inner_lrs"]),
        algorithm=Algorithm(**alg),
        config=from_dict(Config, payload["config"]),
        source=payload["source"],
        iteration=int(payload["iteration"]),
        path=Path(run),
        split=payload.get("split"),
    )
