"""Cross-validation over tasks: does meta-learning beat a pooled model on *your* table?

With a handful of tasks one fixed split leaves 1-4 test tasks, and a CI over episodes drawn from them says how
well those few tasks were measured, not how a new task will go. Here every task is held out once (leave one
task out, or K folds of tasks): per fold the meta-learner is trained on the other tasks (some of them set aside
as validation tasks), the fair pooled baseline (meta_train.evaluate.pooled_model) is trained on the same
tasks, and both are scored on each held-out task. The unit of the confidence interval is the task: the mean of
the per-task differences with a Student-t interval over the held-out tasks.

Each method picks between its unadapted output (0 steps) and its fine-tuned one (the algorithm's inner steps)
on the fold's validation tasks, never on the held-out task: the pooled model's best use may be as it is.
Verdict: "meta-learning helps" only when the whole interval is in its favour; otherwise the pooled model,
the simpler thing to run, is the recommendation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from .baselines import matched_iterations, meta_budget
from .config import Config, load_config
from .errors import ConfigError
from .evaluate import evaluate
from .numbers import count, sig
from .tasks import build_source
from .train import train
from .trained import load_trained

# Student-t 0.975 quantiles for 1..30 degrees of freedom (beyond: the normal 1.96 is within 2 %)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def parse_folds(text: str) -> tuple[str, int | None]:
    if text == "loto":
        return "loto", None
    if text.startswith("kfold:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 2:
            return "kfold", k
    raise ConfigError(f"--folds must be loto or kfold:K with K >= 2, got {text!r}")


def fold_splits(tasks: list[str], scheme: str, k: int | None, val_fraction: float, seed: int) -> list[dict]:
    """Held-out tasks per fold; of the others, a rotating share (at least 1) are validation tasks."""
    if len(tasks) < 3:
        raise ConfigError(f"cross-validation needs >= 3 tasks (a train, a validation and a held-out one); "
                          f"the table has {len(tasks)}")
    order = [tasks[i] for i in torch.randperm(len(tasks), generator=torch.Generator().manual_seed(seed)).tolist()]
    if scheme == "loto":
        held = [[t] for t in order]
    else:
        if k > len(tasks):
            raise ConfigError(f"kfold:{k} needs at least {k} tasks; the table has {len(tasks)}")
        held = [order[i::k] for i in range(k)]
    splits = []
    for i, test in enumerate(held):
        rest = [t for t in order if t not in test]
        n_val = min(max(1, round(val_fraction * len(rest))), len(rest) - 1)
        val = [rest[(i + j) % len(rest)] for j in range(n_val)]
        splits.append({"train": [t for t in rest if t not in val], "val": val, "test": list(test)})
    return splits


def _choose(entry: dict, steps: list[int], metric: str) -> tuple[int, float]:
    """(step, test value) of the step with the best validation score (0 or the inner steps)."""
    val = entry.get("val_score", {})
    step = min(steps, key=lambda s: (val.get(str(s), math.inf), s))
    return step, entry[metric][str(step)]["mean"]


def task_scores(res: dict, inner_steps: int) -> dict:
    """Per K: the held-out task's meta and pooled values, each at its validation-chosen step."""
    metric = "accuracy" if res["kind"] == "classification" else "loss"
    out = {}
    for k, per in res["by_shots"].items():
        (ms, mv), (ps, pv) = (_choose(per[m], [0, inner_steps], metric) for m in ("meta", "pretrain"))
        out[k] = {"meta": mv, "meta_steps": ms, "pooled": pv, "pooled_steps": ps,
                  "pooled_lr": per["pretrain"].get("lr", {}).get(str(ps)) if ps else None}
    return out


def verdict(per_task: dict[str, dict], kind: str, k: str) -> dict:
    """Task-level comparison at one K, with a Student-t interval over the held-out tasks.

    Regression: the per-task log ratio ln(pooled MSE / meta MSE), reported as a factor (geometric mean over
    tasks): tasks whose errors differ by orders of magnitude then count alike, and one task the pooled model
    extrapolates badly cannot decide the verdict alone. Classification: the difference in accuracy points."""
    rows = [v[k] for v in per_task.values() if k in v]
    n = len(rows)
    if kind == "classification":
        gains = [r["meta"] - r["pooled"] for r in rows]
    else:
        gains = [math.log(max(r["pooled"], 1e-300) / max(r["meta"], 1e-300)) for r in rows]
    g = torch.tensor(gains, dtype=torch.float64)
    mean = float(g.mean()) if n else math.nan
    half = t975(n - 1) * float(g.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    lo, hi = mean - half, mean + half
    where = f"95 % CI over {n} held-out task{'s' if n != 1 else ''}"
    if kind == "classification":
        size = f"{sig(100 * mean)} points of accuracy"
        ci = f"{where} [{sig(100 * lo)}, {sig(100 * hi)}]"
    else:
        size = f"a factor {sig(math.exp(mean))} in query MSE (geometric mean over tasks)"
        ci = f"{where} x{sig(math.exp(lo))} to x{sig(math.exp(hi))}"
    wins = sum(1 for x in gains if x > 0)
    helps = n > 1 and math.isfinite(lo) and lo > 0
    if helps:
        line = f"K={k}: meta-learning helps on your data by {size} ({ci}; better on {wins} of {n} tasks)"
    else:
        line = (f"K={k}: a pooled model is as good or better: use it (meta-learning's gain: {size}, {ci}, "
                f"which does not exclude no gain; better on {wins} of {n} tasks)")
    notes = []
    if n < 5:
        notes.append(f"only {n} held-out task{'s' if n != 1 else ''}: a t-interval over so few tasks is wide, and "
                     "it is over tasks, not episodes: more tasks (lines, machines) is what narrows it")
    return {"k": k, "n_tasks": n, "mean_gain": mean, "ci95": [lo, hi], "meta_helps": helps, "wins": wins,
            "scale": "accuracy difference" if kind == "classification" else "log MSE ratio pooled/meta",
            "line": line, "notes": notes}


def plan(cfg: Config, source, splits: list[dict]) -> dict:
    budget = meta_budget(cfg, cfg.train.iterations, source.kind, source.model_spec_defaults()["out_features"],
                         getattr(source, "rows_per_shot", 1))
    pooled = cfg.baselines.pretrain_iterations or matched_iterations(budget, cfg.baselines.pretrain_batch)
    held = sum(len(s["test"]) for s in splits)
    return {"folds": len(splits), "meta_iterations_per_fold": cfg.train.iterations,
            "task_gradient_evals_per_fold": budget["task_gradient_evals"],
            "pooled_iterations_per_fold_max": pooled, "held_out_evaluations": held,
            "episodes_per_held_out_task": cfg.eval.tasks}


def cross_validate(cfg: Config, out_dir: str | Path, folds: str = "loto", max_folds: int = 20, log=print) -> dict:
    out_dir = Path(out_dir)
    source = build_source(dict(cfg.task))
    if not hasattr(source, "with_split"):
        raise ConfigError(f"cross-validation over tasks needs a table source (named tasks); task.name is "
                          f"{cfg.task.get('name')!r}, whose tasks are drawn fresh: use meta-train eval")
    scheme, k = parse_folds(folds)
    splits = fold_splits(sorted(source.tasks), scheme, k, source.opts.split.val, cfg.seed)
    if len(splits) > max_folds:
        raise ConfigError(f"{len(splits)} folds would each meta-train from scratch; the limit is --max-folds "
                          f"{max_folds}: use --folds kfold:K (K <= {max_folds}) or raise --max-folds")
    p = plan(cfg, source, splits)
    log(f"cross-validation ({folds}): {p['folds']} folds, each meta-training {count(p['meta_iterations_per_fold'])} "
        f"iterations ({count(p['task_gradient_evals_per_fold'])} task-gradient evaluations) and pretraining the "
        f"pooled model for up to {count(p['pooled_iterations_per_fold_max'])} iterations, then "
        f"{count(p['episodes_per_held_out_task'])} episodes on each of {p['held_out_evaluations']} held-out tasks")
    ecfg = replace(cfg.eval, steps=[cfg.algorithm.inner_steps])
    per_task, fold_info, t0 = {}, [], time.time()
    for i, split in enumerate(splits):
        fold_source = source.with_split(split)
        run = out_dir / f"fold{i}"
        train(replace(cfg, train=replace(cfg.train, progress=False)), run, source=fold_source)
        trained = load_trained(run)
        cache: dict = {}
        for task in split["test"]:
            res = evaluate(trained, fold_source.with_split({**split, "test": [task]}), ecfg, cfg.baselines,
                           which=("meta", "pretrain"), pretrain_cache=cache)
            per_task[task] = task_scores(res, cfg.algorithm.inner_steps)
            if res["skipped"]:
                per_task[task]["skipped"] = res["skipped"]
        budgets = res["budgets"]
        budgets["pretrain"].pop("val_history", None)
        fold_info.append({"split": split, "budgets": budgets})
        done = time.time() - t0
        log(f"fold {i + 1}/{len(splits)} (held out {', '.join(split['test'])}): {done:.0f} s so far, "
            f"about {done / (i + 1) * (len(splits) - i - 1):.0f} s to go")
    kind = source.kind
    verdicts = [verdict(per_task, kind, str(k)) for k in cfg.eval.shots
                if any(str(k) in v for v in per_task.values())]
    result = {"folds": folds, "kind": kind, "algorithm": cfg.algorithm.name, "inner_steps": cfg.algorithm.inner_steps,
              "plan": p, "per_task": per_task, "fold_info": fold_info, "verdicts": verdicts,
              "elapsed_s": round(time.time() - t0, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cv.json").write_text(json.dumps(result, indent=2))
    (out_dir / "cv.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    cls = result["kind"] == "classification"
    scale, unit = (100.0, "accuracy (%)") if cls else (1.0, "query MSE")
    lines = [f"Cross-validation over tasks ({result['folds']}, {result['algorithm']}): per held-out task, {unit}; "
             f"each method at the step count (0 or {result['inner_steps']}) its validation tasks preferred", "",
             "| held-out task | K | meta | meta steps | pooled | pooled steps (lr) |", "|---|---|---|---|---|---|"]
    for task, per_k in result["per_task"].items():
        for k, r in per_k.items():
            if k == "skipped":
                continue
            lr = f" (lr {r['pooled_lr']:g})" if r.get("pooled_lr") is not None else ""
            lines.append(f"| {task} | {k} | {sig(r['meta'] * scale)} | {r['meta_steps']} | {sig(r['pooled'] * scale)} "
                         f"| {r['pooled_steps']}{lr} |")
    lines += ["", "Verdict:", ""]
    for v in result["verdicts"]:
        lines.append(f"- {v['line']}")
        lines += [f"  ({n})" for n in v["notes"]]
    p = result["plan"]
    lines += ["", f"Compute: {p['folds']} folds x {count(p['meta_iterations_per_fold'])} meta-iterations "
              f"({count(p['task_gradient_evals_per_fold'])} task-gradient evaluations each); the pooled model got at "
              f"least as many per-sample gradients per fold, early-stopped on the fold's validation tasks; "
              f"{result['elapsed_s']:.0f} s in all."]
    return "\n".join(lines) + "\n"


def add_parser(sub) -> None:
    c = sub.add_parser("cv", help="cross-validate over tasks (small task counts): meta-learning vs a pooled model")
    c.add_argument("--config", required=True, help="YAML config with a table task")
    c.add_argument("--out", required=True, help="directory for the fold runs, cv.json and cv.md")
    c.add_argument("--folds", default="loto", help="loto (leave one task out, default) or kfold:K")
    c.add_argument("--max-folds", type=int, default=20, help="refuse more folds than this (each meta-trains)")
    c.add_argument("set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.iterations=500")
    c.set_defaults(func=_cli)


def _cli(args) -> int:
    cfg = load_config(args.config, list(args.set))
    result = cross_validate(cfg, args.out, args.folds, args.max_folds)
    print(markdown(result))
    return 0
