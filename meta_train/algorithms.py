"""The MAML family as meta-gradients of one vectorised function.

Each algorithm is a setting of the same pieces: which inner rates exist and whether they learn, whether
the inner gradient is cut (first order), which parameters the inner loop touches (ANIL), and how the
query loss is weighted over the inner steps (MAML++'s multi-step loss). Reptile is the odd one out: its
meta-gradient is the displacement `params - adapted`, not a derivative of a query loss.

The tasks of a meta-batch are handled by `vmap`, not a Python loop. For the common case (a plain ReLU/Tanh MLP
under MSE, see `fast_mlp.supported`) a batched fast path computes the same loss with the inner gradient written
as batched matmuls; the vmap path below stays the reference and the fallback. `fast=False` (or
`fast_mlp.ENABLED = False`) forces the generic path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import vmap

from . import fast_mlp
from .config import AlgorithmConfig
from .inner import InnerConfig, adapt, task_loss

PRESETS = {
    #          lr_mode               learn  first_order  head_only  multi_step_loss
    "maml": ("fixed", False, False, False, False),
    "fomaml": ("fixed", False, True, False, False),
    "reptile": ("fixed", False, True, False, False),
    "metasgd": ("per_param", True, False, False, False),
    "anil": ("fixed", False, False, True, False),
    "mamlpp": ("per_layer_per_step", True, False, False, True),
}


@dataclass(frozen=True)
class Algorithm:
    name: str
    inner: InnerConfig
    first_order: bool
    multi_step_loss: bool
    msl_iterations: int
    first_order_until: int
    reptile_inner_lr: float

    def first_order_at(self, iteration: int) -> bool:
        # MAML++ derivative-order annealing: cheap first-order steps early, exact second order after.
        return self.first_order or iteration < self.first_order_until


def resolve(acfg: AlgorithmConfig, loss: str) -> Algorithm:
    lr_mode, learn, first_order, head_only, msl = PRESETS[acfg.name]
    pick = lambda explicit, default: default if explicit is None else explicit  # noqa: E731
    inner = InnerConfig(
        steps=acfg.inner_steps,
        lr=acfg.reptile_inner_lr if acfg.name == "reptile" else acfg.inner_lr,
        lr_mode=pick(acfg.lr_mode, lr_mode),
        learn_lr=pick(acfg.learn_inner_lr, learn),
        head_only=head_only,
        loss=loss,
    )
    return Algorithm(
        name=acfg.name,
        inner=inner,
        first_order=pick(acfg.first_order, first_order),
        multi_step_loss=pick(acfg.multi_step_loss, msl),
        msl_iterations=acfg.msl_iterations,
        first_order_until=acfg.first_order_until,
        reptile_inner_lr=acfg.reptile_inner_lr,
    )


def msl_weights(steps: int, iteration: int, msl_iterations: int) -> torch.Tensor:
    """MAML++ per-step query-loss weights: uniform at first, annealed onto the final step."""
    weights = torch.full((steps,), 1.0 / steps)
    if steps == 1:
        return torch.ones(1)
    decay = 1.0 / steps / max(msl_iterations, 1)
    progress = min(iteration, msl_iterations)
    min_non_final = 0.03 / steps
    weights[:-1] = torch.clamp(weights[:-1] - progress * decay, min=min_non_final)
    weights[-1] = 1.0 - weights[:-1].sum()
    return weights


def _query_loss(model, alg: Algorithm, params, lrs, sx, sy, qx, qy, first_order, step_weights):
    inner = alg.inner
    if step_weights is None:
        adapted = adapt(model, params, lrs, sx, sy, inner, first_order=first_order)
        return task_loss(model, adapted, qx, qy, inner.loss)
    per_step = adapt(model, params, lrs, sx, sy, inner, first_order=first_order, trajectory=True)
    losses = torch.stack([task_loss(model, p, qx, qy, inner.loss) for p in per_step])
    return (losses * step_weights).sum()


def _step_weights(alg: Algorithm, iteration: int):
    use_msl = alg.multi_step_loss and iteration < alg.msl_iterations and alg.inner.steps > 1
    return msl_weights(alg.inner.steps, iteration, alg.msl_iterations) if use_msl else None


def _fast(fast: bool | None) -> bool:
    return fast_mlp.ENABLED if fast is None else fast


def _plan(model, alg: Algorithm, params, batch, iteration: int, fast: bool | None):
    if not _fast(fast):
        return None
    if alg.name == "reptile":
        return fast_mlp.plan(model, alg.inner, None, params, batch) if alg.inner.steps >= 1 else None
    return fast_mlp.plan(model, alg.inner, _step_weights(alg, iteration), params, batch)


def uses_fast_path(model, alg: Algorithm, params, batch, iteration: int = 0, fast: bool | None = None) -> bool:
    """Whether meta_gradient takes the batched-MLP fast path for this call (else the generic vmap path)."""
    return _plan(model, alg, params, batch, iteration, fast) is not None


def splits_tasks(model, alg: Algorithm, params, lrs, batch, iteration: int = 0, fast: bool | None = None) -> bool:
    """Whether meta_gradient's `threads` applies to this call: the fast path's TorchScript kernels (no learned inner
    rate; not Reptile)."""
    spec = _plan(model, alg, params, batch, iteration, fast)
    return spec is not None and alg.name != "reptile" and fast_mlp.scripted(model, alg.inner, lrs, spec)


def meta_loss(model, alg: Algorithm, params, lrs, batch, iteration: int = 0, fast: bool | None = None) -> torch.Tensor:
    """Mean query loss over the meta-batch after adaptation; differentiable w.r.t. params and lrs.

    `fast` (default `fast_mlp.ENABLED`): use the batched-MLP path when the model and loss allow it.
    """
    step_weights = _step_weights(alg, iteration)
    first_order = alg.first_order_at(iteration)
    spec = fast_mlp.plan(model, alg.inner, step_weights, params, batch) if _fast(fast) else None
    if spec is not None:
        return fast_mlp.query_losses(model, alg.inner, params, lrs, batch, first_order, spec).mean()

    def one_task(p, r, sx, sy, qx, qy):
        return _query_loss(model, alg, p, r, sx, sy, qx, qy, first_order, step_weights)

    losses = vmap(one_task, in_dims=(None, None, 0, 0, 0, 0))(
        params, lrs, batch.support_x, batch.support_y, batch.query_x, batch.query_y
    )
    return losses.mean()


def reptile_displacement(
    model, alg: Algorithm, params, lrs, batch, fast: bool | None = None
) -> tuple[torch.Tensor, dict]:
    """Reptile's meta-gradient: params minus the task-averaged adapted params (support + query as data)."""
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    spec = _plan(model, alg, params, batch, 0, fast)
    if spec is not None:
        return fast_mlp.reptile(model, alg.inner, params, lrs, x, y, spec)
    detached = {n: p.detach() for n, p in params.items()}

    def one_task(xt, yt):
        adapted = adapt(model, detached, lrs, xt, yt, alg.inner, first_order=True)
        return adapted, task_loss(model, adapted, xt, yt, alg.inner.loss)

    adapted, losses = vmap(one_task)(x, y)
    grads = {n: detached[n] - adapted[n].mean(0) for n in params}
    return losses.mean().detach(), grads


def meta_gradient(model, alg: Algorithm, params, lrs, batch, iteration: int = 0, fast: bool | None = None,
                  threads: int = 1):
    """(loss, grads for params, grads for learnable lrs). Gradients are of the mean over this batch.

    `fast` (default `fast_mlp.ENABLED`): use the batched-MLP path when the model and loss allow it.
    `threads`: where that path runs as TorchScript (`splits_tasks`), split the tasks over up to this many threads.
    """
    if alg.name == "reptile":
        loss, grads = reptile_displacement(model, alg, params, lrs, batch, fast)
        return loss, grads, {}
    learn = {n: r for n, r in lrs.items() if r.requires_grad}
    spec = _plan(model, alg, params, batch, iteration, fast)
    if spec is not None:
        # The fast path: the hand-derived meta-gradient, no autograd. First order: the query gradient at the
        # adapted weights; second order: reverse mode through the unrolled inner loop (Hessian-vector products).
        if alg.first_order_at(iteration):
            return fast_mlp.first_order_gradient(model, alg.inner, params, lrs, batch, learn, spec, threads)
        return fast_mlp.second_order_gradient(model, alg.inner, params, lrs, batch, learn, spec, threads)
    loss = meta_loss(model, alg, params, lrs, batch, iteration, fast)
    leaves = list(params.values()) + list(learn.values())
    all_grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    names = list(params) + [f"lr:{n}" for n in learn]
    grads = {n: (g if g is not None else torch.zeros_like(leaf)) for n, g, leaf in zip(names, all_grads, leaves)}
    param_grads = {n: grads[n] for n in params}
    lr_grads = {n: grads[f"lr:{n}"] for n in learn}
    return loss.detach(), param_grads, lr_grads
