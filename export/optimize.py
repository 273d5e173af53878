"""Rewrites of the traced adapt graph that cut its node count.

On a device the graph is overhead-bound: an MLP of a few thousand weights and a support set of ten
rows cost less arithmetic than ONNX Runtime spends dispatching each node (~0.4 us), so latency is
roughly the node count. Autograd's output is generic and wordy; these rewrites are local, exact
algebra on it (up to float rounding, which parity then measures against the eager `adapt`):

- constants captured twice become one; `t(t(x))` -> `x`; `pow(x, 1.0)` -> `x`; an expand that
  broadcasting would do anyway goes
- the loss gradient's scalar factors move onto the step-invariant weight term, and its
  squeeze/unsqueeze pair (regression, one output) cancels, so both are computed once, not per step
- `W - lr * (G^T A)` with a scalar rate -> one `addmm(W, G^T, A, alpha=-lr)` (one Gemm)
- `b - lr * sum(G, 0)` with a scalar rate -> `addmm(b, ones[1, N], G, alpha=-lr)` (one Gemm + a free
  reshape; not `b - G^T v`: ORT 1.32's MatmulTransposeFusion miscomputes a transposed matrix times a vector)
  and that bias stays a [1, out] row wherever it is only broadcast (the next Gemms, the output)
- otherwise `view(sum(G, 0, keepdim))` -> `sum(G, 0)`
- common subexpressions (the step-invariant parts of every unrolled step) are computed once

Per-element rates (Meta-SGD) keep their multiply; everything else applies to every algorithm.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten


def _is(n, *targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _shape(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _const(gm: fx.GraphModule, n):
    """The value of a node computed from constants alone by attribute access and `select`, else None."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "get_attr":
        return getattr(gm, n.target)
    if _is(n, aten.select.int):
        base = _const(gm, n.args[0])
        return None if base is None else base.select(n.args[1], n.args[2])
    return None


def _scalar_rate(gm, n):
    value = _const(gm, n)
    if value is None or value.numel() != 1:
        return None
    return float(value.reshape(()))


def _insert(graph: fx.Graph, before: fx.Node, target, args, kwargs=None, like: fx.Node | None = None):
    with graph.inserting_before(before):
        node = graph.call_function(target, tuple(args), kwargs or {})
    if like is not None and "val" in like.meta:
        node.meta["val"] = like.meta["val"]
    return node


def _dedupe_constants(gm) -> int:
    seen, changed = {}, 0
    for n in list(gm.graph.nodes):
        if n.op != "get_attr":
            continue
        t = getattr(gm, n.target)
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            n.replace_all_uses_with(seen[key])
            changed += 1
        else:
            seen[key] = n
    return changed


def _identities(gm) -> int:
    changed = 0
    for n in list(gm.graph.nodes):
        if _is(n, aten.t.default) and _is(n.args[0], aten.t.default):
            n.replace_all_uses_with(n.args[0].args[0])
            changed += 1
        elif _is(n, aten.pow.Tensor_Scalar) and n.args[1] == 1:
            n.replace_all_uses_with(n.args[0])
            changed += 1
        elif _is(n, aten.mul.Tensor) and _is(n.args[0], aten.expand.default):
            # mul(expand(scalar, [N]), w) -> mul(scalar, w): broadcasting does the expand
            e, other = n.args
            if _shape(e.args[0]) == () and _shape(other) == _shape(e) == _shape(n):
                n.replace_all_uses_with(_insert(gm.graph, n, aten.mul.Tensor, (e.args[0], other), like=n))
                changed += 1
    return changed


def _hoist_scalar_factor(gm) -> int:
    """mul(a, mul.Scalar(b, s)) -> mul(mul.Scalar(a, s), b): `a` (the weight term) is the same every step."""
    changed = 0
    for n in list(gm.graph.nodes):
        if not (_is(n, aten.mul.Tensor) and len(n.users) > 0):
            continue
        a, b = n.args
        if _is(b, aten.mul.Scalar) and not _is(a, aten.mul.Scalar) and _shape(a) == _shape(n) == _shape(b):
            scaled = _insert(gm.graph, n, aten.mul.Scalar, (a, b.args[1]), like=a)
            n.replace_all_uses_with(_insert(gm.graph, n, aten.mul.Tensor, (scaled, b.args[0]), like=n))
            changed += 1
    return changed


def _cancel_squeeze(gm) -> int:
    """unsqueeze(mul(c, sub(squeeze(z, -1), y)), 1) -> mul(unsqueeze(c, 1), sub(z, unsqueeze(y, 1)))."""
    changed = 0
    for n in list(gm.graph.nodes):
        if not (_is(n, aten.unsqueeze.default) and n.args[1] in (1, -1) and _is(n.args[0], aten.mul.Tensor)):
            continue
        mul = n.args[0]
        c, sub = mul.args
        if not _is(sub, aten.sub.Tensor) or sub.kwargs:
            continue
        sq, y = sub.args
        if not (_is(sq, aten.squeeze.dim) and sq.args[1] in (1, -1)):
            continue
        z = sq.args[0]
        one_d = _shape(mul)
        if not (one_d and len(one_d) == 1 and _shape(c) == _shape(y) == _shape(sub) == one_d
                and _shape(z) == one_d + (1,)):
            continue
        c2 = _insert(gm.graph, n, aten.unsqueeze.default, (c, 1), like=n)
        y2 = _insert(gm.graph, n, aten.unsqueeze.default, (y, 1), like=n)
        diff = _insert(gm.graph, n, aten.sub.Tensor, (z, y2), like=n)
        n.replace_all_uses_with(_insert(gm.graph, n, aten.mul.Tensor, (c2, diff), like=n))
        changed += 1
    return changed


def _rate_and_grad(gm, mul):
    a, b = mul.args
    for rate, grad in ((a, b), (b, a)):
        lr = _scalar_rate(gm, rate)
        if lr is not None:
            return lr, grad
    return None, None


def _sgd_updates(gm, ones_source: fx.Node) -> int:
    """Fold scalar-rate updates `p - lr * grad` into the gradient's own matmul."""
    changed = 0
    ones = None
    for n in list(gm.graph.nodes):
        if not (_is(n, aten.sub.Tensor) and not n.kwargs and _is(n.args[1], aten.mul.Tensor)):
            continue
        param, mul = n.args
        lr, grad = _rate_and_grad(gm, mul)
        if lr is None or _shape(param) != _shape(n):
            continue
        if _is(grad, aten.mm.default) and _is(grad.args[0], aten.t.default) and _shape(grad) == _shape(param):
            n.replace_all_uses_with(_insert(gm.graph, n, aten.addmm.default, (param, grad.args[0], grad.args[1]),
                                            {"beta": 1.0, "alpha": -lr}, like=n))
            changed += 1
            continue
        summed = grad.args[0] if _is(grad, aten.view.default) else grad
        if _is(summed, aten.sum.dim_IntList) and list(summed.args[1]) == [0] and len(_shape(param) or ()) == 1:
            g = summed.args[0]
            if _shape(g) is None or len(_shape(g)) != 2 or _shape(g)[1:] != _shape(param):
                continue
            if ones is None:  # one [1, N] row of ones, shared by every bias of every step
                first = next(n for n in gm.graph.nodes if n.op != "placeholder")
                ones = _insert(gm.graph, first, aten.unsqueeze.default,
                               (_insert(gm.graph, first, aten.ones_like.default, (ones_source,)), 0))
            row = _insert(gm.graph, n, aten.addmm.default, (param, ones, g), {"beta": 1.0, "alpha": -lr})
            flat = _insert(gm.graph, n, aten.view.default, (row, list(_shape(param))), like=n)
            flat.meta["bias_row"] = True
            n.replace_all_uses_with(flat)
            changed += 1
    return changed


def _keep_bias_rows(gm) -> int:
    """Skip the [1, out] -> [out] reshape of an updated bias whose every use broadcasts anyway: as the
    `C` of a forward or update addmm, or flattened into the output state."""
    changed = 0
    for n in list(gm.graph.nodes):
        if not (_is(n, aten.view.default) and n.meta.get("bias_row")):
            continue
        ok = all(
            (_is(u, aten.addmm.default) and u.args[0] is n and n not in u.args[1:])
            or (_is(u, aten.view.default) and list(u.args[1]) == [-1])
            for u in n.users
        )
        if ok and n.users:
            n.replace_all_uses_with(n.args[0])
            changed += 1
    return changed


def _drop_keepdim(gm) -> int:
    changed = 0
    for n in list(gm.graph.nodes):
        if not (_is(n, aten.view.default) and _is(n.args[0], aten.sum.dim_IntList)):
            continue
        s = n.args[0]
        if list(s.args[1]) == [0] and len(s.args) > 2 and s.args[2] and _shape(n) == (_shape(s) or ())[1:]:
            n.replace_all_uses_with(_insert(gm.graph, n, aten.sum.dim_IntList, (s.args[0], [0]), like=n))
            changed += 1
    return changed


def _cse(gm) -> int:
    seen, changed = {}, 0

    def key_of(v):
        if isinstance(v, (list, tuple)):
            return tuple(key_of(x) for x in v)
        if isinstance(v, fx.Node):
            return ("node", v.name)
        return (type(v).__name__, repr(v))

    for n in list(gm.graph.nodes):
        if n.op != "call_function":
            continue
        key = (str(n.target), key_of(n.args), key_of(tuple(sorted(n.kwargs.items()))))
        if key in seen:
            n.replace_all_uses_with(seen[key])
            gm.graph.erase_node(n)
            changed += 1
        else:
            seen[key] = n
    return changed


def simplify_adapt(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite the adapt graph in place (see the module docstring) and return it."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    support_w = placeholders[2]
    _dedupe_constants(gm)
    for _ in range(10):  # to a fixed point; two rounds suffice for an MLP
        changed = _identities(gm) + _hoist_scalar_factor(gm) + _cancel_squeeze(gm)
        changed += _sgd_updates(gm, support_w) + _keep_bias_rows(gm) + _drop_keepdim(gm)
        gm.graph.eliminate_dead_code()
        changed += _cse(gm)
        gm.graph.eliminate_dead_code()
        if not changed:
            break
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def simplify_predict(gm: fx.GraphModule) -> fx.GraphModule:
    _dedupe_constants(gm)
    _identities(gm)
    gm.graph.eliminate_dead_code()
    _cse(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
