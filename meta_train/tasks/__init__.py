"""Task sources: where the tasks of a meta-batch come from.

Every source returns a `TaskBatch` of tensors with a leading task dimension, so the trainer can `vmap`
over it. A source is built from its own config section (`task:` in the YAML) by `build_source`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class TaskBatch:
    support_x: torch.Tensor  # [B, Ns, *input_shape]
    support_y: torch.Tensor  # [B, Ns] float (regression) or long (classification)
    query_x: torch.Tensor  # [B, Nq, *input_shape]
    query_y: torch.Tensor  # [B, Nq]

    def to(self, device) -> "TaskBatch":
        return TaskBatch(*(t.to(device) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))

    def shard(self, rank: int, world: int) -> "TaskBatch":
        """This process's contiguous slice of the tasks (DDP over the task batch)."""
        b = self.support_x.shape[0]
        per = b // world
        sl = slice(rank * per, (rank + 1) * per)
        return TaskBatch(self.support_x[sl], self.support_y[sl], self.query_x[sl], self.query_y[sl])


class TaskSource(Protocol):
    kind: str  # "regression" | "classification"
    loss: str  # "mse" | "cross_entropy"

    def model_spec_defaults(self) -> dict:
        """in_features, out_features and input_transform for the model (fitted on meta-train only)."""

    def sample(self, split: str, batch: int, shots: int, query: int, generator: torch.Generator) -> TaskBatch:
        """`batch` tasks from `split` ("train" | "val" | "test"). For classification, `shots` is per class."""

    def pretrain_batch(self, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples pooled over training tasks for the joint-training baseline (global labels)."""

    def describe(self) -> dict:
        """Plain data for the checkpoint and the bundle manifest: feature names, class names, ..."""


def build_source(cfg: dict) -> TaskSource:
    from . import registry

    return registry.build(cfg)
