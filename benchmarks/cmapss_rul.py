"""C-MAPSS few-shot RUL: supervised anchor, meta-learned CNN, pretrain + fine-tune and scratch on K target units.

    .venv/bin/python benchmarks/cmapss_rul.py --data-dir ../shared/data/cmapss --out docs/results \
        --targets FD002,FD004 --ks 1,3,5,10 --draws 5 --algorithms maml,metasgd

Per target sub-dataset T (sources: the other three, configs/cmapss.yaml + overrides):
- anchor: the CNN trained supervised (Adam) on windows of ALL of T's training units, scored on T's official test
  units (last window each): RMSE and NASA score, in cycles;
- meta: every --algorithms entry meta-trained by the real trainer on the sources (tasks = a sub-dataset with
  K = train.shots support units), then adapted to K units of T with its own inner loop (learned rates for
  Meta-SGD);
- pretrain: one CNN trained on windows pooled over the source units (the meta run's per-sample gradient budget,
  early-stopped on source-val windows), then fine-tuned on the K units by the same inner loop (plain SGD);
- scratch: a random init fine-tuned the same way.
For each K and draw d, the K units (and the support windows taken from them) are the same for every method.
The baselines' fine-tune rate is chosen per K and step budget from --baseline-lrs on source *validation* tasks
(held-out source units), never on T. Results: OUT/cmapss.json and OUT/cmapss.md (rewritten every run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.func import functional_call  # noqa: E402

from meta_train.baselines import matched_iterations, meta_budget, pretrain, scratch_params  # noqa: E402
from meta_train.config import load_config  # noqa: E402
from meta_train.inner import InnerConfig, adapt, init_inner_lrs  # noqa: E402
from meta_train.model import build_model, init_params  # noqa: E402
from meta_train.tasks.cmapss import SUBSETS, CMAPSSOptions, CMAPSSSource  # noqa: E402
from meta_train.train import model_spec, train  # noqa: E402
from meta_train.trained import load_trained  # noqa: E402

T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 19: 2.09}


def nasa_score(pred, true) -> float:
    """PHM08 score, d = predicted - true: late predictions (d > 0) cost more."""
    d = pred - true
    return float(torch.where(d < 0, torch.exp(-d / 13) - 1, torch.exp(d / 10) - 1).sum())


def scores(model, params, x, y_cycles, cap) -> dict:
    with torch.no_grad():
        pred = functional_call(model, params, (x,)) * cap
    capped = y_cycles.clamp(max=cap)  # for comparison with papers that cap the true test RUL as well
    return {"rmse": float(((pred - y_cycles) ** 2).mean().sqrt()), "score": nasa_score(pred, y_cycles),
            "rmse_vs_capped_truth": float(((pred - capped) ** 2).mean().sqrt())}


def mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, T_975.get(n - 1, 1.96) * sd / math.sqrt(n)


def supervised_anchor(source, spec, subset, iterations, batch, lr, seed):
    """The CNN trained on every full window of every training unit of `subset` (Adam, minibatches)."""
    parts = [source.unit_windows(u, None, None) for u in source.units[(subset, "train")]]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    model = build_model(spec)
    gen = torch.Generator().manual_seed(seed)
    params = {n: p.requires_grad_() for n, p in init_params(model, gen).items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(iterations):
        i = torch.randint(0, len(x), (batch,), generator=gen)
        loss = ((functional_call(model, params, (x[i],)) - y[i]) ** 2).mean()
        if not torch.isfinite(loss):
            raise RuntimeError("anchor training: non-finite loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, {n: p.detach() for n, p in params.items()}, len(x)


def draw_support(source, subset, k, per_unit, seed):
    """K training units of `subset` and `per_unit` random full windows from each: the same for every method."""
    gen = torch.Generator().manual_seed(seed)
    units = source.units[(subset, "train")]
    pick = torch.randperm(len(units), generator=gen)[:k].tolist()
    parts = [source.unit_windows(units[i], per_unit, gen) for i in pick]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), pick


def adapted(model, params, lrs, sx, sy, steps):
    if steps == 0:
        return params
    with torch.no_grad():  # torch.func.grad inside still differentiates; no graph over params is kept
        return adapt(model, params, lrs, sx, sy, InnerConfig(steps=steps, loss="mse"), steps=steps)


def choose_lr(model, params, source, k, steps, grid, tasks, per_unit, seed):
    """The fine-tune rate with the lowest query MSE on source-validation tasks (K held-out units each)."""
    gen = torch.Generator().manual_seed(seed)
    saved = source.opts.windows_per_unit
    source.opts.windows_per_unit = per_unit
    try:
        batch = source.sample("val", tasks, k, 128, gen)
    finally:
        source.opts.windows_per_unit = saved
    best = None
    for lr in grid:
        lrs = init_inner_lrs(params, InnerConfig(lr=lr))
        losses = []
        for t in range(tasks):
            p = adapted(model, params, lrs, batch.support_x[t], batch.support_y[t], steps)
            with torch.no_grad():
                losses.append(float(((functional_call(model, p, (batch.query_x[t],)) - batch.query_y[t]) ** 2).mean()))
        loss = sum(losses) / tasks
        if math.isfinite(loss) and (best is None or loss < best[1]):
            best = (lr, loss)
    if best is None:
        raise RuntimeError(f"every fine-tune rate in {grid} diverged on the validation tasks")
    return best[0]


def run_target(args, target: str, log) -> dict:
    sources = [s for s in SUBSETS if s != target]
    overrides = [f"task.data_dir={args.data_dir}", f"task.target={target}", f"task.sources=[{','.join(sources)}]",
                 f"train.iterations={args.meta_iterations}", f"task.window={args.window}", "train.progress=false",
                 f"train.threads={args.threads}"]
    base = load_config(ROOT / "configs" / "cmapss.yaml", overrides)
    source = CMAPSSSource(CMAPSSOptions(**{k: v for k, v in base.task.items() if k != "name"}))
    spec = model_spec(base, source)
    model = build_model(spec)
    cap = float(source.opts.rul_cap)
    test_x, test_y = source.last_windows(target)
    out = {"target": target, "sources": sources, "test_units": len(test_y), "window": args.window, "rul_cap": cap,
           "cap_test_rul": source.opts.cap_test_rul, "spec": spec}

    t0 = time.time()
    amodel, aparams, n_windows = supervised_anchor(source, spec, target, args.anchor_iterations, 256, 1e-3, 0)
    out["anchor"] = {**scores(amodel, aparams, test_x, test_y, cap), "train_windows": n_windows,
                     "iterations": args.anchor_iterations, "batch": 256, "seconds": round(time.time() - t0, 1)}
    log(f"{target} anchor (all {len(source.units[(target, 'train')])} units): {out['anchor']}")

    inits = {}  # method -> (params, lrs or None for the baselines)
    budget = None
    for name in args.algorithms:
        cfg = load_config(ROOT / "configs" / "cmapss.yaml", overrides + [f"algorithm.name={name}"])
        run = Path(args.work) / f"{target}_{name}"
        t0 = time.time()
        train(cfg, run, source=source)
        trained = load_trained(run)
        inits[name] = (trained.params, trained.inner_lrs, trained.algorithm.inner.steps)
        if budget is None:
            budget = meta_budget(cfg, cfg.train.iterations, "regression", rows_per_shot=source.rows_per_shot)
        out.setdefault("meta_seconds", {})[name] = round(time.time() - t0, 1)
        log(f"{target} meta-trained {name} in {out['meta_seconds'][name]} s")

    val_x, val_y = [], []
    vgen = torch.Generator().manual_seed(7)
    vb = source.sample("val", 8, 1, 64, vgen)
    val_x, val_y = vb.query_x.flatten(0, 1), vb.query_y.flatten(0, 1)

    def val_score(p):
        with torch.no_grad():
            return float(((functional_call(model, p, (val_x,)) - val_y) ** 2).mean())

    iters = matched_iterations(budget, base.baselines.pretrain_batch) if budget else args.anchor_iterations
    t0 = time.time()
    pre, info = pretrain(spec, source, iters, base.baselines.pretrain_batch, base.baselines.pretrain_lr, 0,
                         val_score=val_score, patience=10)
    out["pretrain"] = {k: info[k] for k in ("iterations_budget", "iterations_run", "best_iteration", "best_val_score")}
    out["meta_budget"] = budget
    out["pretrain"]["seconds"] = round(time.time() - t0, 1)
    log(f"{target} pretrained: {out['pretrain']}")
    inits["pretrain"] = (pre, None, None)
    inits["scratch"] = (scratch_params(spec, 1), None, None)

    rows = []
    for k in args.ks:
        for steps_kind in ("trained", "long"):
            for method, (params, lrs, trained_steps) in inits.items():
                steps = (trained_steps or args.short_steps) if steps_kind == "trained" else args.long_steps
                if lrs is None:
                    lr = choose_lr(model, params, source, k, steps, args.baseline_lrs, args.val_tasks,
                                   args.support_windows, 11 + k)
                    use = init_inner_lrs(params, InnerConfig(lr=lr))
                else:
                    lr, use = None, lrs
                per_draw = []
                for d in range(args.draws):
                    sx, sy, units = draw_support(source, target, k, args.support_windows, 1000 * k + d)
                    p = adapted(model, params, use, sx, sy, steps)
                    per_draw.append({**scores(model, p, test_x, test_y, cap), "units": units})
                rmse = mean_ci([r["rmse"] for r in per_draw])
                score = mean_ci([r["score"] for r in per_draw])
                rows.append({"k": k, "method": method, "steps": steps, "lr": lr, "rmse": rmse, "score": score,
                             "draws": per_draw})
                log(f"{target} K={k} {method} {steps} steps (lr {lr}): RMSE {rmse[0]:.2f} ± {rmse[1]:.2f}, "
                    f"score {score[0]:.0f} ± {score[1]:.0f}")
    out["few_shot"] = rows
    return out


def markdown(results: list[dict], command: str, args) -> str:
    lines = ["# C-MAPSS few-shot RUL (CNN, last-window RMSE and NASA score on the official test units)", "",
             f"Made by `{command}` ({args.threads} torch thread(s); reduced iterations, see docs/results/cmapss.md "
             "notes). Mean ± 95 % CI (Student t) over the draws of the K target units.", ""]
    for r in results:
        a = r["anchor"]
        lines += [f"## Target {r['target']} (sources {', '.join(r['sources'])}; {r['test_units']} test units, "
                  f"window {r['window']}, RUL cap {r['rul_cap']:.0f}, test RUL capped: {r['cap_test_rul']})", "",
                  f"Supervised anchor, CNN trained on all {a['train_windows']:,} windows of the target's training units "
                  f"({a['iterations']} Adam iterations of {a['batch']}): **RMSE {a['rmse']:.2f}, score {a['score']:.0f}** "
                  f"(RMSE {a['rmse_vs_capped_truth']:.2f} against the test RUL capped at {r['rul_cap']:.0f}).",
                  "", "| K units | method | inner steps | fine-tune lr | RMSE | NASA score |", "|---|---|---|---|---|---|"]
        for row in r["few_shot"]:
            lr = "learned" if row["lr"] is None and row["method"] == "metasgd" else (row["lr"] or "inner_lr")
            lines.append(f"| {row['k']} | {row['method']} | {row['steps']} | {lr} | {row['rmse'][0]:.2f} ± "
                         f"{row['rmse'][1]:.2f} | {row['score'][0]:.0f} ± {row['score'][1]:.0f} |")
        lines += ["", f"Meta-training seconds: {r.get('meta_seconds')}; pretraining: {r['pretrain']}", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--work", default="runs/cmapss_bench", help="meta-training run folders")
    ap.add_argument("--targets", default="FD002,FD004")
    ap.add_argument("--ks", default="1,3,5,10")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--algorithms", default="maml,metasgd")
    ap.add_argument("--window", type=int, default=30)
    ap.add_argument("--meta-iterations", type=int, default=2000)
    ap.add_argument("--anchor-iterations", type=int, default=3000)
    ap.add_argument("--support-windows", type=int, default=50, help="windows drawn from each of the K units")
    ap.add_argument("--short-steps", type=int, default=2, help="baselines' step count in the 'trained' column")
    ap.add_argument("--long-steps", type=int, default=30)
    ap.add_argument("--baseline-lrs", default="0.01,0.03,0.1,0.3")
    ap.add_argument("--val-tasks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    args.targets = args.targets.split(",")
    args.ks = [int(k) for k in args.ks.split(",")]
    args.algorithms = [a for a in args.algorithms.split(",") if a]
    args.baseline_lrs = [float(v) for v in args.baseline_lrs.split(",")]
    torch.set_num_threads(args.threads)
    start = time.time()
    log = lambda msg: print(f"[{time.time() - start:7.1f} s] {msg}", flush=True)  # noqa: E731
    results = [run_target(args, t, log) for t in args.targets]
    command = "python benchmarks/cmapss_rul.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cmapss.json").write_text(json.dumps({"command": command, "seconds": round(time.time() - start, 1),
                                                 "results": results}, indent=1))
    (out / "cmapss_table.md").write_text(markdown(results, command, args))
    log(f"wrote {out / 'cmapss.json'} and {out / 'cmapss_table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
