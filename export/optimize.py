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
- ReLU's backward `where(h <= 0, 0, g)` (h the ReLU's output) -> `g * sign(h)`: h >= 0, so sign(h) is the
  0/1 mask; ONNX Runtime runs LessOrEqual + Where in ~1.3 us on [10, 40], Sign + Mul in ~0.7 (and
  onnx_export.py then turns that Sign into a vectorised HardSigmoid, ~0.45 with the Mul)
- the first layer (its input is the same every step) as one matrix `[W^T; b]` against `[A, 1]`: one Gemm
  per step updates W and b
- the flat state output `cat([p.view(-1), ...])` -> `cat([p as a [1, k] row, ...], 1).view(-1)`: biases
  (kept as rows) and [1, k] weights need no reshape of their own

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
            row.meta["row"] = True
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


def _relu_mask(gm) -> int:
    """threshold_backward(g, relu(z), 0) -> g * sign(relu(z)). Exact: the ReLU output is >= 0, so
    sign() is 1 where it is positive and 0 where it is zero, the mask `where(h <= 0, 0, g)` applies.
    (Only a non-finite g or h can differ, inf * 0 = nan instead of 0: the state is non-finite either way.)"""
    changed = 0
    for n in list(gm.graph.nodes):
        if not (_is(n, aten.threshold_backward.default) and n.args[2] == 0 and _is(n.args[1], aten.relu.default)):
            continue
        g, h = n.args[0], n.args[1]
        mask = _insert(gm.graph, n, aten.sign.default, (h,), like=h)
        n.replace_all_uses_with(_insert(gm.graph, n, aten.mul.Tensor, (g, mask), like=n))
        changed += 1
    return changed


def _users(n) -> set:
    return set(n.users)


def _first_layer_chain(gm, w0: fx.Node):
    """The unrolled steps of a layer whose input A is the same node in every step (the first layer):
    [(W_t, b_t, forward_t, W update, b update, G_t, alpha_t)] for t < S, and (W_S, b_S); else None.

    forward_t = addmm(b_t, A, t(W_t)); W_{t+1} = addmm(W_t, t(G_t), A, alpha=a); b_{t+1} = addmm(b_t, ones, G_t,
    alpha=a) (a [1, out] row), with one scalar rate a per step for both (not MAML++'s per-tensor rates)."""
    w, b, a_node, steps = w0, None, None, []
    while True:
        ts = [u for u in w.users if _is(u, aten.t.default)]
        upd_w = [u for u in w.users if _is(u, aten.addmm.default) and u.args[0] is w and _is(u.args[1], aten.t.default)]
        if not ts and not upd_w:
            return (steps, w, b) if steps else None
        if len(ts) != 1 or len(upd_w) != 1 or _users(w) != {ts[0], upd_w[0]} or len(ts[0].users) != 1:
            return None
        fwd = next(iter(ts[0].users))
        if not (_is(fwd, aten.addmm.default) and not fwd.kwargs and fwd.args[2] is ts[0]):
            return None
        bias, a = fwd.args[0], fwd.args[1]
        uw = upd_w[0]
        g = uw.args[1].args[0]
        if (a_node is not None and a is not a_node) or uw.args[2] is not a or (b is not None and bias is not b):
            return None
        a_node = a
        upd_b = [u for u in bias.users if u is not fwd]
        if len(upd_b) != 1 or _users(bias) != {fwd, upd_b[0]}:
            return None
        ub = upd_b[0]
        if not (_is(ub, aten.addmm.default) and ub.args[0] is bias and ub.args[2] is g
                and _is(ub.args[1], aten.unsqueeze.default) and ub.args[1].args[1] == 0):
            return None
        kw_w, kw_b = dict(uw.kwargs), dict(ub.kwargs)
        if kw_w != kw_b or kw_w.get("beta", 1.0) != 1.0 or set(kw_w) - {"alpha", "beta"}:
            return None
        steps.append((w, bias, fwd, uw, ub, g, kw_w.get("alpha", 1.0)))
        w, b = uw, ub


def _augment_first_layer(gm) -> int:
    """The first layer's weight and bias as one matrix V = [W^T; b] ([in + 1, out]) against the
    step-invariant input padded with a column of ones, A1 = [A, 1]: forward A1 @ V, update
    V - lr * A1^T G, one Gemm per step instead of two (W's and b's). Exact: the same products and sums.
    Applied when the steps saved outnumber the nodes it adds (the pad, and splitting V at the end)."""
    for w0 in [n for n in gm.graph.nodes if n.op == "get_attr"]:
        w0_value = getattr(gm, w0.target)
        if not isinstance(w0_value, torch.Tensor) or w0_value.dim() != 2:
            continue
        found = _first_layer_chain(gm, w0)
        if found is None:
            continue
        steps, w_last, b_last = found
        b0 = _const(gm, steps[0][1])
        a = steps[0][2].args[1]
        a_shape = _shape(a)
        if b0 is None or b0.dim() != 1 or a_shape is None or len(a_shape) != 2:
            continue
        n_in, n_out = int(w0_value.shape[1]), int(w0_value.shape[0])
        if len(steps) <= (0 if n_in == 1 else 2):  # the final split costs two nodes unless in == 1
            continue
        graph = gm.graph
        name = "_first_layer_aug"
        gm.register_buffer(name, torch.cat([w0_value.t(), b0.reshape(1, -1)], 0).contiguous())
        first_fwd = steps[0][2]
        with graph.inserting_before(first_fwd):
            v = graph.get_attr(name)
        a1 = _insert(graph, first_fwd, aten.constant_pad_nd.default, (a, [0, 1], 1.0))  # [A, 1]: one Pad
        a1_t = _insert(graph, first_fwd, aten.t.default, (a1,))
        for _, _, fwd, uw, ub, g, alpha in steps:
            fwd.replace_all_uses_with(_insert(graph, fwd, aten.mm.default, (a1, v), like=fwd))
            v = _insert(graph, uw, aten.addmm.default, (v, a1_t, g), {"beta": 1.0, "alpha": alpha})
        w_t = _insert(graph, w_last, aten.slice.Tensor, (v, 0, 0, n_in))
        if n_in == 1:  # W^T [1, out] holds W [out, 1] in the same order
            w_new = _insert(graph, w_last, aten.view.default, (w_t, [n_out, 1]))
        else:  # contiguous, so that reshapes of it stay views
            w_new = _insert(graph, w_last, aten.clone.default, (_insert(graph, w_last, aten.t.default, (w_t,)),),
                            {"memory_format": torch.contiguous_format})
        b_new = _insert(graph, w_last, aten.slice.Tensor, (v, 0, n_in, n_in + 1))
        b_new.meta["row"] = True
        w_new.meta["aug_w"] = b_new.meta["aug_b"] = v
        w_new.meta["aug_in"] = n_in
        for old, new in ((w_last, w_new), (b_last, b_new)):
            old.replace_all_uses_with(new)
        graph.eliminate_dead_code()
        return 1
    return 0


def _row_of(n):
    """`n` itself when it is a [1, k] row already (a kept bias row, a one-output weight), else None."""
    if n.meta.get("row"):
        return n
    shape = _shape(n)
    return n if shape is not None and len(shape) == 2 and shape[0] == 1 else None


def _state_rows(gm) -> int:
    """output cat([view(p, [-1]), ...]) -> view(cat([row(p), ...], 1), [-1]) when that saves reshapes."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    cat = out.args[0]
    if not _is(cat, aten.cat.default) or cat.kwargs or (len(cat.args) > 1 and cat.args[1] not in (0, -1)):
        return 0
    pieces = cat.args[0]
    if not all(_is(p, aten.view.default) and list(p.args[1]) == [-1] for p in pieces):
        return 0
    if sum(_row_of(p.args[0]) is not None for p in pieces) < 2:  # otherwise no fewer nodes
        return 0
    rows, srcs = [], [p.args[0] for p in pieces]
    i = 0
    while i < len(srcs):
        src = srcs[i]
        v = src.meta.get("aug_w")
        if v is not None and i + 1 < len(srcs) and srcs[i + 1].meta.get("aug_b") is v and src.meta["aug_in"] == 1:
            # in == 1: W^T [1, out] flattened is W [out, 1] flattened, so [W^T; b] is both pieces as they are
            rows.append(_insert(gm.graph, cat, aten.view.default, (v, [1, -1])))
            i += 2
            continue
        rows.append(_row_of(src) or _insert(gm.graph, cat, aten.reshape.default, (src, [1, -1])))
        i += 1
    joined = _insert(gm.graph, cat, aten.cat.default, (rows, 1))
    cat.replace_all_uses_with(_insert(gm.graph, cat, aten.view.default, (joined, [-1]), like=cat))
    return 1


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
        changed = _identities(gm) + _hoist_scalar_factor(gm) + _cancel_squeeze(gm) + _relu_mask(gm)
        changed += _sgd_updates(gm, support_w) + _keep_bias_rows(gm) + _drop_keepdim(gm)
        gm.graph.eliminate_dead_code()
        changed += _cse(gm)
        gm.graph.eliminate_dead_code()
        if not changed:
            break
    if _augment_first_layer(gm):
        _cse(gm)
    _state_rows(gm)
    gm.graph.eliminate_dead_code()
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
