"""The fast path's meta-gradient for fixed one-number inner rates (MAML, FOMAML, fixed MAML++ rates), in TorchScript.

Same maths as `fast_mlp.first_order_gradient` / `second_order_gradient` (hand-derived backward; second order as
reverse mode through the unrolled inner SGD with Hessian-vector products), restricted to what most training runs
use: every inner rate a fixed number per layer and step (no learned or per-parameter rates: those stay on the
Python path). Why a second copy of the maths:
- a meta-batch is ~440 tensor ops at 5 inner steps; the TorchScript interpreter runs each with ~0.5 us less
  overhead than a Python call (at 100 tasks the gradient is ~10 % faster on one core);
- it runs without the GIL, so the tasks of a meta-batch can be split across threads (`threads`; the trainer
  passes `train.threads`), each chunk on one core. The Python path could not: its per-op Python time serialises
  on the GIL (two threads measured slower than one). Per-task matrices this small parallelise better over tasks
  than inside each op (torch's intra-op threads).
The kernels are compiled on first use (TorchScript, deprecated in favour of torch.compile but kept by the pinned
torch 2.13: torch.compile measured slower here, after a 17 s compile). Chunk results are summed in a fixed order,
so a run is reproducible for a given thread count.
"""

from __future__ import annotations

import warnings
from typing import List, Tuple

import torch
from torch import Tensor

# Below this many multiply-adds (~0.1 ms on one core) a chunk costs more in thread hand-off than it saves
# (measured on a 2-core box: 25 tasks x 1 second-order step, ~5e6 in all, ran slower split in two).
MIN_CHUNK_WORK = 3.5e6


def _linear(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """x @ w^T + b. x [B, N, in]; w [out, in] (shared) or [B, out, in]; b [out] or [B, out]."""
    if x.size(-1) == 1:  # an outer product: a broadcast multiply is several times cheaper than a matmul
        return torch.addcmul(b.unsqueeze(-2), x, w.transpose(-1, -2))
    if w.dim() == 2:
        return torch.nn.functional.linear(x, w, b)
    return torch.baddbmm(b.unsqueeze(-2), x, w.transpose(-1, -2))


def _times_w(d: Tensor, w: Tensor) -> Tensor:
    """d @ w. d [B, N, out]."""
    if d.size(-1) == 1:
        return d * w
    if w.dim() == 2:
        return torch.matmul(d, w)
    return torch.bmm(d, w)


def _sgd_weight(w: Tensor, d: Tensor, x: Tensor, lr: float) -> Tensor:
    """w - lr * d^T x per task, the gradient never formed for a matrix input (one baddbmm)."""
    if x.size(-1) == 1:
        return torch.sub(w, (d * x).sum(-2).unsqueeze(-1), alpha=lr)
    return torch.baddbmm(w, d.transpose(-1, -2), x, alpha=-lr)


def _forward(x: Tensor, ws: List[Tensor], bs: List[Tensor], relu: bool) -> Tuple[List[Tensor], List[Tensor]]:
    """Layer inputs/outputs [x, h1, ..., out] and the activations' derivatives (index i: of outs[i]; 0 unused)."""
    n = len(ws)
    outs: List[Tensor] = [x]
    derivs: List[Tensor] = [x]
    h = x
    for i in range(n):
        h = _linear(h, ws[i], bs[i])
        if i < n - 1:
            if relu:
                h = torch.relu_(h)
                derivs.append(torch.sign(h))  # ReLU's mask as 0/1 (h >= 0)
            else:
                h = torch.tanh_(h)
                derivs.append(1 - h * h)
        outs.append(h)
    return outs, derivs


def _support_step(ws: List[Tensor], bs: List[Tensor], x: Tensor, y: Tensor, lr_w: List[float], lr_b: List[float],
                  relu: bool, scale: float):
    """One inner SGD step on every task: (new weights, new biases, layer outputs, derivatives, dL/dz per layer,
    d @ W per layer (tanh only))."""
    n = len(ws)
    outs, derivs = _forward(x, ws, bs, relu)
    d = (outs[n] - y).mul_(scale)
    ds: List[Tensor] = [d] * n
    ts: List[Tensor] = [d] * n
    new_w: List[Tensor] = [d] * n
    new_b: List[Tensor] = [d] * n
    for j in range(n):
        i = n - 1 - j
        ds[i] = d
        new_w[i] = _sgd_weight(ws[i], d, outs[i], lr_w[i])
        new_b[i] = torch.sub(bs[i], d.sum(-2), alpha=lr_b[i])
        if i > 0:
            t = _times_w(d, ws[i])
            if relu:
                d = t.mul_(derivs[i])
            else:
                ts[i] = t
                d = t * derivs[i]
    return new_w, new_b, outs, derivs, ds, ts


def _query_gradient(ws: List[Tensor], bs: List[Tensor], x: Tensor, y: Tensor, relu: bool, tasks: float,
                    reduce: bool) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """(summed per-task query MSE / tasks, dL/dW, dL/db) of the mean over `tasks` tasks; per task, or summed."""
    n = len(ws)
    outs, derivs = _forward(x, ws, bs, relu)
    err = outs[n] - y
    loss = (err * err).sum() / (tasks * y.size(-2) * y.size(-1))
    d = err.mul_(2.0 / (tasks * y.size(-2) * y.size(-1)))
    gw: List[Tensor] = [d] * n
    gb: List[Tensor] = [d] * n
    for j in range(n):
        i = n - 1 - j
        x_i = outs[i]
        if reduce:
            gw[i] = torch.mm(d.reshape(-1, d.size(-1)).t(), x_i.reshape(-1, x_i.size(-1)))
            gb[i] = d.sum([0, 1])
        else:
            gw[i] = (d * x_i).sum(-2).unsqueeze(-1) if x_i.size(-1) == 1 else torch.bmm(d.transpose(-1, -2), x_i)
            gb[i] = d.sum(-2)
        if i > 0:
            t = _times_w(d, ws[i])
            d = t.mul_(derivs[i]) if relu else t * derivs[i]
    return loss, gw, gb


def first_order(ws: List[Tensor], bs: List[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                lr_w: List[List[float]], lr_b: List[List[float]], relu: bool,
                tasks: float) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """FOMAML: the query gradient at the adapted weights, summed over this chunk's tasks (divided by `tasks`)."""
    scale = 2.0 / (sy.size(-2) * sy.size(-1))
    for s in range(len(lr_w)):
        ws, bs, _o, _d, _ds, _t = _support_step(ws, bs, sx, sy, lr_w[s], lr_b[s], relu, scale)
    return _query_gradient(ws, bs, qx, qy, relu, tasks, True)


def _sub_outer(acc: Tensor, d: Tensor, x: Tensor):
    """acc -= d^T x: per task ([B, out, in]) or, for a shared acc ([out, in]), summed over tasks."""
    if acc.dim() == 2:
        acc.addmm_(d.reshape(-1, d.size(-1)).t(), x.reshape(-1, x.size(-1)), alpha=-1.0)
    elif x.size(-1) == 1:
        acc.sub_((d * x).sum(-2).unsqueeze(-1))
    else:
        acc.baddbmm_(d.transpose(-1, -2), x, alpha=-1.0)


def _hvp_sub(ws: List[Tensor], outs: List[Tensor], derivs: List[Tensor], ds: List[Tensor], ts: List[Tensor],
             vw: List[Tensor], vb: List[Tensor], lr_w: List[float], lr_b: List[float], relu: bool, scale: float,
             lw: List[Tensor], lb: List[Tensor]):
    """lw, lb -= H (lr_w * vw, lr_b * vb) in place, H the support loss's per-task Hessian at `ws` (R-operator
    through the forward and backward of the step; ReLU's mask has zero derivative). lw/lb may be vw/vb
    themselves (each layer's direction is read before that layer's accumulator is written) or shared
    ([out, in] / [out]: the task-sum). See fast_mlp._hvp_sub_ for the derivation."""
    n = len(ws)
    r: List[Tensor] = [outs[0]]  # r[i] = R(outs[i]); R(input) = 0, never read
    for i in range(n):
        x = outs[i]
        if x.size(-1) == 1:
            rz = torch.addcmul(vb[i].unsqueeze(-2) * lr_b[i], x, vw[i].transpose(-1, -2), value=lr_w[i])
        else:
            rz = torch.baddbmm(vb[i].unsqueeze(-2), x, vw[i].transpose(-1, -2), beta=lr_b[i], alpha=lr_w[i])
        if i > 0:
            w = ws[i]
            if r[i].size(-1) == 1:
                rz.addcmul_(r[i], w.transpose(-1, -2))
            elif w.dim() == 2:
                rz.view(-1, rz.size(-1)).addmm_(r[i].reshape(-1, r[i].size(-1)), w.t())
            else:
                rz.baddbmm_(r[i], w.transpose(-1, -2))
        if i < n - 1:
            rz = rz.mul_(derivs[i + 1])
        r.append(rz)
    rd = r[n].mul_(scale)  # R(dL/dout)
    for j in range(n):
        i = n - 1 - j
        rt = rd
        if i > 0:  # R(d @ W) = R(d) @ W + d @ V, before lw[i] (which may be vw[i]) changes
            rt = _times_w(rd, ws[i])
            if ds[i].size(-1) == 1:
                rt.addcmul_(ds[i], vw[i], value=lr_w[i])
            else:
                rt.baddbmm_(ds[i], vw[i], alpha=lr_w[i])
        _sub_outer(lw[i], rd, outs[i])
        if i > 0:
            _sub_outer(lw[i], ds[i], r[i])
        lb[i].sub_(rd.sum([0, 1]) if lb[i].dim() == 1 else rd.sum(-2))
        if i > 0:
            rd = rt.mul_(derivs[i])
            if not relu:
                rd.sub_(2.0 * ts[i] * outs[i] * r[i])


def second_order(ws: List[Tensor], bs: List[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
                 lr_w: List[List[float]], lr_b: List[List[float]], relu: bool,
                 tasks: float) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """MAML: reverse mode through the unrolled inner SGD; lam_s = lam_{s+1} - H_s (a_s lam_{s+1}), lam_S the
    per-task query gradient; the shared initialisation's gradient is the task-sum of lam_0 (divided by `tasks`)."""
    scale = 2.0 / (sy.size(-2) * sy.size(-1))
    steps = len(lr_w)
    tape_w: List[List[Tensor]] = []
    tape_outs: List[List[Tensor]] = []
    tape_derivs: List[List[Tensor]] = []
    tape_ds: List[List[Tensor]] = []
    tape_ts: List[List[Tensor]] = []
    for s in range(steps):
        tape_w.append(ws)
        ws, bs, outs, derivs, ds, ts = _support_step(ws, bs, sx, sy, lr_w[s], lr_b[s], relu, scale)
        tape_outs.append(outs)
        tape_derivs.append(derivs)
        tape_ds.append(ds)
        tape_ts.append(ts)
    loss, lw, lb = _query_gradient(ws, bs, qx, qy, relu, tasks, steps == 0)
    for j in range(steps):
        s = steps - 1 - j
        if s == 0:  # theta_0 is shared: accumulate the task-sum of lam_0 directly
            acc_w = [v.sum(0) for v in lw]
            acc_b = [v.sum(0) for v in lb]
        else:
            acc_w, acc_b = lw, lb
        _hvp_sub(tape_w[s], tape_outs[s], tape_derivs[s], tape_ds[s], tape_ts[s], lw, lb, lr_w[s], lr_b[s], relu,
                 scale, acc_w, acc_b)
        lw, lb = acc_w, acc_b
    return loss, lw, lb


def _combine(results: List[Tuple[Tensor, List[Tensor], List[Tensor]]]) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    loss, gw, gb = results[0]
    for k in range(1, len(results)):
        other_loss, other_w, other_b = results[k]
        loss = loss + other_loss
        for i in range(len(gw)):
            gw[i].add_(other_w[i])
            gb[i].add_(other_b[i])
    return loss, gw, gb


def _kernel(second: bool, ws: List[Tensor], bs: List[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
            lr_w: List[List[float]], lr_b: List[List[float]], relu: bool,
            tasks: float) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    if second:
        return second_order(ws, bs, sx, sy, qx, qy, lr_w, lr_b, relu, tasks)
    return first_order(ws, bs, sx, sy, qx, qy, lr_w, lr_b, relu, tasks)


def chunked(second: bool, ws: List[Tensor], bs: List[Tensor], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor,
            lr_w: List[List[float]], lr_b: List[List[float]], relu: bool, tasks: float,
            bounds: List[int]) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """The kernel on tasks [bounds[c], bounds[c+1]) for each c, in parallel: the first chunk here, the others on
    torch's inter-op thread pool (torch.jit.fork; one thread per core by default); summed in chunk order."""
    futures = [torch.jit.fork(_kernel, second, ws, bs, sx[bounds[c]:bounds[c + 1]], sy[bounds[c]:bounds[c + 1]],
                              qx[bounds[c]:bounds[c + 1]], qy[bounds[c]:bounds[c + 1]], lr_w, lr_b, relu, tasks)
               for c in range(1, len(bounds) - 1)]
    end = bounds[1]
    results = [_kernel(second, ws, bs, sx[:end], sy[:end], qx[:end], qy[:end], lr_w, lr_b, relu, tasks)]
    for f in futures:
        results.append(torch.jit.wait(f))
    return _combine(results)


# --------------------------------------------------------------------------- rates, chunks, threads

def fixed_rates(rates: dict, names, steps: int) -> tuple[list[list[float]], list[list[float]]] | None:
    """Per step, per layer, the (weight, bias) inner rates as Python floats, or None if any is not one number."""
    per_name = {}
    for wn, bn in names:
        for name in (wn, bn):
            r = rates[name]
            if r[0].numel() != 1:
                return None
            per_name[name] = r.reshape(-1).tolist()  # one float per trained step (one conversion per tensor)
    # inner.step_lr: beyond the trained steps the last rate carries on
    pick = [[per_name[name][min(step, len(per_name[name]) - 1)] for name in names_of]
            for step in range(steps) for names_of in ([wn for wn, _ in names], [bn for _, bn in names])]
    return pick[0::2], pick[1::2]


def chunks_for(tasks: int, work_per_task: float, threads: int) -> int:
    """How many threads to split `tasks` over: at most `threads`, each chunk at least MIN_CHUNK_WORK."""
    return max(1, min(threads, tasks, int(tasks * work_per_task // MIN_CHUNK_WORK)))


def work_per_task(ws, shots: int, queries: int, steps: int, second_order: bool) -> float:
    """Multiply-adds per task, roughly: matrix products per inner step (forward, backward, update; six more for
    each step's Hessian-vector product) and the query pass, over the support or query rows."""
    weights = sum(w.shape[-1] * w.shape[-2] for w in ws)
    per_step = 9 if second_order else 3
    return weights * (shots * per_step * steps + queries * 3)


_COMPILED: dict = {}


def _script(fn):
    """fn compiled by TorchScript, once per process."""
    if fn not in _COMPILED:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=DeprecationWarning)
            _COMPILED[fn] = torch.jit.script(fn)
    return _COMPILED[fn]


def gradient(kernel, ws, bs, sx, sy, qx, qy, lr_w, lr_b, relu: bool, threads: int = 1):
    """(mean query loss, [dW], [db]) over the batch. With threads > 1 (CPU), `kernel` runs on contiguous chunks
    of tasks in parallel (`chunked`), as many as the work is worth (`chunks_for`), torch's intra-op threads at 1
    during the call. A training loop should keep them at 1 throughout (train.meta_threads): OpenMP threads
    spinning after an intra-op parallel region elsewhere in the loop would take the cores the chunks run on."""
    tasks = sx.shape[0]
    second = kernel is second_order
    n = 1
    if threads > 1 and sx.device.type == "cpu":
        n = chunks_for(tasks, work_per_task(ws, sx.shape[-2], qx.shape[-2], len(lr_w), second), threads)
    if n == 1:
        return _script(kernel)(ws, bs, sx, sy, qx, qy, lr_w, lr_b, relu, float(tasks))
    bounds = [tasks * c // n for c in range(n + 1)]
    previous = torch.get_num_threads()
    # Each chunk on one core. Also what torch's inter-op pool threads take as their intra-op count when the first
    # fork starts them: without this a caller at 2 intra-op threads would leave every chunk running 2 more.
    torch.set_num_threads(1)
    try:
        return _script(chunked)(second, ws, bs, sx, sy, qx, qy, lr_w, lr_b, relu, float(tasks), bounds)
    finally:
        torch.set_num_threads(previous)
