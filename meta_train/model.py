"""The networks. They know nothing of training: a spec dict in, an nn.Module out.

A spec is plain JSON-able data so that a checkpoint describes its own architecture:

    {"in_features": 4, "hidden": [40, 40], "out_features": 1, "activation": "relu",
     "input_transform": {"kind": "standardize", "mean": [...], "std": [...]},   # + "clip": c (robust)
     "target_transform": {"kind": "affine", "center": c, "scale": s}}            # optional, regression

The network itself works in model units, (y - center) / scale: the target transform is applied where labels
come in and predictions go out (the table source, export/trace.py, eval's reported MSE), never in forward.

Input transforms are fixed buffers, not parameters: the inner loop never touches them, and they travel
inside every exported graph, so the device applies exactly the workstation's preprocessing.
"""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class Standardize(nn.Module):
    """(x - mean) / std, then clipped to [-clip, clip] when a clip is given (robust scaling, meta_train/scaling.py)."""

    def __init__(self, mean, std, clip: float | None = None):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-8))
        self.clip = None if clip is None else float(clip)

    def forward(self, x):
        z = (x - self.mean) / self.std
        return z if self.clip is None else z.clamp(-self.clip, self.clip)


class Spectrum(nn.Module):
    """Log-magnitude spectrum of a vibration window, averaged into `bins` bands.

    Written as a matmul with a fixed DFT basis rather than torch.fft: it exports to every ONNX opset
    and TorchScript identically, and the device runs the very same arithmetic.
    """

    def __init__(self, window: int, bins: int):
        super().__init__()
        n_freq = window // 2
        t = torch.arange(window, dtype=torch.float64)
        f = torch.arange(1, n_freq + 1, dtype=torch.float64)  # skip DC: a sensor offset is not a fault
        angle = 2 * torch.pi * t[:, None] * f[None, :] / window
        hann = 0.5 - 0.5 * torch.cos(2 * torch.pi * t / window)
        self.register_buffer("cos_basis", (hann[:, None] * torch.cos(angle)).float())
        self.register_buffer("sin_basis", (hann[:, None] * torch.sin(angle)).float())
        pool = torch.zeros(n_freq, bins, dtype=torch.float64)
        edges = torch.linspace(0, n_freq, bins + 1).round().long()
        for b in range(bins):
            pool[edges[b] : edges[b + 1], b] = 1.0 / max(int(edges[b + 1] - edges[b]), 1)
        self.register_buffer("pool", pool.float())

    def forward(self, x):
        x = x - x.mean(dim=-1, keepdim=True)
        power = (x @ self.cos_basis) ** 2 + (x @ self.sin_basis) ** 2
        return torch.log1p(power @ self.pool)


def build_input_transform(spec: dict | None) -> nn.Module:
    if not spec or spec.get("kind") in (None, "none"):
        return nn.Identity()
    if spec["kind"] == "standardize":
        return Standardize(spec["mean"], spec["std"], spec.get("clip"))
    if spec["kind"] == "spectrum":
        return Spectrum(int(spec["window"]), int(spec["bins"]))
    raise ValueError(f"unknown input transform kind {spec['kind']!r}")


def transformed_features(spec: dict) -> int:
    transform = spec.get("input_transform") or {}
    if transform.get("kind") == "spectrum":
        return int(transform["bins"])
    return int(spec["in_features"])


class MLP(nn.Module):
    """Body of hidden layers and a separate `head`, so ANIL can name the head's parameters."""

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec
        self.transform = build_input_transform(spec.get("input_transform"))
        act = ACTIVATIONS[spec.get("activation", "relu")]
        layers, width = [], transformed_features(spec)
        for h in spec["hidden"]:
            layers += [nn.Linear(width, h), act()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, int(spec["out_features"]))

    def forward(self, x):
        out = self.head(self.body(self.transform(x)))
        return out.squeeze(-1) if self.spec["out_features"] == 1 and self.spec.get("squeeze", True) else out


def build_model(spec: dict) -> nn.Module:
    if spec.get("kind", "mlp") == "cnn1d":
        from .cnn import CNN1D  # windows of cycles x sensors (meta_train/cnn.py)

        return CNN1D(spec)
    return MLP(spec)


def head_names(params: dict) -> list[str]:
    return [n for n in params if n.startswith("head.")]


def init_params(model: nn.Module, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Fresh parameters with PyTorch's default Linear init, drawn from `generator` for reproducibility."""
    params = {}
    named = dict(model.named_parameters())
    for name, p in named.items():
        # fan-in of the layer's weight: in_features for Linear, in_channels x kernel for Conv1d
        weight = p if p.dim() >= 2 else named[name.rsplit(".", 1)[0] + ".weight"]
        bound = (1.0 / weight[0].numel()) ** 0.5
        params[name] = (torch.rand(p.shape, generator=generator) * 2 - 1) * bound
    return params
