"""Evaluation on fresh tasks: the meta-learned init against scratch and pretrain + fine-tune, fairly.

Every method sees the very same tasks (one seeded generator per K) and is adapted by the same `adapt()`.
For each K the query loss (and accuracy, for classification) is recorded after 0..max(steps) inner
steps, so one pass gives both the table and the loss-against-steps curve. Step 0 (the unadapted
initialisation) is always reported, so adaptation's own contribution is visible.

Fairness (issue 11): the pooled network gets at least the meta-learner's compute and is early-stopped on
validation tasks (meta_train.baselines); the baselines' fine-tune rate is chosen per method, K and step count
on *validation* episodes, never on the split being reported; every table prints the budgets and the rates.
A K that cannot form an episode is reported as skipped (with the reason) and the other Ks are kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch.func import functional_call, vmap

from .baselines import matched_iterations, meta_budget, pretrain, scratch_params
from .config import BaselineConfig, EvalConfig
from .errors import DataError
from .inner import adapt, init_inner_lrs, loss_value
from .numbers import count, mean_ci
from .scaling import mse_to_user_units
from .trained import Trained


def _curves(model, params, lrs, inner, batch, steps: int, classification: bool):
    """Per task: query loss and accuracy after 0..steps inner steps -> two [B, steps+1] tensors."""

    def one_task(sx, sy, qx, qy):
        trajectory = [params] + adapt(model, params, lrs, sx, sy, inner, steps=steps, trajectory=True)
        losses, accs = [], []
        for p in trajectory:
            out = functional_call(model, p, (qx,))
            losses.append(loss_value(out, qy, inner.loss))
            accs.append((out.argmax(-1) == qy).float().mean() if classification else torch.zeros(()))
        return torch.stack(losses), torch.stack(accs)

    return vmap(one_task)(batch.support_x, batch.support_y, batch.query_x, batch.query_y)


def summarise(values: torch.Tensor) -> dict:
    """Mean and 95 % CI over tasks. A diverged task (non-finite loss) stays in the mean, honestly making
    it inf, and is counted so the table can say how many there were."""
    n = values.shape[0]
    mean = float(values.mean())
    ci = 1.96 * float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "ci95": ci, "n": n, "median": float(values.median()),
            "diverged": int((~torch.isfinite(values)).sum())}


def finetune_inner(trained: Trained, baselines: BaselineConfig, lr: float | None = None):
    """The baselines' inner loop: plain SGD on every parameter at one fixed rate."""
    inner = trained.algorithm.inner
    rate = lr if lr is not None else (baselines.finetune_lr or inner.lr)
    return replace(inner, lr=float(rate), lr_mode="fixed", learn_lr=False, head_only=False)


def finetune_grid(trained: Trained, baselines: BaselineConfig) -> list[float]:
    if baselines.finetune_lrs:
        return [float(r) for r in baselines.finetune_lrs]
    base = baselines.finetune_lr or trained.algorithm.inner.lr
    return [float(f"{base * f:.6g}") for f in (0.1, 0.3, 1.0, 3.0)]


def _is_classification(source) -> bool:
    return source.kind == "classification"


def _metric_of(source) -> str:
    return "accuracy" if _is_classification(source) else "loss"


def _score(curves: tuple[torch.Tensor, torch.Tensor], step: int, metric: str) -> float:
    """Lower is better: mean query loss, or minus mean accuracy. Diverged (NaN/inf) is the worst."""
    losses, accs = curves
    v = float(losses[:, step].mean()) if metric == "loss" else -float(accs[:, step].mean())
    return v if math.isfinite(v) else math.inf


def collect(trained: Trained, source, split: str, shots: int, tasks: int, query: int, chunk: int, seed: int,
            variants: dict, max_steps: int) -> dict:
    """variant -> (losses [tasks, max_steps+1], accs): every variant adapted on the very same episodes."""
    classification = _is_classification(source)
    gen = torch.Generator().manual_seed(seed)
    out = {v: ([], []) for v in variants}
    remaining = tasks
    while remaining > 0:
        n = min(chunk, remaining)
        batch = source.sample(split, n, shots, query, gen)
        for v, (params, lrs, inner) in variants.items():
            losses, accs = _curves(trained.model, params, lrs, inner, batch, max_steps, classification)
            out[v][0].append(losses)
            out[v][1].append(accs)
        remaining -= n
    # episodes are in model units (task.scaling.target); losses are reported in the user's
    unit = 1.0 if classification else mse_to_user_units(trained.spec)
    return {v: (torch.cat(l) * unit, torch.cat(a)) for v, (l, a) in out.items()}


def val_scorer(trained: Trained, source, baselines: BaselineConfig, shots: int, query: int, chunk: int, seed: int):
    """Early-stopping score for the pooled network: mean validation query loss after the algorithm's inner
    steps of fine-tuning at the base fine-tune rate (the way the baseline is used), on fixed episodes."""
    inner = finetune_inner(trained, baselines)
    steps = trained.algorithm.inner.steps

    def score(params: dict) -> float:
        lrs = init_inner_lrs(params, inner)
        curves = collect(trained, source, "val", shots, baselines.val_tasks, query, chunk, seed,
                         {"p": (params, lrs, inner)}, steps)["p"]
        return _score(curves, steps, "loss")

    return score


def pooled_model(trained: Trained, source, baselines: BaselineConfig, ecfg: EvalConfig,
                 pretrain_cache: dict | None = None) -> tuple[dict, dict]:
    """The fair pretrain baseline -> (episode-ready parameters, budget record for the tables).

    Trained for the meta run's budget (or baselines.pretrain_iterations), early-stopped on validation tasks
    when the source has any. The network does not depend on the fine-tune rate: callers sweeping settings pass
    a cache."""
    budget = meta_budget(trained.config, trained.iteration, source.kind, trained.spec.get("out_features"),
                         getattr(source, "rows_per_shot", 1))
    matched = matched_iterations(budget, baselines.pretrain_batch)
    iterations = baselines.pretrain_iterations if baselines.pretrain_iterations is not None else matched
    key = (iterations, baselines.pretrain_batch, baselines.pretrain_lr, baselines.pretrain_patience,
           baselines.pretrain_val_every, baselines.val_tasks, trained.config.seed)
    if pretrain_cache is not None and key in pretrain_cache:
        return pretrain_cache[key]
    shots, query = trained.config.train.shots, trained.config.train.query
    score, note = val_scorer(trained, source, baselines, shots, query, ecfg.chunk, ecfg.seed + 9001), None
    try:
        source.sample("val", 1, shots, query, torch.Generator().manual_seed(0))
    except DataError as e:
        score, note = None, f"no early stopping: the validation tasks cannot form an episode ({e})"
    params, info = pretrain(trained.spec, source, iterations, baselines.pretrain_batch, baselines.pretrain_lr,
                            trained.config.seed + 104729, val_score=score, val_every=baselines.pretrain_val_every,
                            patience=baselines.pretrain_patience)
    info.update(matched_iterations=matched, meta_sample_gradient_evals=budget["sample_gradient_evals"],
                budget_fair=iterations * baselines.pretrain_batch >= budget["sample_gradient_evals"],
                sample_gradient_evals_budget=iterations * baselines.pretrain_batch, lr=baselines.pretrain_lr)
    if note:
        info["note"] = note
    if pretrain_cache is not None:
        pretrain_cache[key] = (params, info)
    return params, info


def _initialisations(trained: Trained, source, baselines: BaselineConfig, ecfg: EvalConfig, which: list[str],
                     pretrain_cache: dict | None) -> tuple[dict, dict]:
    inits, budgets = {}, {"meta": meta_budget(trained.config, trained.iteration, source.kind,
                                              trained.spec.get("out_features"), getattr(source, "rows_per_shot", 1))}
    if "meta" in which:
        inits["meta"] = trained.params
    if "scratch" in which:
        inits["scratch"] = scratch_params(trained.spec, trained.config.seed + 7919)
    if "pretrain" in which:
        inits["pretrain"], budgets["pretrain"] = pooled_model(trained, source, baselines, ecfg, pretrain_cache)
    return inits, budgets


def _variants(trained: Trained, baselines: BaselineConfig, inits: dict, rates: dict[str, list[float]]) -> dict:
    """(method, rate) -> (params, inner rates, inner config); the meta init keeps its own (rate None)."""
    out = {}
    for name, params in inits.items():
        if name == "meta":
            out[("meta", None)] = (params, trained.inner_lrs, trained.algorithm.inner)
            continue
        for lr in rates[name]:
            inner = finetune_inner(trained, baselines, lr)
            out[(name, lr)] = (params, init_inner_lrs(params, inner), inner)
    return out


def _evaluate_k(trained, source, ecfg, baselines, inits, grid, steps, split, shots) -> tuple[dict, str | None]:
    """One K: choose the baselines' rates on validation episodes, then score every method on `split`."""
    metric, max_steps = _metric_of(source), max(steps)
    chosen, val_scores, selection_note = {}, {}, None
    val_variants = _variants(trained, baselines, inits, {m: grid for m in inits})
    try:
        val = collect(trained, source, "val", shots, baselines.val_tasks, ecfg.query, ecfg.chunk,
                      ecfg.seed + 5003 + shots, val_variants, max_steps)
    except DataError as e:
        val, selection_note = None, f"rates not selected (validation tasks cannot form an episode: {e})"
    for name in inits:
        if name == "meta":
            if val is not None:
                val_scores["meta"] = {str(s): _score(val[("meta", None)], s, metric) for s in steps}
            continue
        chosen[name], val_scores[name] = {}, {}
        for s in steps:
            if val is None:
                lr = finetune_inner(trained, baselines).lr
            else:
                lr = min(grid, key=lambda r: (_score(val[(name, r)], s, metric), abs(math.log(r))))
                val_scores[name][str(s)] = _score(val[(name, lr)], s, metric)
            chosen[name][str(s)] = lr
    test_rates = {m: sorted(set(c.values())) for m, c in chosen.items()}
    test = collect(trained, source, split, shots, ecfg.tasks, ecfg.query, ecfg.chunk,
                   ecfg.seed + shots, _variants(trained, baselines, inits, test_rates), max_steps)
    per_method = {}
    for name in inits:
        rate_at = (lambda s: None) if name == "meta" else (lambda s, n=name: chosen[n][str(s)])
        curves_at = lambda s, n=name, r=rate_at: test[(n, r(s))]  # noqa: E731
        entry = {"loss": {str(s): summarise(curves_at(s)[0][:, s]) for s in steps},
                 "loss_curve": [float(v) for v in curves_at(max_steps)[0].mean(0)]}
        if _is_classification(source):
            entry["accuracy"] = {str(s): summarise(curves_at(s)[1][:, s]) for s in steps}
            entry["accuracy_curve"] = [float(v) for v in curves_at(max_steps)[1].mean(0)]
        if name != "meta":
            entry["lr"] = chosen[name]
        if name in val_scores:
            entry["val_score"] = val_scores[name]  # lower is better (minus accuracy for classification)
        per_method[name] = entry
    return per_method, selection_note


@torch.no_grad()
def evaluate(trained: Trained, source, ecfg: EvalConfig, baselines: BaselineConfig,
             which=("meta", "scratch", "pretrain"), split: str = "test", pretrain_cache: dict | None = None) -> dict:
    """Every method on `split` for every K of ecfg.shots. A K that cannot form an episode lands in
    results["skipped"] with the reason; the others are kept."""
    steps = sorted({0, *ecfg.steps})
    inits, budgets = _initialisations(trained, source, baselines, ecfg, list(which), pretrain_cache)
    grid = finetune_grid(trained, baselines)
    results = {"kind": source.kind, "split": split, "tasks": ecfg.tasks, "query": ecfg.query, "steps": steps,
               "algorithm": trained.algorithm.name, "budgets": budgets,
               "selection": {"split": "val", "tasks": baselines.val_tasks, "finetune_lrs": grid},
               "by_shots": {}, "skipped": {}}
    for shots in ecfg.shots:
        try:
            per_method, note = _evaluate_k(trained, source, ecfg, baselines, inits, grid, steps, split, shots)
        except DataError as e:
            results["skipped"][str(shots)] = str(e)
            continue
        results["by_shots"][str(shots)] = per_method
        if note:
            results["selection"].setdefault("notes", {})[str(shots)] = note
    return results


def budget_lines(results: dict) -> list[str]:
    """The compute each method got and how the rates were chosen: printed under every table."""
    b = results.get("budgets", {})
    lines = []
    if "meta" in b:
        m = b["meta"]
        lines.append(f"- meta-training: {count(m['iterations'])} iterations x {m['meta_batch']} tasks x "
                     f"({m['inner_steps']} inner + 1 query) = {count(m['task_gradient_evals'])} task-gradient "
                     f"evaluations over {count(m['sample_gradient_evals'])} rows (per-sample gradients)")
    if "pretrain" in b:
        p = b["pretrain"]
        fair = "" if p.get("budget_fair", True) else " **below the meta run's budget (baselines.pretrain_iterations)**"
        stop = (f"early-stopped on validation tasks (check every {count(p['val_every'])}, patience "
                f"{p['patience']}): ran {count(p['iterations_run'])}, kept iteration {count(p['best_iteration'])}"
                if p.get("early_stopping") else p.get("note", "no early stopping"))
        lines.append(f"- pooled pretraining: budget {count(p['iterations_budget'])} iterations x {p['batch']} rows = "
                     f"{count(p['sample_gradient_evals_budget'])} per-sample gradients{fair}; {stop}")
    sel = results.get("selection")
    if sel:
        where = (f"never on {results['split']}" if results["split"] != "val" else
                 "and this table reports that same validation split, so the baselines' rates are tuned on it")
        lines.append(f"- fine-tune rates of the baselines chosen per K and step count on {sel['tasks']} validation "
                     f"episodes ({where}) from {sel['finetune_lrs']}; the chosen rate is in brackets")
        for k, note in sel.get("notes", {}).items():
            lines.append(f"- K={k}: {note}")
    return lines


def markdown_table(results: dict) -> str:
    metric = "accuracy" if results["kind"] == "classification" else "loss"
    label = "accuracy (%)" if metric == "accuracy" else "query MSE"
    scale = 100.0 if metric == "accuracy" else 1.0
    steps = results["steps"]
    lines = [
        f"{label}, mean ± 95 % CI over {results['tasks']} {results['split']} episodes ({results['algorithm']}); "
        "0 steps = the initialisation itself, unadapted; scratch = a random init, pretrain = the pooled network "
        "(joint training on every training task), both fine-tuned by plain SGD",
        "",
        "| method | K | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for shots, per_method in results["by_shots"].items():
        for name, entry in per_method.items():
            cells = []
            for s in steps:
                e = entry[metric][str(s)]
                diverged = entry["loss"][str(s)].get("diverged", 0)
                text = mean_ci(e["mean"] * scale, e["ci95"] * scale, diverged=diverged, n=e["n"],
                               median=entry["loss"][str(s)]["median"])
                lr = entry.get("lr", {}).get(str(s))
                cells.append(text + (f" (lr {lr:g})" if lr is not None and s > 0 else ""))
            lines.append(f"| {name} | {shots} | " + " | ".join(cells) + " |")
    for shots, why in results.get("skipped", {}).items():
        lines.append(f"| (K={shots} skipped) | {shots} | " + " | ".join("–" for _ in steps) + " |")
    lines += ["", "Budgets and selection:", ""] + budget_lines(results)
    if results.get("skipped"):
        lines += ["", "Skipped (no episode could be formed; the other Ks are complete):", ""]
        lines += [f"- K={k}: {why}" for k, why in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metric = "accuracy_curve" if results["kind"] == "classification" else "loss_curve"
    shots = list(results["by_shots"])
    if not shots:  # every K skipped: nothing to draw
        return False
    fig, axes = plt.subplots(1, len(shots), figsize=(4.5 * len(shots), 3.6), squeeze=False)
    for ax, k in zip(axes[0], shots):
        for name, entry in results["by_shots"][k].items():
            ax.plot(range(len(entry[metric])), entry[metric], marker="o", markersize=3, label=name)
        ax.set_title(f"K = {k}")
        ax.set_xlabel("inner steps")
        ax.set_ylabel("query accuracy" if "accuracy" in metric else "query MSE")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(results: dict, out_dir: Path, stem: str = "eval") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(results, indent=2))
    paths["markdown"].write_text(markdown_table(results))
    if not plot(results, paths["png"]):
        del paths["png"]
    return paths
