"""Input and target scaling of a table source: fitted on the meta-train tasks only, carried in the model spec.

Inputs (`task.scaling.inputs`):
- standard: (x - mean) / std.
- robust: (x - median) / (IQR / 1.349), then clipped to [-clip, clip]. IQR / 1.349 equals the standard
  deviation for normally distributed data, so a robust-scaled column reads like a standardised one, but a
  few huge readings (a sensor glitch) neither inflate the scale of the column nor reach the network as
  values 50 scale units out: one such row in a support set otherwise makes an inner step of size
  inner_lr * 50^2 and the meta-loss goes to inf.
- none: the raw values.

Target (`task.scaling.target`, regression only): none, standard or robust (median / (IQR / 1.349), never
clipped: the loss and every reported error are against the true labels). The network is trained on
(y - center) / scale; the exported graphs take labels in the user's units and return predictions in them
(export/trace.py), and `meta-train eval` reports MSE in the user's units (model-unit MSE * scale^2).

The fitted numbers are plain lists in the model spec, the one place the trainer, eval and export read them.
"""

from __future__ import annotations

import numpy as np

INPUT_MODES = ("standard", "robust", "none")
TARGET_MODES = ("none", "standard", "robust")
IQR_TO_STD = 1.349  # the IQR of a normal distribution in standard deviations


def _centre_scale(values: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre, scale, constant) per column of `values` [n, F]; a zero scale becomes 1 (and is reported)."""
    values = values.astype(np.float64)
    std = values.std(0)
    if mode == "robust":
        q1, median, q3 = np.percentile(values, [25, 50, 75], axis=0)
        centre, scale = median, (q3 - q1) / IQR_TO_STD
        scale = np.where(scale < 1e-12, std, scale)  # a mostly-constant (e.g. on/off) column: its std
    else:
        centre, scale = values.mean(0), std
    constant = scale < 1e-12
    return centre, np.where(constant, 1.0, scale), constant


def fit_inputs(x: np.ndarray, mode: str, clip: float | None) -> tuple[dict | None, np.ndarray]:
    """The `input_transform` spec for features `x` [n, F] (None for mode none) and a mask of constant columns."""
    if mode == "none":
        return None, np.zeros(x.shape[1], dtype=bool)
    centre, scale, constant = _centre_scale(x, mode)
    spec = {"kind": "standardize", "mean": centre.tolist(), "std": scale.tolist()}
    if mode == "robust" and clip is not None:
        spec["clip"] = float(clip)
    return spec, constant


def fit_target(y: np.ndarray, mode: str) -> dict | None:
    """The `target_transform` spec for regression labels `y` [n] (None for mode none)."""
    if mode == "none":
        return None
    centre, scale, _ = _centre_scale(y.reshape(-1, 1), mode)
    return {"kind": "affine", "center": float(centre[0]), "scale": float(scale[0])}


def target_affine(spec: dict) -> tuple[float, float]:
    """(center, scale) of the model's target transform; (0, 1) when it has none."""
    t = spec.get("target_transform") or {}
    if t.get("kind") == "affine":
        return float(t["center"]), float(t["scale"])
    return 0.0, 1.0


def mse_to_user_units(spec: dict) -> float:
    """Factor from an MSE in model units to one in the user's units."""
    return target_affine(spec)[1] ** 2
