"""Evaluation on fresh tasks: the meta-learned init against scratch and pretrain + fine-tune.

Every method sees the very same tasks (one seeded generator per K) and is adapted by the same `adapt()`.
For each K the query loss (and accuracy, for classification) is recorded after 0..max(steps) inner
steps, so one pass gives both the table and the loss-against-steps curve.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch.func import functional_call, vmap

from .baselines import pretrain_params, scratch_params
from .config import BaselineConfig, EvalConfig
from .inner import adapt, init_inner_lrs, loss_value
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


def methods_for(trained: Trained, source, baselines: BaselineConfig, which: list[str],
                pretrain_cache: dict | None = None) -> dict:
    inner = trained.algorithm.inner
    finetune_inner = replace(inner, lr=baselines.finetune_lr or inner.lr, lr_mode="fixed", learn_lr=False, head_only=False)
    methods = {}
    if "meta" in which:
        methods["meta"] = (trained.params, trained.inner_lrs, inner)
    if "scratch" in which:
        p = scratch_params(trained.spec, trained.config.seed + 7919)
        methods["scratch"] = (p, init_inner_lrs(p, finetune_inner), finetune_inner)
    if "pretrain" in which:
        # The pretrained network does not depend on the fine-tune rate: a caller sweeping rates passes a cache.
        key = (baselines.pretrain_iterations, baselines.pretrain_batch, baselines.pretrain_lr, trained.config.seed)
        if pretrain_cache is not None and key in pretrain_cache:
            p = pretrain_cache[key]
        else:
            p = pretrain_params(trained.spec, source, baselines.pretrain_iterations, baselines.pretrain_batch,
                                baselines.pretrain_lr, trained.config.seed + 104729)
            if pretrain_cache is not None:
                pretrain_cache[key] = p
        methods["pretrain"] = (p, init_inner_lrs(p, finetune_inner), finetune_inner)
    return methods


@torch.no_grad()
def evaluate(trained: Trained, source, ecfg: EvalConfig, baselines: BaselineConfig,
             which=("meta", "scratch", "pretrain"), split: str = "test", pretrain_cache: dict | None = None) -> dict:
    classification = source.kind == "classification"
    methods = methods_for(trained, source, baselines, list(which), pretrain_cache)
    max_steps = max(ecfg.steps)
    results = {"kind": source.kind, "split": split, "tasks": ecfg.tasks, "query": ecfg.query,
               "steps": list(ecfg.steps), "algorithm": trained.algorithm.name, "by_shots": {}}
    for shots in ecfg.shots:
        gen = torch.Generator().manual_seed(ecfg.seed + shots)
        collected = {m: ([], []) for m in methods}
        remaining = ecfg.tasks
        while remaining > 0:
            n = min(ecfg.chunk, remaining)
            batch = source.sample(split, n, shots, ecfg.query, gen)
            for name, (params, lrs, inner) in methods.items():
                losses, accs = _curves(trained.model, params, lrs, inner, batch, max_steps, classification)
                collected[name][0].append(losses)
                collected[name][1].append(accs)
            remaining -= n
        per_method = {}
        for name, (losses, accs) in collected.items():
            losses, accs = torch.cat(losses), torch.cat(accs)
            if not classification:  # episodes are in model units (task.scaling.target); report the user's
                losses = losses * mse_to_user_units(trained.spec)
            entry = {
                "loss": {str(s): summarise(losses[:, s]) for s in ecfg.steps},
                "loss_curve": [float(v) for v in losses.mean(0)],
            }
            if classification:
                entry["accuracy"] = {str(s): summarise(accs[:, s]) for s in ecfg.steps}
                entry["accuracy_curve"] = [float(v) for v in accs.mean(0)]
            per_method[name] = entry
        results["by_shots"][str(shots)] = per_method
    return results


def markdown_table(results: dict) -> str:
    metric = "accuracy" if results["kind"] == "classification" else "loss"
    label = "accuracy (%)" if metric == "accuracy" else "query MSE"
    scale = 100.0 if metric == "accuracy" else 1.0
    steps = results["steps"]
    lines = [
        f"{label}, mean ± 95 % CI over {results['tasks']} {results['split']} tasks ({results['algorithm']})",
        "",
        "| method | K | " + " | ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    notes = []
    for shots, per_method in results["by_shots"].items():
        for name, entry in per_method.items():
            cells = [f"{entry[metric][str(s)]['mean'] * scale:.3f} ± {entry[metric][str(s)]['ci95'] * scale:.3f}"
                     if metric == "loss" else
                     f"{entry[metric][str(s)]['mean'] * scale:.1f} ± {entry[metric][str(s)]['ci95'] * scale:.1f}"
                     for s in steps]
            lines.append(f"| {name} | {shots} | " + " | ".join(cells) + " |")
            for s in steps:
                d = entry[metric][str(s)].get("diverged", 0)
                if d:
                    notes.append(f"{name}, K={shots}, {s} steps: {d} task(s) diverged (median "
                                 f"{entry[metric][str(s)]['median'] * scale:.3f})")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
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
