"""Fast path for the meta-gradient: a plain Linear/activation MLP under MSE, the inner loop batched over tasks by hand.

Same maths as `vmap(adapt)` + `task_loss` in `algorithms.py`, but the inner gradient is the MLP's backward
written out as batched matmuls (and the activation's derivative), so a meta-batch costs a few dozen tensor ops
instead of `vmap(grad(functional_call))` per op. `meta_gradient` uses no autograd at all on this path:
first order (`first_order_gradient`) is the hand-derived backward at the adapted weights; second order
(`second_order_gradient`) is reverse mode through the unrolled inner loop written out by hand, with the
support loss's Hessian-vector products as the R-operator through the same batched forward and backward.
`query_losses` builds the same loss from differentiable ops, for `meta_loss` (autograd; exact second order:
every op of the hand-written backward is differentiable, and ReLU's mask has zero derivative, as in autograd).

Supported: `meta_train.model.MLP` with ReLU or Tanh hidden layers, any parameter-free input transform (identity,
standardize, spectrum: applied once per batch), MSE, all parameters adapted (no ANIL), final-step query loss
(no MAML++ multi-step loss), fixed / per-parameter / per-layer-per-step inner rates, learned or not, first or
second order; and Reptile's displacement. Anything else takes the generic path; so does everything when
`ENABLED` is False (or `fast=False` is passed to `algorithms.meta_loss` / `meta_gradient`).

When no inner rate learns and each is one number per layer and step (MAML, FOMAML, fixed MAML++ rates), the two
gradients run as fast_script's TorchScript copies of the same maths (less per-op overhead, no GIL: the tasks
can be split over threads); `SCRIPTED = False` keeps them on the Python code below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fast_script
from .inner import step_lr
from .model import MLP

ENABLED = True  # default for algorithms.meta_loss / meta_gradient / reptile_displacement when fast=None
SCRIPTED = True  # fixed one-number inner rates: the TorchScript kernels of fast_script (False: the Python below)

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
    """Whether the fast path computes exactly what the generic path would for this call."""
    return plan(model, inner, step_weights, params, batch) is not None


# Matrix products of the batched MLP. Weights are shared ([out, in]: one matmul over all B * K rows) or per task
# ([B, out, in]: batched). A contraction over a dimension of size 1 (a 1-feature input, a 1-output head) is an
# outer product: written as a broadcast multiply, several times cheaper than a batched matmul of that shape.


class _LowRank:
    """The per-task weight W - a D^T H ([B, out, in]) of a shared W ([out, in]) after one SGD step, never formed:
    products with it are one matmul with the shared W over all rows plus two thin per-task products through the
    K support points (D [B, K, out], H [B, K, in]). The thin products x H^T and d D^T are kept (`xh`, `dd`): the
    Hessian-vector product of that step needs exactly their transposes."""

    def __init__(self, w, d, h, a: float):
        self.w, self.d, self.h, self.a = w, d, h, a
        self.xh = self.dd = None

    def linear(self, x, b):  # x @ (W - a D^T H)^T + b = b - a (x H^T) D + x W^T
        self.xh = torch.bmm(x, self.h.transpose(-1, -2))
        z = torch.baddbmm(b.unsqueeze(-2), self.xh, self.d, alpha=-self.a)
        z.view(-1, z.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), self.w.t())
        return z

    def dw(self, d):  # d @ (W - a D^T H) = d W - a (d D^T) H
        self.dd = torch.bmm(d, self.d.transpose(-1, -2))
        return torch.matmul(d, self.w).baddbmm_(self.dd, self.h, alpha=-self.a)


def _linear(x, w, b):
    """x @ w^T + b. x [B, N, in]; w [out, in] or [B, out, in] (or a `_LowRank`); b [out] or [B, out]."""
    if isinstance(w, _LowRank):
        return w.linear(x, b)
    if x.shape[-1] == 1:
        return torch.addcmul(b.unsqueeze(-2), x, w.transpose(-1, -2))
    if w.dim() == 2:
        return F.linear(x, w, b)
    return torch.baddbmm(b.unsqueeze(-2), x, w.transpose(-1, -2))


def _dw(d, w):
    """d @ w. d [B, N, out]; w [out, in] or [B, out, in] (or a `_LowRank`)."""
    if isinstance(w, _LowRank):
        return w.dw(d)
    if d.shape[-1] == 1:
        return d * w
    return torch.matmul(d, w) if w.dim() == 2 else torch.bmm(d, w)


def _outer(d, h, reduce: bool):
    """Per-task d^T h ([B, out, in]), or with `reduce` its sum over tasks ([out, in], one matmul)."""
    if reduce:
        return torch.mm(d.reshape(-1, d.shape[-1]).t(), h.reshape(-1, h.shape[-1]))
    if h.shape[-1] == 1:
        return (d * h).sum(-2).unsqueeze(-1)
    return torch.bmm(d.transpose(-1, -2), h)


# In-place accumulation (no autograd involved): acc += x @ w^T, acc += d @ w, acc -= d^T h (per task, or summed
# over tasks when acc is a shared [out, in]). No temporary, no copy of acc.


def _add_xwt_(acc, x, w):
    if x.shape[-1] == 1:
        acc.addcmul_(x, w.transpose(-1, -2))
    elif w.dim() == 2:
        acc.view(-1, acc.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), w.t())
    else:
        acc.baddbmm_(x, w.transpose(-1, -2))


def _add_dw_(acc, d, w):
    if d.shape[-1] == 1:
        acc.addcmul_(d, w)
    elif w.dim() == 2:
        acc.view(-1, acc.shape[-1]).addmm_(d.reshape(-1, d.shape[-1]), w)
    else:
        acc.baddbmm_(d, w)


def _sub_outer_(acc, d, h):
    if acc.dim() == 2:
        acc.addmm_(d.reshape(-1, d.shape[-1]).t(), h.reshape(-1, h.shape[-1]), alpha=-1.0)
    elif h.shape[-1] == 1:
        acc.sub_((d * h).sum(-2).unsqueeze(-1))
    else:
        acc.baddbmm_(d.transpose(-1, -2), h, alpha=-1.0)


def _rowsum(d, reduce: bool):
    return d.sum((0, 1)) if reduce else d.sum(-2)  # d [B, K, out]


def _act(z, act: str):
    return torch.relu(z) if act == "relu" else torch.tanh(z)


def _deriv(a, act: str):
    """The activation's derivative as a function of its output `a`, as autograd computes it: ReLU's mask
    (a > 0, as 0/1: sign(a) for a >= 0; zero derivative itself), tanh's 1 - a^2."""
    return torch.sign(a) if act == "relu" else 1 - a * a


def _forward(h, ws, bs, act: str):
    for i in range(len(ws)):
        h = _linear(h, ws[i], bs[i])
        if i < len(ws) - 1:
            h = _act(h, act)
    return h  # [B, N, out]


def _grads(ws, bs, x, y, act: str, with_loss: bool = False, scale: float = 1.0, reduce: bool = False,
           tape: list | None = None, skip=()):
    """Per-task gradients of the mean-over-elements MSE: ([B, out, in] per layer, [B, out] per layer).

    x [B, K, in]; y [B, K, out]. Plain differentiable ops, so autograd can differentiate them again.
    `scale` multiplies the gradients (not the loss); `reduce` sums them over tasks; a `tape` list receives
    what `_hvp_sub_` needs (layer inputs, activation derivatives, dL/dz per layer, and for tanh d @ W per layer);
    layers in `skip` get no weight gradient (None: the caller keeps it as the factors on the tape).
    """
    n = len(ws)
    inplace = not torch.is_grad_enabled()  # fresh intermediates may be overwritten when autograd is not recording
    outs, derivs, h = [x], [None] * (n + 1), x
    for i in range(n):
        h = _linear(h, ws[i], bs[i])
        if i < n - 1:
            h = (torch.relu_(h) if act == "relu" else torch.tanh_(h)) if inplace else _act(h, act)
            derivs[i + 1] = _deriv(h, act)
        outs.append(h)
    err = outs[-1] - y
    d = err * (scale * 2.0 / (y.shape[-2] * y.shape[-1]))  # dL/dout, [B, K, out]
    gw, gb, ds, ts = [None] * n, [None] * n, [None] * n, [None] * n
    for i in reversed(range(n)):
        ds[i] = d
        gw[i] = None if i in skip else _outer(d, outs[i], reduce)
        gb[i] = _rowsum(d, reduce)
        if i:
            t = _dw(d, ws[i])
            if act != "relu":
                ts[i] = t
            d = t.mul_(derivs[i]) if inplace and act == "relu" else t * derivs[i]
    if tape is not None:
        tape.extend((outs, derivs, ds, ts))
    if with_loss:  # the loss averaged over tasks (every task has the same number of points and outputs)
        return gw, gb, (err * err).mean()
    return gw, gb


def _sgd(w, lr, g):
    return torch.addcmul(w, lr, g, value=-1.0)  # w - lr * g in one op (lr broadcast: scalar rate or per weight)


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
        ws = [_sgd(w, step_lr(lrs, wn, step), g) for (wn, _), w, g in zip(names, ws, gw)]
        bs = [_sgd(b, step_lr(lrs, bn, step), g) for (_, bn), b, g in zip(names, bs, gb)]
    return ws, bs


def query_losses(model, inner, params, lrs, batch, first_order: bool, spec=None) -> torch.Tensor:
    """Per-task query MSE after inner.steps SGD steps on the support set: shape [B]. `spec`: plan()'s result.

    Differentiable (autograd): `meta_loss` uses it; `meta_gradient` uses the hand-derived gradients below.
    """
    names, act = spec or layers(model)
    sx, qx = model.transform(batch.support_x), model.transform(batch.query_x)
    sy, qy = _targets(model, batch.support_y), _targets(model, batch.query_y)
    ws, bs = _adapt(names, act, params, lrs, sx, sy, inner.steps, first_order)
    return ((_forward(qx, ws, bs, act) - qy) ** 2).mean((-2, -1))


def _prepare(model, params, lrs, batch, names):
    sx, qx = model.transform(batch.support_x), model.transform(batch.query_x)
    sy, qy = _targets(model, batch.support_y), _targets(model, batch.query_y)
    ws = [params[w].detach() for w, _ in names]
    bs = [params[b].detach() for _, b in names]
    rates = {n: r.detach() for n, r in lrs.items()}
    return sx, sy, qx, qy, ws, bs, rates


def _by_name(names, ws, bs) -> dict:
    out = {}
    for (wn, bn), w, b in zip(names, ws, bs):
        out[wn], out[bn] = w, b
    return out


def scripted(model, inner, lrs, spec=None) -> bool:
    """Whether the gradients below run as fast_script's TorchScript kernels (no inner rate learns, each one
    number per layer and step), which can split the tasks over threads."""
    if not SCRIPTED or any(r.requires_grad for r in lrs.values()):
        return False
    names, _ = spec or layers(model)
    return fast_script.fixed_rates(lrs, names, inner.steps) is not None


def _scripted(kernel, model, inner, params, lrs, batch, learn: dict, spec, threads: int):
    """`kernel` (fast_script) when every inner rate is a fixed number per layer and step, else None."""
    if learn or not SCRIPTED:
        return None
    names, act = spec or layers(model)
    with torch.no_grad():
        sx, sy, qx, qy, ws, bs, rates = _prepare(model, params, lrs, batch, names)
        fixed = fast_script.fixed_rates(rates, names, inner.steps)
        if fixed is None:
            return None
        loss, gw, gb = fast_script.gradient(kernel, ws, bs, sx, sy, qx, qy, *fixed, act == "relu", threads)
    grads = _by_name(names, gw, gb)
    return loss, {n: grads[n] for n in params}, {}


def first_order_gradient(model, inner, params, lrs, batch, learn: dict, spec=None,
                         threads: int = 1) -> tuple[torch.Tensor, dict, dict]:
    """First-order meta-gradient with no autograd at all: (mean query loss, param grads, grads of `learn` lrs).

    With the inner gradient cut, each adapted parameter is `p - sum_s lr_s * g_s` with `g_s` a constant, so the
    meta-gradient of p is the task-mean of the query gradient G at the adapted weights (identity Jacobian), and
    that of a rate used at step s is the task-mean of `-g_s * G`, summed down to the rate's shape.
    """
    scripted = _scripted(fast_script.first_order, model, inner, params, lrs, batch, learn, spec, threads)
    if scripted is not None:
        return scripted
    names, act = spec or layers(model)
    with torch.no_grad():
        sx, sy, qx, qy, ws, bs, rates = _prepare(model, params, lrs, batch, names)
        inner_grads = []  # [(gw, gb)] per step, kept only if some rate learns
        for step in range(inner.steps):
            gw, gb = _grads(ws, bs, sx, sy, act)
            if learn:
                inner_grads.append(_by_name(names, gw, gb))
            ws = [_sgd(w, step_lr(rates, wn, step), g) for (wn, _), w, g in zip(names, ws, gw)]
            bs = [_sgd(b, step_lr(rates, bn, step), g) for (_, bn), b, g in zip(names, bs, gb)]
        # G / B: per task if a rate learns (it needs g_s * G per task), else summed over tasks in one matmul
        qw, qb, loss = _grads(ws, bs, qx, qy, act, with_loss=True, scale=1.0 / qx.shape[0], reduce=not learn)
        query = _by_name(names, qw, qb)
        lr_grads = {n: torch.zeros_like(r) for n, r in learn.items()}
        for step, step_grads in enumerate(inner_grads):
            for n in learn:
                idx = min(step, lr_grads[n].shape[0] - 1)
                lr_grads[n][idx] -= (step_grads[n] * query[n]).sum_to_size(lr_grads[n][idx].shape)
        param_grads = {n: query[n].sum(0) if learn else query[n] for n in params}
    return loss, param_grads, lr_grads


def _hvp_sub_(ws, tape, vw, vb, act: str, scale: float, lw, lb, alpha_w):
    """lw, lb -= H (alpha_w * vw, vb), in place: H the per-task Hessian of the support MSE at `ws` (and the
    biases), (alpha_w * vw, vb) a per-task direction (alpha_w: one float per layer, folded into the matmuls that
    read vw). The Hessian-vector product is the R-operator (forward-over-reverse) through `_grads`' forward and
    backward, from its `tape`; ReLU's mask has zero derivative, as in autograd; tanh's derivative 1 - a^2
    contributes -2 a R(a). lw / lb are per task ([B, out, in] / [B, out]) or, to get the sum over tasks directly,
    shared ([out, in] / [out]). vw[i] may be lw[i] itself: it is read before lw[i] is written. vw[i] may also be
    a tuple (D, H, xH, dD) standing for the per-task D^T H ([B, N, out], [B, N, in]: a query gradient never
    formed), used as two thin products (x @ H^T) @ D and (d @ D^T) @ H; xH = x @ H^T and dD = d @ D^T when already
    computed (else None). vb[i] may be a pair (v, beta) standing for beta * v (a
    one-number bias rate, folded into the `beta` of the matmul that adds it), v possibly lb[i] itself."""
    outs, derivs, ds, ts = tape
    n = len(ws)
    r = [None] * (n + 1)  # r[i] = R(outs[i]); the input does not depend on the weights: R(outs[0]) = 0
    for i in range(n):
        x, a = outs[i], alpha_w[i]
        vbi, beta = vb[i] if isinstance(vb[i], tuple) else (vb[i], 1.0)
        if isinstance(vw[i], tuple):
            dq, hq, xhq, _ = vw[i]
            xhq = torch.bmm(x, hq.transpose(-1, -2)) if xhq is None else xhq
            rz = torch.baddbmm(vbi.unsqueeze(-2), xhq, dq, beta=beta, alpha=a)
        elif x.shape[-1] == 1:  # vw is per task: [B, out, in]
            rz = torch.addcmul(vbi.unsqueeze(-2) if beta == 1.0 else vbi.unsqueeze(-2) * beta, x,
                               vw[i].transpose(-1, -2), value=a)
        else:
            rz = torch.baddbmm(vbi.unsqueeze(-2), x, vw[i].transpose(-1, -2), beta=beta, alpha=a)
        if i:
            _add_xwt_(rz, r[i], ws[i])
        r[i + 1] = rz.mul_(derivs[i + 1]) if i < n - 1 else rz
    rd = r[n].mul_(scale)  # R(dL/dout)
    for i in reversed(range(n)):
        if i:  # R(d @ W) = R(d) @ W + d @ V, before lw[i] (which vw[i] may be) changes
            rt = _dw(rd, ws[i])
            if isinstance(vw[i], tuple):
                dq, hq, _, ddq = vw[i]
                ddq = torch.bmm(ds[i], dq.transpose(-1, -2)) if ddq is None else ddq
                rt.baddbmm_(ddq, hq, alpha=alpha_w[i])
            elif ds[i].shape[-1] == 1:
                rt.addcmul_(ds[i], vw[i], value=alpha_w[i])
            else:
                rt.baddbmm_(ds[i], vw[i], alpha=alpha_w[i])
        _sub_outer_(lw[i], rd, outs[i])
        if i:
            _sub_outer_(lw[i], ds[i], r[i])
        lb[i].sub_(_rowsum(rd, lb[i].dim() == 1))
        if i:
            rd = rt.mul_(derivs[i])
            if act != "relu":
                rd.sub_(2.0 * ts[i] * outs[i] * r[i])


def second_order_gradient(model, inner, params, lrs, batch, learn: dict, spec=None,
                          threads: int = 1) -> tuple[torch.Tensor, dict, dict]:
    """Second-order meta-gradient with no autograd: (mean query loss, param grads, grads of `learn` lrs).

    Reverse mode through the unrolled inner SGD by hand. With theta_{s+1} = theta_s - a_s * g_s(theta_s) per task
    and lam_S the query gradient at the adapted weights (over B, for the batch mean), going back one step is
    lam_s = lam_{s+1} - H_s (a_s * lam_{s+1}), H_s the support-loss Hessian at theta_s (a Hessian-vector product,
    `_hvp_sub_`), and the rate a_s collects -(g_s * lam_{s+1}) summed over tasks and down to its shape. The initial
    parameters are shared, so their gradient is the task-sum of lam_0. Same maths as autograd over `query_losses`.
    Fixed scalar rates are folded into the matmuls; the inner update of a weight with a fixed scalar rate is fused
    into its gradient's matmul (W - a d^T h in one baddbmm: the per-task inner gradient is never formed or kept);
    with one inner step, the per-task query gradient of a hidden-to-hidden weight is used as its factors (d^T h),
    never formed.
    """
    scripted = _scripted(fast_script.second_order, model, inner, params, lrs, batch, learn, spec, threads)
    if scripted is not None:
        return scripted
    names, act = spec or layers(model)
    with torch.no_grad():
        sx, sy, qx, qy, ws, bs, rates = _prepare(model, params, lrs, batch, names)
        scale = 2.0 / (sy.shape[-2] * sy.shape[-1])
        # One inner step: lam_1 of a hidden-to-hidden weight is only used as a direction for the Hessian and summed
        # over tasks, so (rate a scalar, not learned) it stays as its factors d^T h per task, never formed; and so
        # does that weight after its one step (`_LowRank`), whose thin products with the query rows are the
        # transposes of the ones that Hessian-vector product needs.
        factored = set()
        if inner.steps == 1:
            factored = {i for i, ((wn, _), w) in enumerate(zip(names, ws))
                        if wn not in learn and step_lr(rates, wn, 0).numel() == 1 and min(w.shape[-2:]) > 1}
        saved = []
        for step in range(inner.steps):
            tape = []
            if step == 0 or any(r.shape[0] > step for r in rates.values()):  # else the same rates as last step
                lr_w = [step_lr(rates, wn, step) for wn, _ in names]
                lr_b = [step_lr(rates, bn, step) for _, bn in names]
                alpha_w = [float(lr) if lr.numel() == 1 else 1.0 for lr in lr_w]
                alpha_b = [float(lr) if lr.numel() == 1 else None for lr in lr_b]
            # A weight with more than one input and a one-number rate that does not learn: its update is fused into
            # the gradient's matmul (W - a d^T h in one baddbmm); the per-task gradient is never formed.
            fused = {i for i, ((wn, _), w, lr) in enumerate(zip(names, ws, lr_w))
                     if wn not in learn and lr.numel() == 1 and w.shape[-1] > 1}
            gw, gb = _grads(ws, bs, sx, sy, act, tape=tape, skip=fused)
            saved.append((ws, gw if learn else None, gb if learn else None, tape, lr_w, lr_b, alpha_w, alpha_b))
            outs, ds = tape[0], tape[2]
            ws = [_LowRank(w, ds[i], outs[i], alpha_w[i]) if i in factored
                  else torch.baddbmm(w, ds[i].transpose(-1, -2), outs[i], alpha=-alpha_w[i]) if i in fused
                  else _sgd(w, lr, g)
                  for i, (w, lr, g) in enumerate(zip(ws, lr_w, gw))]
            bs = [_sgd(b, lr, g) for b, lr, g in zip(bs, lr_b, gb)]
        qtape = []
        lw, lb, loss = _grads(ws, bs, qx, qy, act, with_loss=True, scale=1.0 / qx.shape[0],  # lam_S, per task
                              tape=qtape if factored else None, skip=factored)
        lr_grads = {n: torch.zeros_like(r) for n, r in learn.items()}
        for step in reversed(range(inner.steps)):
            ws_s, gw, gb, tape, lr_w, lr_b, alpha_w, alpha_b = saved[step]
            if learn:
                for (wn, bn), g_w, g_b, lam_w, lam_b in zip(names, gw, gb, lw, lb):
                    for name, g, lam in ((wn, g_w, lam_w), (bn, g_b, lam_b)):
                        if name in learn:
                            idx = min(step, lr_grads[name].shape[0] - 1)
                            lr_grads[name][idx] -= (g * lam).sum_to_size(lr_grads[name][idx].shape)
            # the direction a_s * lam_{s+1}: a one-number weight rate is folded into the HVP's matmuls (no copy)
            vw = []
            for i, (lr, lam) in enumerate(zip(lr_w, lw)):
                if i in factored:
                    # (dL/dz, layer input) of the query pass, and (x H^T)^T, (d D^T)^T from its products with W_1
                    xh, dd = ws[i].xh, ws[i].dd  # dd None for a first layer: no d @ W_1 there, and the HVP needs none
                    vw.append((qtape[2][i], qtape[0][i], xh.transpose(-1, -2),
                               None if dd is None else dd.transpose(-1, -2)))
                else:
                    vw.append(lam if lr.numel() == 1 else lr * lam)
            # ... and a one-number bias rate into the `beta` of the matmul that adds the bias direction (no copy)
            vb = [(lam, a) if a is not None and i and ws_s[i].shape[-1] > 1 else lr * lam
                  for i, (lr, lam, a) in enumerate(zip(lr_b, lb, alpha_b))]
            if step == 0:  # theta_0 is shared: only the task-sum of lam_0 is needed
                lw = [_outer(qtape[2][i], qtape[0][i], True) if i in factored else lam.sum(0) for i, lam in enumerate(lw)]
                lb = [lam.sum(0) for lam in lb]
            _hvp_sub_(ws_s, tape, vw, vb, act, scale, lw, lb, alpha_w)  # lam_s = lam_{s+1} - H_s v, in place
        grads = _by_name(names, lw, lb)
        param_grads = {n: grads[n] for n in params}
    return loss, param_grads, lr_grads


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
