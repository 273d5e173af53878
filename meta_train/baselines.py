"""The two baselines every meta-learned initialisation must beat, adapted by the very same inner loop.

- scratch: a random initialisation.
- pretrain + fine-tune: one network trained jointly on samples pooled over all training tasks (the
  "transfer learning" answer, the *pooled model*). For classification it is trained on the global class
  labels, and its head is replaced by a zero head of the episode's N-way size before fine-tuning, since
  episode labels are shuffled per task and a fixed head would only encode the shuffle.

Fairness (issue 11): by default the pooled network gets at least the meta-learner's compute, counted in
per-sample gradient evaluations (`meta_budget`), and is early-stopped on the validation tasks. Accounting:
one meta-iteration evaluates, per task of the meta-batch, `inner_steps` support gradients (K rows each) and
one query gradient (Q rows): `meta_batch x (inner_steps + 1)` task-gradient evaluations over
`meta_batch x (inner_steps x K + Q)` rows (K, Q times n_way for classification). A second-order query
gradient costs more than a plain one, so counting it as one row-gradient each is generous to the baseline.
One pretraining iteration is one gradient over `pretrain_batch` rows.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.func import functional_call

from .inner import loss_value
from .model import build_model, init_params


def scratch_params(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    return init_params(build_model(spec), torch.Generator().manual_seed(seed))


def meta_budget(config, iterations: int, kind: str, n_way: int | None = None, rows_per_shot: int = 1) -> dict:
    """The compute of a meta-training run of `iterations` iterations under `config` (see the module doc).
    rows_per_shot: support rows one shot stands for where a shot is not one row (C-MAPSS: a shot is a unit
    of `windows_per_unit` windows; a source says so with a `rows_per_shot` attribute)."""
    t, steps = config.train, config.algorithm.inner_steps
    per = int(n_way) if kind == "classification" else 1
    support, query = t.shots * per * int(rows_per_shot), t.query * per
    return {"iterations": int(iterations), "meta_batch": t.meta_batch, "inner_steps": steps,
            "support_rows": support, "query_rows": query,
            "task_gradient_evals": int(iterations) * t.meta_batch * (steps + 1),
            "sample_gradient_evals": int(iterations) * t.meta_batch * (steps * support + query)}


def matched_iterations(budget: dict, batch: int) -> int:
    """Pretraining iterations of `batch` rows that reach at least the meta run's per-sample gradients."""
    return max(1, math.ceil(budget["sample_gradient_evals"] / max(int(batch), 1)))


def fresh_head(params: dict, spec: dict, classification: bool) -> dict:
    """The pooled network as an initialisation for N-way episodes (zero head); regression: unchanged."""
    if not classification:
        return params
    params = dict(params)
    width = params["head.weight"].shape[1]
    params["head.weight"] = torch.zeros(int(spec["out_features"]), width)
    params["head.bias"] = torch.zeros(int(spec["out_features"]))
    return params


@torch.enable_grad()  # evaluation runs under no_grad; joint training needs gradients
def pretrain(spec: dict, source, iterations: int, batch: int, lr: float, seed: int, *,
             val_score: Callable[[dict], float] | None = None, val_every: int | None = None,
             patience: int = 10) -> tuple[dict[str, torch.Tensor], dict]:
    """Joint training on pooled training-task rows -> (initialisation for episodes, what was spent).

    With `val_score` (lower is better, called on the episode-ready parameters) the run is checked every
    `val_every` iterations (default iterations / 50), stops after `patience` checks without improvement
    (0: never) and returns the best checked parameters. A non-finite validation score never counts as best.
    """
    if iterations is None:  # baselines.pretrain_iterations: null means "match the meta run", which needs the run
        raise ValueError("pretrain iterations is None: pass a number, e.g. matched_iterations(meta_budget(...), batch), "
                         "or use meta_train.evaluate.pooled_model(trained, source, baselines, eval_config)")
    classification = source.kind == "classification"
    pre_spec = dict(spec)
    if classification:
        pre_spec["out_features"] = int(source.pretrain_classes)
    model = build_model(pre_spec)
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.requires_grad_() for n, p in init_params(model, gen).items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    every = max(1, val_every or iterations // 50)
    snapshot = lambda: {n: p.detach().clone() for n, p in params.items()}  # noqa: E731
    best, best_score, best_at, since_best, done, history = None, math.inf, 0, 0, 0, []

    def check(at: int) -> None:
        nonlocal best, best_score, best_at, since_best
        with torch.no_grad():
            score = float(val_score(fresh_head(snapshot(), spec, classification)))
        history.append([at, score])
        if math.isfinite(score) and score < best_score:
            best, best_score, best_at, since_best = snapshot(), score, at, 0
        else:
            since_best += 1

    if val_score is not None:
        check(0)
    for it in range(iterations):
        x, y = source.pretrain_batch(batch, gen)
        loss = loss_value(functional_call(model, params, (x,)), y, source.loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = it + 1
        if val_score is not None and (done % every == 0 or done == iterations):
            check(done)
            if patience and since_best >= patience:
                break
    final = best if best is not None else snapshot()
    info = {"iterations_budget": int(iterations), "iterations_run": done, "batch": int(batch),
            "sample_gradient_evals": done * int(batch), "early_stopping": val_score is not None,
            "stopped_early": done < iterations, "best_iteration": best_at if best is not None else done,
            "best_val_score": best_score if best is not None else None, "val_every": every,
            "patience": patience, "val_history": history}
    return fresh_head(final, spec, classification), info


def pretrain_params(spec: dict, source, iterations: int, batch: int, lr: float, seed: int, *,
                    val_score: Callable[[dict], float] | None = None, val_every: int | None = None,
                    patience: int = 10) -> dict[str, torch.Tensor]:
    """`pretrain` without the accounting: the pooled network as an initialisation."""
    return pretrain(spec, source, iterations, batch, lr, seed, val_score=val_score, val_every=val_every,
                    patience=patience)[0]
