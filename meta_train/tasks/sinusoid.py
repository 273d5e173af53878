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
        # One draw for the whole batch instead of four: the generator yields the same numbers in the same order
        # (amplitudes, phases, support x, query x) and every value is computed by the same ops, so the batch is
        # bit-identical to drawing them one after another (`_tasks` then `_points` twice), in fewer tensor ops.
        o = self.opts
        u = torch.rand(batch * (2 + shots + query), generator=generator)
        amp = o.amplitude_min + (o.amplitude_max - o.amplitude_min) * u[:batch].view(batch, 1)
        phase = o.phase_min + (o.phase_max - o.phase_min) * u[batch : 2 * batch].view(batch, 1)
        x = o.x_min + (o.x_max - o.x_min) * u[2 * batch :]
        sx, qx = x[: batch * shots].view(batch, shots), x[batch * shots :].view(batch, query)
        if shots == query:  # support and query in one op each
            y = amp * torch.sin(x.view(2, batch, shots) - phase)
            sy, qy = y[0], y[1]
        else:
            sy, qy = amp * torch.sin(sx - phase), amp * torch.sin(qx - phase)
        return TaskBatch(sx.unsqueeze(-1), sy, qx.unsqueeze(-1), qy)

    def pretrain_batch(self, size: int, generator: torch.Generator):
        amp, phase = self._tasks(size, generator)
        x, y = self._points(amp, phase, 1, generator)
        return x[:, 0], y[:, 0]

    def describe(self) -> dict:
        return {"name": "sinusoid", "kind": self.kind, "feature_names": ["x"], "target_name": "y", "class_names": None}
