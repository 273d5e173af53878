"""Fast path for the meta-loss: a plain Linear/activation MLP under MSE, the inner loop batched over tasks by hand.

Same maths as `vmap(adapt)` + `task_loss` in `algorithms.py`, but the inner gradient is the MLP's backward
written out as batched matmuls (and the activation's derivative), so a meta-batch costs a few dozen tensor ops
instead of `vmap(grad(functional_call))` per op. Autograd still differentiates the result for the meta-gradient,
so second order is exact: every op of the hand-written backward is differentiable, and ReLU's mask has zero
derivative, as in autograd.

Supported: `meta_train.model.MLP` with ReLU or Tanh hidden layers, any parameter-free input transform (identity,
standardize, spectrum: applied once per batch), MSE, all parameters adapted (no ANIL), final-step query loss
(no MAML++ multi-step loss), fixed / per-parameter / per-layer-per-step inner rates, learned or not, first or
second order; and Reptile's displacement. Anything else takes the generic path; so does everything when
`ENABLED` is False (or `fast=False` is passed to `algorithms.meta_loss` / `meta_gradient`).
"""

from __future__ import annotations

import torch
from torch import nn

from .inner import step_lr
from .model import MLP

ENABLED = True  # default for algorithms.meta_loss / meta_gradient / reptile_displacement when fast=None

_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh"}


def layers(model) -> tuple[list[tuple[str, str]], str] | None:
    """([(weight name, bias name)] of the Linear layers in order, activation) or None if unsupported."""
    if type(model) is not MLP:  # a subclass may override forward
        return None
    if any(True for _ in model.transform.parameters()):  # a learnable transform would need its own gradient
        return None
    names, acts = [], set()
    modules = list(model.body)
    for idx, m in enumerate(modules):
        expect_linear = idx % 2 == 0
        if expect_linear and type(m) is nn.Linear and m.bias is not None:
            names.append((f"body.{idx}.weight", f"body.{idx}.bias"))
        elif not expect_linear and type(m) in _ACTIVATIONS:
            acts.add(_ACTIVATIONS[type(m)])
        else:
            return None
    if len(modules) % 2 or len(acts) > 1 or model.head.bias is None:
        return None
    return names + [("head.weight", "head.bias")], (acts.pop() if acts else "relu")


def _squeezed(model) -> bool:
    return int(model.spec["out_features"]) == 1 and bool(model.spec.get("squeeze", True))


def plan(model, inner, step_weights, params: dict, batch):
    """`layers(model)` if the fast path computes exactly what the generic path would for this call, else None."""
    if inner.loss != "mse" or inner.head_only or step_weights is not None:
        return None
    spec = layers(model)
    if spec is None:
        return None
    if len(params) != 2 * len(spec[0]) or any(w not in params or b not in params for w, b in spec[0]):
        return None
    out = int(model.spec["out_features"])
    want = 2 if _squeezed(model) else 3  # targets [B, K] (squeezed scalar output) or [B, K, out]
    for y in (batch.support_y, batch.query_y):
        if not y.is_floating_point() or y.dim() != want or (want == 3 and y.shape[-1] != out):
            return None
    return spec


def supported(model, inner, step_weights, params: dict, batch) -> bool:
    """Whether `query_losses` computes exactly what the generic path would for this call."""
    return plan(model, inner, step_weights, params, batch) is not None


def _linear(x, w, b):
    # x [B, N, in]; w [out, in] (shared) or [B, out, in] (per task); b [out] or [B, out]
    return torch.matmul(x, w.transpose(-1, -2)) + b.unsqueeze(-2)


def _act(z, act: str):
    return torch.relu(z) if act == "relu" else torch.tanh(z)


def _forward(h, ws, bs, act: str):
    for i in range(len(ws)):
        h = _linear(h, ws[i], bs[i])
        if i < len(ws) - 1:
            h = _act(h, act)
    return h  # [B, N, out]


def _grads(ws, bs, x, y, act: str, with_loss: bool = False):
    """Per-task gradients of the mean-over-elements MSE: ([B, out, in] per layer, [B, out] per layer).

    x [B, K, in]; y [B, K, out]. Plain differentiable ops, so autograd can differentiate them again.
    """
    n = len(ws)
    outs, h = [x], x
    for i in range(n):
        z = _linear(h, ws[i], bs[i])
        h = z if i == n - 1 else _act(z, act)
        outs.append(h)
    err = outs[-1] - y
    d = err * (2.0 / (y.shape[-2] * y.shape[-1]))  # dL/dout, [B, K, out]
    gw, gb = [None] * n, [None] * n
    for i in reversed(range(n)):
        gw[i] = torch.matmul(d.transpose(-1, -2), outs[i])
        gb[i] = d.sum(-2)
        if i:
            d = torch.matmul(d, ws[i])
            a = outs[i]  # the activation's output; both derivatives are functions of it, as in autograd
            d = d * (a > 0) if act == "relu" else d * (1 - a * a)
    if with_loss:
        return gw, gb, (err * err).mean((-2, -1))
    return gw, gb


def _targets(model, y):
    return y.unsqueeze(-1) if _squeezed(model) else y


def _adapt(names, act, params, lrs, x, y, steps: int, first_order: bool):
    """`steps` SGD steps on (x, y) for every task at once. Returns per-task (weights, biases)."""
    ws = [params[w] for w, _ in names]
    bs = [params[b] for _, b in names]
    for step in range(steps):
        if first_order:  # FOMAML: the inner gradient is a constant (identity Jacobian through the update)
            with torch.no_grad():
                gw, gb = _grads([w.detach() for w in ws], [b.detach() for b in bs], x, y, act)
        else:
            gw, gb = _grads(ws, bs, x, y, act)
        ws = [w - step_lr(lrs, wn, step) * g for (wn, _), w, g in zip(names, ws, gw)]
        bs = [b - step_lr(lrs, bn, step) * g for (_, bn), b, g in zip(names, bs, gb)]
    return ws, bs


def query_losses(model, inner, params, lrs, batch, first_order: bool, spec=None) -> torch.Tensor:
    """Per-task query MSE after inner.steps SGD steps on the support set: shape [B]. `spec`: plan()'s result."""
    names, act = spec or layers(model)
    sx, qx = model.transform(batch.support_x), model.transform(batch.query_x)
    sy, qy = _targets(model, batch.support_y), _targets(model, batch.query_y)
    ws, bs = _adapt(names, act, params, lrs, sx, sy, inner.steps, first_order)
    return ((_forward(qx, ws, bs, act) - qy) ** 2).mean((-2, -1))


def first_order_gradient(model, inner, params, lrs, batch, learn: dict, spec=None) -> tuple[torch.Tensor, dict, dict]:
    """First-order meta-gradient with no autograd at all: (mean query loss, param grads, grads of `learn` lrs).

    With the inner gradient cut, each adapted parameter is `p - sum_s lr_s * g_s` with `g_s` a constant, so the
    meta-gradient of p is the task-mean of the query gradient G at the adapted weights (identity Jacobian), and
    that of a rate used at step s is the task-mean of `-g_s * G`, summed down to the rate's shape.
    """
    names, act = spec or layers(model)
    with torch.no_grad():
        sx, qx = model.transform(batch.support_x), model.transform(batch.query_x)
        sy, qy = _targets(model, batch.support_y), _targets(model, batch.query_y)
        ws = [params[w].detach() for w, _ in names]
        bs = [params[b].detach() for _, b in names]
        rates = {n: r.detach() for n, r in lrs.items()}
        inner_grads = []  # [(gw, gb)] per step, kept only if some rate learns
        for step in range(inner.steps):
            gw, gb = _grads(ws, bs, sx, sy, act)
            if learn:
                inner_grads.append((gw, gb))
            ws = [w - step_lr(rates, wn, step) * g for (wn, _), w, g in zip(names, ws, gw)]
            bs = [b - step_lr(rates, bn, step) * g for (_, bn), b, g in zip(names, bs, gb)]
        qw, qb, losses = _grads(ws, bs, qx, qy, act, with_loss=True)
        batch_size = qx.shape[0]
        per_task = {}
        for (wn, bn), gw, gb in zip(names, qw, qb):
            per_task[wn], per_task[bn] = gw, gb
        param_grads = {n: per_task[n].mean(0) for n in params}  # per task: [B, *shape]
        lr_grads = {n: torch.zeros_like(r) for n, r in learn.items()}
        for step, (gw, gb) in enumerate(inner_grads):
            step_grads = {}
            for (wn, bn), w, b in zip(names, gw, gb):
                step_grads[wn], step_grads[bn] = w, b
            for n in learn:
                contrib = -(step_grads[n] * per_task[n]) / batch_size  # [B, *param shape] (or shared)
                idx = min(step, lr_grads[n].shape[0] - 1)
                lr_grads[n][idx] += contrib.sum_to_size(lr_grads[n][idx].shape)
    return losses.mean(), param_grads, lr_grads


def reptile(model, inner, params, lrs, x, y, spec=None) -> tuple[torch.Tensor, dict]:
    """Reptile on (x, y) = support + query: (mean adapted loss, params - task-averaged adapted params)."""
    names, act = spec or layers(model)
    with torch.no_grad():
        detached = {n: p.detach() for n, p in params.items()}
        rates = {n: r.detach() for n, r in lrs.items()}
        x, y = model.transform(x), _targets(model, y)
        ws, bs = _adapt(names, act, detached, rates, x, y, inner.steps, first_order=True)
        loss = ((_forward(x, ws, bs, act) - y) ** 2).mean()
        grads = {}
        for (wn, bn), w, b in zip(names, ws, bs):
            grads[wn] = detached[wn] - w.mean(0)
            grads[bn] = detached[bn] - b.mean(0)
    return loss, {n: grads[n] for n in params}
