"""The MAML paper's sinusoid regression (Finn et al., 2017, section 5.1), exactly as published.

Amplitude U[0.1, 5.0], phase U[0, pi], x U[-5, 5], MSE. Every task is fresh, so the splits differ only
by which generator draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import from_dict
from . import TaskBatch


@dataclass
class SinusoidOptions:
    amplitude_min: float = 0.1
    amplitude_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = math.pi
    x_min: float = -5.0
    x_max: float = 5.0


class SinusoidSource:
    kind = "regression"
    loss = "mse"

    def __init__(self, opts: SinusoidOptions):
        self.opts = opts

    @classmethod
    def from_config(cls, cfg: dict) -> "SinusoidSource":
        return cls(from_dict(SinusoidOptions, cfg, "task"))

    def model_spec_defaults(self) -> dict:
        return {"in_features": 1, "out_features": 1, "input_transform": None}

    def _tasks(self, batch: int, generator: torch.Generator):
        o = self.opts
        amp = o.amplitude_min + (o.amplitude_max - o.amplitude_min) * torch.rand(batch, 1, generator=generator)
        phase = o.phase_min + (o.phase_max - o.phase_min) * torch.rand(batch, 1, generator=generator)
        return amp, phase

    def _points(self, amp, phase, n: int, generator):
        o = self.opts
        x = o.x_min + (o.x_max - o.x_min) * torch.rand(amp.shape[0], n, 1, generator=generator)
        y = amp * torch.sin(x[..., 0] - phase)
        return x, y

    def sample(self, split: str, batch: int, shots: int, query: int, generator: torch.Generator) -> TaskBatch:
        amp, phase = self._tasks(batch, generator)
        sx, sy = self._points(amp, phase, shots, generator)
        qx, qy = self._points(amp, phase, query, generator)
        return TaskBatch(sx, sy, qx, qy)

    def pretrain_batch(self, size: int, generator: torch.Generator):
        amp, phase = self._tasks(size, generator)
        x, y = self._points(amp, phase, 1, generator)
        return x[:, 0], y[:, 0]

    def describe(self) -> dict:
        return {"name": "sinusoid", "kind": self.kind, "feature_names": ["x"], "target_name": "y", "class_names": None}
