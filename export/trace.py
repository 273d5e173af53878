"""The two exported functions, as flat-state functions traced to plain aten graphs.

`adapt` is `meta_train.inner.adapt` itself, with the meta-learned parameters and inner rates closed over
as constants, so the bundle runs the very inner loop that training and evaluation ran. `make_fx` runs
`torch.func.grad` while tracing and records the resulting forward + backward as ordinary aten ops: the
exporters never see autograd, which neither the ONNX exporter nor a non-deprecated TorchScript path
can handle. Tracing is symbolic, so the support size N (and the query size M) stay dynamic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

from meta_train.inner import adapt
from meta_train.scaling import target_affine
from meta_train.trained import Trained

from .errors import ExportError


def _free_size(start: int, stop: int, taken: set[int]) -> int:
    for n in range(start, stop + 1):
        if n not in taken:
            return n
    return stop


def example_sizes(model: torch.nn.Module, params: dict, max_support: int) -> tuple[int, int]:
    """Example N (support) and M (query) for symbolic tracing.

    Neither may be 0 or 1 (specialised on) nor equal any static size of the model: symbolic tracing
    gives equal sizes one symbol, so N = in_features = 4 would make the exported N a constant 4.
    N must also lie in [1, max_support]; 1 only when that is the whole range.
    """
    tensors = list(params.values()) + list(model.buffers())
    taken = {int(d) for t in tensors for d in t.shape} | {int(d) for d in input_shape(model.spec)}
    taken.add(sum(p.numel() for p in params.values()))
    n = _free_size(2, max_support, taken) if max_support >= 2 else 1
    m = _free_size(3, 10_000, taken | {n})
    return n, m


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class StateLayout:
    """Where each parameter lives in the flat state vector; this order is `manifest.state_layout`."""

    def __init__(self, params: dict[str, torch.Tensor]):
        entries, offset = [], 0
        for name, p in params.items():
            entries.append(Entry(name, tuple(int(d) for d in p.shape), offset))
            offset += p.numel()
        self.entries: list[Entry] = entries
        self.size = offset

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[e.name].reshape(-1) for e in self.entries])

    def unflatten(self, state: torch.Tensor) -> dict[str, torch.Tensor]:
        return {e.name: state[e.offset : e.offset + e.size].view(e.shape) for e in self.entries}

    def to_json(self) -> list[dict]:
        return [{"name": e.name, "shape": list(e.shape), "offset": e.offset} for e in self.entries]


def input_shape(spec: dict) -> list[int]:
    transform = spec.get("input_transform") or {}
    if transform.get("kind") == "spectrum":
        return [int(transform["window"])]
    return [int(spec["in_features"])]


def task_kind(trained: Trained) -> str:
    return "classification" if trained.algorithm.inner.loss == "cross_entropy" else "regression"


class Functions:
    """Eager flat-state adapt/predict: the reference the exported graphs are checked against."""

    def __init__(self, trained: Trained, steps: int | None = None):
        self.trained = trained
        self.model = trained.model
        self.cfg = trained.algorithm.inner
        self.steps = self.cfg.steps if steps is None else int(steps)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        self.params = {n: p.detach().float() for n, p in trained.params.items()}
        self.lrs = {n: r.detach().float() for n, r in trained.inner_lrs.items()}
        bad = [n for n, t in {**self.params, **{f"inner rate {k}": v for k, v in self.lrs.items()}}.items()
               if not bool(torch.isfinite(t).all())]
        if bad:  # said plainly here, not found later as a parity failure between NaN graphs
            raise ExportError(f"the checkpoint contains non-finite parameters ({', '.join(bad[:5])}"
                              f"{', ...' if len(bad) > 5 else ''}): the run diverged; retrain it (docs/tasks.md, "
                              "task.scaling; a smaller algorithm.inner_lr) or export an earlier finite checkpoint")
        # Labels in and predictions out are in the user's units; the network works in model units.
        self.y_center, self.y_scale = target_affine(trained.spec)
        self.layout = StateLayout(self.params)
        self.kind = task_kind(trained)
        self.input_shape = input_shape(trained.spec)
        if self.kind == "regression" and int(trained.spec["out_features"]) != 1:
            # bundle.md's predict output is [M] for regression: one target per model
            raise ValueError(f"regression bundles have one output; this model has {trained.spec['out_features']}")

    def init_state(self) -> torch.Tensor:
        return self.layout.flatten(self.params)

    def to_model_units(self, y):
        if self.kind == "classification" or (self.y_center, self.y_scale) == (0.0, 1.0):
            return y
        return (y - self.y_center) * (1.0 / self.y_scale)

    def to_user_units(self, y):
        if self.kind == "classification" or (self.y_center, self.y_scale) == (0.0, 1.0):
            return y
        return y * self.y_scale + self.y_center

    def adapt(self, support_x, support_y, support_w):
        adapted = adapt(self.model, self.params, self.lrs, support_x, self.to_model_units(support_y), self.cfg,
                        steps=self.steps, support_w=support_w)
        return self.layout.flatten(adapted)

    def predict(self, state, x):
        out = functional_call(self.model, self.layout.unflatten(state), (x,))
        if self.kind == "classification":
            return torch.softmax(out, dim=-1)
        return self.to_user_units(out.reshape(out.shape[0]))  # [M] even for a spec with squeeze: false

    def example_inputs(self, max_support: int):
        n, m = example_sizes(self.model, self.params, max_support)
        sx = torch.randn(n, *self.input_shape)
        if self.kind == "classification":
            sy = torch.randint(0, int(self.trained.spec["out_features"]), (n,))
        else:
            sy = torch.randn(n)
        return (sx, sy, torch.ones(n)), (self.init_state(), torch.randn(m, *self.input_shape))


def trace(fns: Functions, max_support: int, optimize: bool = True) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """(adapt, predict) as aten-level GraphModules with dynamic N (unless max_support is 1) and M.

    `optimize` applies export/optimize.py's node-count rewrites; off, the graphs are autograd's verbatim.
    """
    adapt_args, predict_args = fns.example_inputs(max_support)

    # Plain functions with named arguments: make_fx counts a bound method's `self` as an input. The
    # closed-over parameters are real tensors, hence _allow_non_fake_inputs: they become graph constants.
    def adapt_fn(support_x, support_y, support_w):
        return fns.adapt(support_x, support_y, support_w)

    def predict_fn(state, x):
        return fns.predict(state, x)

    with torch.no_grad():  # torch.func.grad still differentiates inside; the outer graph records no autograd
        adapt_gm = make_fx(adapt_fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*adapt_args)
        predict_gm = make_fx(predict_fn, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*predict_args)
    if optimize:
        from .optimize import simplify_adapt, simplify_predict

        adapt_gm, predict_gm = simplify_adapt(adapt_gm), simplify_predict(predict_gm)
    return adapt_gm, predict_gm
