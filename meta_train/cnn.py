"""A 1D-CNN over windows of cycles x sensors, the shape of Li, Ding & Sun's DCNN (RESS 172, 2018).

    {"kind": "cnn1d", "in_features": 14, "window": 30, "channels": [10, 10, 10, 10], "kernel": 10,
     "hidden": [100], "activation": "tanh", "out_features": 1, "input_transform": {...}}

Input [..., W, sensors]. Convolutions run along time with the sensors as input channels, "same" padding so
every layer keeps W steps; then a 1-channel convolution (kernel 3) as in the DCNN, the flattened W values
through the dense layers and a separate `head` (ANIL adapts only `head.*`). The DCNN convolves every sensor
with the same 10x1 kernels before mixing them; here the first layer mixes sensors already, the usual Conv1d
reading of that shape (documented in docs/tasks.md).

Only functional use matters: the trainer calls it through `torch.func.functional_call` with a parameter dict
and `vmap`s over tasks, so forward must be a pure function of (parameters, x) with any leading batch dims.
"""

from __future__ import annotations

import torch
from torch import nn

from .model import ACTIVATIONS, build_input_transform


def _same(kernel: int) -> nn.Module:
    # explicit zero padding that keeps the length (padding="same" copies the input for even kernels, with a warning)
    return nn.ConstantPad1d(((kernel - 1) // 2, kernel // 2), 0.0)


class CNN1D(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.transform = build_input_transform(spec.get("input_transform"))
        act = ACTIVATIONS[spec.get("activation", "tanh")]
        kernel = int(spec.get("kernel", 10))
        layers, width = [], int(spec["in_features"])
        for c in spec.get("channels", [10, 10, 10, 10]):
            layers += [_same(kernel), nn.Conv1d(width, int(c), kernel), act()]
            width = int(c)
        layers += [_same(3), nn.Conv1d(width, 1, 3), act()]
        self.conv = nn.Sequential(*layers)
        dense, width = [], int(spec["window"])
        for h in spec.get("hidden", [100]):
            dense += [nn.Linear(width, int(h)), act()]
            width = int(h)
        self.body = nn.Sequential(*dense)
        self.head = nn.Linear(width, int(spec["out_features"]))

    def forward(self, x):
        x = self.transform(x)
        lead = x.shape[:-2]
        z = self.conv(x.reshape(-1, *x.shape[-2:]).transpose(-1, -2))  # [n, sensors, W] -> [n, 1, W]
        out = self.head(self.body(z.reshape(*lead, -1)))
        return out.squeeze(-1) if self.spec["out_features"] == 1 else out
