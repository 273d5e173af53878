"""Self-describing checkpoints that load with `torch.load(weights_only=True)`: no arbitrary unpickling.

Everything in one is a tensor or plain data: the model spec (so the architecture is rebuilt without the
config code), the config, the task source's description (feature and class names), the resolved
algorithm, the meta-learned weights and inner rates, and optimizer/RNG state for resume.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .errors import CheckpointError

FORMAT = "edge-meta-checkpoint/1"
FILENAME = "checkpoint.pt"


def save(path: str | Path, **fields) -> None:
    path = Path(path)
    payload = {"format": FORMAT}
    for key, value in fields.items():
        payload[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # a crash mid-save never leaves a truncated checkpoint behind


def load(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / FILENAME
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that is more than weights
        raise CheckpointError(f"{path}: cannot load as a weights-only checkpoint: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an {FORMAT} checkpoint")
    return payload
