"""The bundle proves itself: ONNX Runtime and TorchScript against the eager PyTorch reference.

The reference is `meta_train.inner.adapt` run eagerly (not the traced graph), so a tracing mistake is
caught as well as an exporter mistake. Checked on held-out (test split) tasks at support sizes 1, K and
max_support, plus K real samples padded to max_support with weight 0, the way the device pads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ParityError
from .trace import Functions

REGRESSION_TOL = 1e-4
# Two classes whose reference probabilities differ by less than this are a tie, not a disagreement.
TIE_TOL = 1e-6


@dataclass
class Case:
    support_x: torch.Tensor
    support_y: torch.Tensor
    support_w: torch.Tensor
    query_x: torch.Tensor


@dataclass
class Result:
    tasks: int
    support_sizes: list[int]
    task_source: str
    max_abs: dict = field(default_factory=dict)  # backend -> {"state": float, "y": float}
    argmax_mismatches: dict = field(default_factory=dict)

    def to_manifest(self) -> dict:
        out = {
            "onnx_max_abs": self.max_abs["onnx"]["y"],
            "torchscript_max_abs": self.max_abs["torchscript"]["y"],
            "tasks": self.tasks,
            "support_sizes": self.support_sizes,
            "padded_case": True,
            "task_source": self.task_source,
            "onnx_state_max_abs": self.max_abs["onnx"]["state"],
            "torchscript_state_max_abs": self.max_abs["torchscript"]["state"],
        }
        if self.argmax_mismatches:
            out["argmax_identical"] = not any(self.argmax_mismatches.values())
        return out


def _sample(fns: Functions, n_tasks: int, shots: int, query: int, seed: int):
    """(support_x, support_y, query_x) per task from the run's own source, test split."""
    from meta_train.tasks import build_source

    trained = fns.trained
    source = build_source(dict(trained.config.task))
    gen = torch.Generator().manual_seed(seed)
    if fns.kind == "classification":
        n_way = int(trained.spec["out_features"])
        batch = source.sample("test", n_tasks, max(1, math.ceil(shots / n_way)), max(1, math.ceil(query / n_way)), gen)
    else:
        batch = source.sample("test", n_tasks, shots, query, gen)
    # episodes carry targets in model units; the graphs take the user's (a table's task.scaling.target)
    return batch.support_x.float(), fns.to_user_units(batch.support_y), batch.query_x.float()


def _synthetic(fns: Functions, n_tasks: int, shots: int, query: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = fns.input_shape
    transform = fns.trained.spec.get("input_transform") or {}
    sx = torch.randn(n_tasks, shots, *shape, generator=gen)
    qx = torch.randn(n_tasks, query, *shape, generator=gen)
    if transform.get("kind") == "standardize":  # raw units, so the graph's normalisation is exercised
        mean, std = torch.tensor(transform["mean"]), torch.tensor(transform["std"])
        sx, qx = sx * std + mean, qx * std + mean
    if fns.kind == "classification":
        sy = torch.randint(0, int(fns.trained.spec["out_features"]), (n_tasks, shots), generator=gen)
    else:
        sy = fns.to_user_units(torch.randn(n_tasks, shots, generator=gen))
    return sx, sy, qx


def _tile(t: torch.Tensor, n: int) -> torch.Tensor:
    reps = math.ceil(n / t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:n]


def cases(fns: Functions, n_tasks: int, k: int, max_support: int, query: int = 20, seed: int = 2024):
    """Parity cases and a description of where the tasks came from."""
    try:
        sx, sy, qx = _sample(fns, n_tasks, max_support, query, seed)
        where = "test split"
    except Exception as e:  # a source whose data files are absent here: shape-true synthetic tasks
        sx, sy, qx = _synthetic(fns, n_tasks, max_support, query, seed)
        where = f"synthetic ({type(e).__name__}: {e})"[:200]
    y_dtype = torch.long if fns.kind == "classification" else torch.float32
    sizes = sorted({1, min(k, max_support), max_support})
    out = []
    for t in range(n_tasks):
        # Shuffle so the small supports are not all one class when the source groups by class.
        order = torch.randperm(sx.shape[1], generator=torch.Generator().manual_seed(seed + t))
        tx, ty = _tile(sx[t][order], max_support), _tile(sy[t][order].to(y_dtype), max_support)
        for n in sizes:
            out.append(Case(tx[:n], ty[:n], torch.ones(n), qx[t]))
        w = torch.zeros(max_support)
        w[: min(k, max_support)] = 1.0
        out.append(Case(tx, ty, w, qx[t]))
    return out, sizes, where


def check(fns: Functions, backends: dict, n_tasks: int, k: int, max_support: int) -> Result:
    """`backends`: name -> (adapt(sx, sy, sw) -> state, predict(state, x) -> y) on numpy arrays.

    Raises ParityError on the first backend that disagrees beyond tolerance, after measuring all.
    """
    all_cases, sizes, where = cases(fns, n_tasks, k, max_support)
    result = Result(tasks=n_tasks, support_sizes=sizes, task_source=where)
    classification = fns.kind == "classification"
    failures = []
    with torch.no_grad():
        refs = []
        for c in all_cases:
            ref_state = fns.adapt(c.support_x, c.support_y, c.support_w)
            refs.append((ref_state, fns.predict(ref_state, c.query_x).numpy()))
    for name, (adapt_fn, predict_fn) in backends.items():
        worst_state = worst_y = 0.0
        mismatches = 0
        for c, (ref_state, ref_y) in zip(all_cases, refs):
            args = [t.numpy() for t in (c.support_x, c.support_y, c.support_w)]
            state = np.asarray(adapt_fn(*args))
            y = np.asarray(predict_fn(state, c.query_x.numpy()))
            if state.shape != ref_state.shape or y.shape != ref_y.shape:
                raise ParityError(f"{name}: output shapes state {state.shape} / y {y.shape}, "
                                  f"reference {tuple(ref_state.shape)} / {ref_y.shape}")
            worst_state = max(worst_state, float(np.abs(state - ref_state.numpy()).max()))
            worst_y = max(worst_y, float(np.abs(y - ref_y).max()))
            if not (np.isfinite(state).all() and np.isfinite(y).all()):
                worst_state = worst_y = math.inf
            if classification:
                got, want = y.argmax(-1), ref_y.argmax(-1)
                rows = np.nonzero(got != want)[0]
                gap = np.abs(ref_y[rows, got[rows]] - ref_y[rows, want[rows]])
                mismatches += int((gap > TIE_TOL).sum())
        result.max_abs[name] = {"state": worst_state, "y": worst_y}
        if classification:
            result.argmax_mismatches[name] = mismatches
            if mismatches:
                failures.append(f"{name}: {mismatches} query predictions with a different argmax "
                                f"(max |prob diff| {worst_y:.3g})")
        # predictions are in the user's units: the tolerance scales with the target (task.scaling.target);
        # the state is in model units
        elif not worst_y <= REGRESSION_TOL * fns.y_scale or not worst_state <= REGRESSION_TOL:
            failures.append(f"{name}: max |prediction diff| {worst_y:.3g} (> {REGRESSION_TOL * fns.y_scale:.3g}) "
                            f"or max |state diff| {worst_state:.3g} (> {REGRESSION_TOL})")
    if failures:
        raise ParityError(
            f"exported graphs disagree with the PyTorch reference on {n_tasks} held-out tasks "
            f"(support sizes {sizes}): " + "; ".join(failures)
        )
    return result
