"""The inner loop: a pure function of (parameters, inner rates, support set).

One `adapt()` serves meta-training, evaluation and export. Parameters are a dict of tensors; the
gradient comes from `torch.func.grad` over `functional_call`, so the same code runs per task, under
`vmap` over a meta-batch, and under `make_fx` tracing for export. Nothing is cloned or patched.

Inner learning rates are a dict `name -> tensor of shape [S, ...]` broadcastable to the parameter:
S = 1 means one rate for every step, S = steps gives MAML++'s per-step rates. A scalar rate, Meta-SGD's
per-parameter rates and MAML++'s per-layer per-step rates are all this one representation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad


@dataclass(frozen=True)
class InnerConfig:
    steps: int = 1
    lr: float = 0.01
    lr_mode: str = "fixed"  # fixed | per_param (Meta-SGD) | per_layer_per_step (MAML++)
    learn_lr: bool = False
    head_only: bool = False  # ANIL
    loss: str = "mse"  # mse | cross_entropy


LR_MODES = ("fixed", "per_param", "per_layer_per_step")


def init_inner_lrs(params: dict, cfg: InnerConfig) -> dict[str, torch.Tensor]:
    if cfg.lr_mode not in LR_MODES:
        raise ValueError(f"inner lr_mode must be one of {LR_MODES}, got {cfg.lr_mode!r}")
    lrs = {}
    for name, p in params.items():
        if cfg.lr_mode == "per_param":
            lrs[name] = torch.full((1, *p.shape), cfg.lr)
        elif cfg.lr_mode == "per_layer_per_step":
            lrs[name] = torch.full((cfg.steps,) + (1,) * p.dim(), cfg.lr)
        else:
            lrs[name] = torch.full((1,) + (1,) * p.dim(), cfg.lr)
    return lrs


def step_lr(lrs: dict, name: str, step: int) -> torch.Tensor:
    rates = lrs[name]
    # Beyond the trained steps (evaluating 10 steps after training 5) the last learned rate continues.
    return rates[min(step, rates.shape[0] - 1)]


def loss_value(pred: torch.Tensor, target: torch.Tensor, kind: str, weight: torch.Tensor | None = None):
    if kind == "mse":
        per_sample = (pred - target) ** 2
    elif kind == "cross_entropy":
        per_sample = F.cross_entropy(pred, target.long(), reduction="none")
    else:
        raise ValueError(f"unknown loss {kind!r}")
    if weight is None:
        return per_sample.mean()
    return (per_sample * weight).sum() / weight.sum().clamp_min(1e-6)


def task_loss(model, params, x, y, kind, weight=None):
    return loss_value(functional_call(model, params, (x,)), y, kind, weight)


def adaptable_names(params: dict, cfg: InnerConfig) -> list[str]:
    if cfg.head_only:
        return [n for n in params if n.startswith("head.")]
    return list(params)


def adapt(
    model,
    params: dict,
    lrs: dict,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    cfg: InnerConfig,
    *,
    steps: int | None = None,
    first_order: bool = False,
    support_w: torch.Tensor | None = None,
    trajectory: bool = False,
):
    """Gradient steps on the support set. Returns the adapted dict (or the list after each step).

    `first_order` cuts the graph through the inner gradient (FOMAML): the adapted parameters still
    depend on the initial ones, with the identity as Jacobian.
    """
    steps = cfg.steps if steps is None else steps
    names = adaptable_names(params, cfg)
    frozen = {n: p for n, p in params.items() if n not in names}
    fast = {n: params[n] for n in names}

    def support_loss(fast_params):
        return task_loss(model, {**frozen, **fast_params}, support_x, support_y, cfg.loss, support_w)

    after_each = []
    for step in range(steps):
        grads = grad(support_loss)(fast)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        fast = {n: fast[n] - step_lr(lrs, n, step) * grads[n] for n in names}
        if trajectory:
            after_each.append({**frozen, **fast})
    return after_each if trajectory else {**frozen, **fast}
