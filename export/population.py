"""The population model and the expected-error curves a device uses to pick its predictor (issue 13).

The population model is the pooled network of `meta_train.evaluate.pooled_model` (the fair baseline eval reports) (trained on
samples pooled over every training task). It has the meta-model's architecture and state layout, so
it ships as a second state vector for the same `predict.onnx`: the same input transform inside the
graph, the same output units, by construction.

`expected_errors` measures, on the run's *validation* tasks (never the test tasks), the query error of
  - the population model (it does not adapt: one number, the same at every K), and
  - the shipped initialisation adapted by the shipped inner loop on K labels, K = 0..max_support
    (K = 0: the bare initialisation),
on the same tasks and the same query samples, so the device's choice between them compares like with like.
With them, the quantiles of each predictor's absolute residual per K: the device's prediction intervals
before a line has its own evidence (docs/bundle.md, "predictors"); for classification instead, each
predictor's temperature and conformal score quantiles per K (export/calibration.py).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.func import functional_call, vmap

from meta_train.evaluate import pooled_model
from meta_train.inner import init_inner_lrs, loss_value
from meta_train.tasks import build_source
from meta_train.trained import Trained

from . import calibration
from .errors import ExportError

VAL_TASKS = 200
VAL_QUERY = 50
# Levels of the |residual| quantiles shipped per K: the device's intervals read any coverage off them
# (edge_agent/intervals.py interpolates; adaptive conformal inference moves along them).
QUANTILE_LEVELS = tuple(round(0.02 * i, 2) for i in range(1, 50)) + (0.99, 0.995, 0.999)
SEED_OFFSET = 104729  # the same seed offset meta_train.evaluate uses: the pooled model evaluation reported


def source_of(trained: Trained):
    return build_source(dict(trained.config.task))


def unsupported(trained: Trained, source) -> str | None:
    """Why this run cannot have a population model (None: it can)."""
    if source.kind != "classification":
        return None
    if not (hasattr(source, "machines") and hasattr(source, "windows")):
        return f"{type(source).__name__} cannot draw tasks with global class labels to measure it on"
    if int(getattr(source, "pretrain_classes", -1)) != int(trained.spec["out_features"]):
        return "its pooled classes are not the model's classes"
    return None


def pooled_params(trained: Trained, source) -> dict[str, torch.Tensor]:
    return pooled_with_budget(trained, source)[0]


def pooled_with_budget(trained: Trained, source) -> tuple[dict[str, torch.Tensor], dict]:
    """The pooled (pretrain-on-all-training-tasks) network exactly as eval's fair baseline trains it (the meta
    run's compute budget or baselines.pretrain_iterations, early-stopped on the validation tasks), and the
    record of that training for the manifest."""
    params, info = pooled_model(trained, source, trained.config.baselines, trained.config.eval)
    if source.kind == "classification":
        params = _fit_global_head(trained, source, params)
    bad = [n for n, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        raise ExportError(f"the pooled model diverged (non-finite {', '.join(bad)}); lower baselines.pretrain_lr")
    return params, info


HEAD_STEPS = 300
HEAD_POOL_BATCHES = 8  # pooled batches drawn once for the head fit (the body is frozen: features cached)


@torch.enable_grad()
def _fit_global_head(trained: Trained, source, params: dict) -> dict:
    """pretrain_params swaps the classifier head for a zero head (for episodes, whose labels are shuffled
    per task). On the device the labels are the global classes (`class_names`), so the population model
    needs a head for them: a softmax regression fitted here on the frozen pretrained body's features of
    pooled samples."""
    b = trained.config.baselines
    gen = torch.Generator().manual_seed(trained.config.seed + SEED_OFFSET + 1)
    feats, labels = [], []
    hook = trained.model.head.register_forward_hook(lambda mod, inp, out: feats.append(inp[0].detach()))
    try:
        with torch.no_grad():
            for _ in range(HEAD_POOL_BATCHES):
                x, y = source.pretrain_batch(b.pretrain_batch, gen)
                functional_call(trained.model, params, (x,))
                labels.append(y)
    finally:
        hook.remove()
    f, y = torch.cat(feats), torch.cat(labels)
    w = params["head.weight"].clone().requires_grad_()
    bias = params["head.bias"].clone().requires_grad_()
    opt = torch.optim.Adam([w, bias], lr=1e-2)
    for _ in range(HEAD_STEPS):
        loss = torch.nn.functional.cross_entropy(f @ w.T + bias, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {**params, "head.weight": w.detach(), "head.bias": bias.detach()}


def global_label_tasks(source, split: str, tasks: int, n: int, generator: torch.Generator):
    """`tasks` tasks of `n` samples with *global* class labels (x [T, n, ...], y [T, n]), classes drawn
    uniformly per sample as on a line. Episodes (`source.sample`) shuffle the labels per task, which a
    population model cannot be scored on; so far only the vibration family can draw these."""
    if not (hasattr(source, "machines") and hasattr(source, "windows")):
        raise ExportError(f"{type(source).__name__} cannot draw tasks with global class labels: no "
                          "classification population model for it yet; export with --no-population")
    from meta_train.tasks.common import task_ids

    m = source.machines(task_ids(split, tasks, generator))
    cls = torch.randint(0, source.n_way, (tasks * n,), generator=generator)
    rows = {k: v.repeat_interleave(n, dim=0) for k, v in m.items()}
    return source.windows(rows, cls, generator).view(tasks, n, -1), cls.view(tasks, n)


def as_pooled_run(trained: Trained, params: dict[str, torch.Tensor]) -> Trained:
    """The pooled network as a run of its own: fine-tuned on the device by plain gradient steps at the
    baseline's fine-tune rate (what `meta-train eval` calls pretrain + fine-tune)."""
    inner = trained.algorithm.inner
    b = trained.config.baselines
    finetune = replace(inner, lr=b.finetune_lr or inner.lr, lr_mode="fixed", learn_lr=False, head_only=False)
    return replace(trained, params=params, inner_lrs=init_inner_lrs(params, finetune),
                   algorithm=replace(trained.algorithm, name="pooled", inner=finetune))


def _mean_ci(v: torch.Tensor) -> tuple[float, float]:
    n = v.shape[0]
    return float(v.mean()), (1.96 * float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan"))


@torch.no_grad()
def expected_errors(fns, population_state: torch.Tensor | None, source, max_support: int,
                    tasks: int = VAL_TASKS, query: int = VAL_QUERY, seed: int = 0) -> dict:
    """Per-K mean query MSE, or error rate for classification (with 95 % CI over tasks), on validation
    tasks; see the module docstring."""
    gen = torch.Generator().manual_seed(seed + 31337)
    classification = source.kind == "classification"
    if classification:
        x, y = global_label_tasks(source, "val", tasks, max_support + query, gen)
        sup_x, sup_y, qx, qy = x[:, :max_support], y[:, :max_support], x[:, max_support:], y[:, max_support:]
    else:
        batch = source.sample("val", tasks, max_support, query, gen)
        sup_x, sup_y, qx, qy = batch.support_x, batch.support_y, batch.query_x, batch.query_y

    levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)

    def err(states: torch.Tensor) -> tuple[torch.Tensor, list[float] | dict | None]:
        """[T, P] states -> per-task query MSE (classification: error rate) [T], and quantiles of
        |residual| over all query samples (regression; classification: its calibration record)."""
        out = vmap(fns.predict)(states, qx)
        if classification:
            return (out.argmax(-1) != qy).double().mean(-1), calibration.calibrate(out.numpy(), qy.numpy(), QUANTILE_LEVELS)
        res = (out - qy).abs().reshape(-1).double()
        return vmap(lambda o, y: loss_value(o, y, "mse"))(out, qy), [round(float(v), 6) for v in torch.quantile(res, levels)]

    init = fns.init_state().expand(tasks, -1)
    adapted_mean, adapted_ci, adapted_q = [], [], []
    for k in range(0, max_support + 1):
        if k == 0:
            states = init
        else:
            sx, sy = sup_x[:, :k], sup_y[:, :k]
            states = vmap(fns.adapt)(sx, sy, torch.ones(tasks, k))
        per_task, q = err(states)
        m, c = _mean_ci(per_task)
        adapted_mean.append(m)
        adapted_ci.append(c)
        adapted_q.append(q)
    result = {"metric": "error_rate" if classification else "mse", "split": "val", "tasks": tasks, "query": query,
              "k": list(range(max_support + 1)), "adapted": adapted_mean, "adapted_ci95": adapted_ci}
    if not classification:
        result["abs_residual_quantiles"] = {"levels": list(QUANTILE_LEVELS), "adapted": adapted_q}
    pop_q = None
    if population_state is not None:
        per_task, pop_q = err(population_state.expand(tasks, -1))
        result["population"], result["population_ci95"] = _mean_ci(per_task)
        if not classification:
            result["abs_residual_quantiles"]["population"] = pop_q
    if classification:
        result["calibration"] = calibration.manifest_section(adapted_q, pop_q, QUANTILE_LEVELS, tasks, query)
    bad = [v for v in adapted_mean + [result.get("population", 0.0)] if not math.isfinite(v)]
    if bad:
        raise ExportError("a predictor's validation error is not finite (the inner loop diverges on validation "
                          "tasks); the device could not choose between predictors")
    return result
