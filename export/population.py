"""The population model and the expected-error curves a device uses to pick its predictor (issue 13).

The population model is the pooled network of `meta_train.baselines.pretrain_params` (trained on
samples pooled over every training task). It has the meta-model's architecture and state layout, so
it ships as a second state vector for the same `predict.onnx`: the same input transform inside the
graph, the same output units, by construction.

`expected_errors` measures, on the run's *validation* tasks (never the test tasks), the query error of
  - the population model (it does not adapt: one number, the same at every K), and
  - the shipped initialisation adapted by the shipped inner loop on K labels, K = 0..max_support
    (K = 0: the bare initialisation),
on the same tasks and the same query samples, so the device's choice between them compares like with like.
With them, the quantiles of each predictor's absolute residual per K: the device's prediction intervals
before a line has its own evidence (docs/bundle.md, "predictors").
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.func import vmap

from meta_train.baselines import pretrain_params
from meta_train.inner import init_inner_lrs, loss_value
from meta_train.tasks import build_source
from meta_train.trained import Trained

from .errors import ExportError

VAL_TASKS = 200
VAL_QUERY = 50
# Levels of the |residual| quantiles shipped per K: the device's intervals read any coverage off them
# (edge_agent/intervals.py interpolates; adaptive conformal inference moves along them).
QUANTILE_LEVELS = tuple(round(0.02 * i, 2) for i in range(1, 50)) + (0.99, 0.995, 0.999)
SEED_OFFSET = 104729  # the same seed offset meta_train.evaluate uses: the pooled model evaluation reported


def source_of(trained: Trained):
    return build_source(dict(trained.config.task))


def pooled_params(trained: Trained, source) -> dict[str, torch.Tensor]:
    """The pooled (pretrain-on-all-training-tasks) network with the run's baseline budget."""
    if source.kind != "regression":
        # pretrain_params swaps the classification head for a zero N-way head (episode labels are
        # shuffled per task): at 0 labels it predicts uniform probabilities, no population model.
        raise ExportError("a population model is only exported for regression runs so far "
                          f"(this run is {source.kind}); export without it (--no-population)")
    b = trained.config.baselines
    params = pretrain_params(trained.spec, source, b.pretrain_iterations, b.pretrain_batch, b.pretrain_lr,
                             trained.config.seed + SEED_OFFSET)
    bad = [n for n, p in params.items() if not torch.isfinite(p).all()]
    if bad:
        raise ExportError(f"the pooled model diverged (non-finite {', '.join(bad)}); lower baselines.pretrain_lr")
    return params


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
    """Per-K mean query MSE (with 95 % CI over tasks) on validation tasks; see the module docstring."""
    if source.kind != "regression":
        raise ExportError("expected-error curves are only computed for regression runs so far")
    gen = torch.Generator().manual_seed(seed + 31337)
    batch = source.sample("val", tasks, max_support, query, gen)
    qx, qy = batch.query_x, batch.query_y

    levels = torch.tensor(QUANTILE_LEVELS, dtype=torch.float64)

    def err(states: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """[T, P] states -> per-task query MSE [T], and quantiles of |residual| over all query samples."""
        out = vmap(fns.predict)(states, qx)
        res = (out - qy).abs().reshape(-1).double()
        return vmap(lambda o, y: loss_value(o, y, "mse"))(out, qy), [round(float(v), 6) for v in torch.quantile(res, levels)]

    init = fns.init_state().expand(tasks, -1)
    adapted_mean, adapted_ci, adapted_q = [], [], []
    for k in range(0, max_support + 1):
        if k == 0:
            states = init
        else:
            sx, sy = batch.support_x[:, :k], batch.support_y[:, :k]
            states = vmap(fns.adapt)(sx, sy, torch.ones(tasks, k))
        per_task, q = err(states)
        m, c = _mean_ci(per_task)
        adapted_mean.append(m)
        adapted_ci.append(c)
        adapted_q.append(q)
    result = {"metric": "mse", "split": "val", "tasks": tasks, "query": query,
              "k": list(range(max_support + 1)), "adapted": adapted_mean, "adapted_ci95": adapted_ci,
              "abs_residual_quantiles": {"levels": list(QUANTILE_LEVELS), "adapted": adapted_q}}
    if population_state is not None:
        per_task, q = err(population_state.expand(tasks, -1))
        result["population"], result["population_ci95"] = _mean_ci(per_task)
        result["abs_residual_quantiles"]["population"] = q
    bad = [v for v in adapted_mean + [result.get("population", 0.0)] if not math.isfinite(v)]
    if bad:
        raise ExportError("a predictor's validation error is not finite (the inner loop diverges on validation "
                          "tasks); the device could not choose between predictors")
    return result
