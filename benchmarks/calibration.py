"""Calibrated probabilities and conformal prediction sets of a classification bundle, per window of label
count, on unseen test machines (issue 13 part 2), through the device's own code (onnxruntime graphs,
edge_agent/predictors.py choice, edge_agent/calibration.py) without MQTT.

Each machine is a line: parts in order, each part's label known right after its prediction, the model
re-adapted on the newest min(labels, max_support) labels before every part (the agent with
adapt_every 1, min_labels 1). Per window: set coverage at 80 / 90 % and mean set size (mean +- 95 % CI
over machines), ECE of the raw softmax and of the calibrated probabilities (pooled parts), error rate.

    .venv/bin/python benchmarks/calibration.py --iterations 100 --tasks 100 --parts 300 --out docs/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOWS = [(0, 0), (1, 4), (5, 9), (10, 19), (20, 10**9)]


def _ci(v) -> tuple[float, float]:
    v = np.asarray(v, float)
    return float(v.mean()), (1.96 * float(v.std(ddof=1)) / np.sqrt(len(v)) if len(v) > 1 else float("nan"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="a trained vibration run (default: train one with --iterations)")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--max-support", type=int, default=20)
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--parts", type=int, default=300)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--work", default=None, help="where the run and bundle go (default: a temp dir)")
    args = ap.parse_args()

    import tempfile

    import torch

    torch.set_num_threads(1)
    from edge_agent.calibration import Calibration
    from edge_agent.model import Model
    from export import population
    from export.bundle import export_bundle
    from export.calibration import ece
    from meta_train.config import load_config
    from meta_train.train import train
    from meta_train.trained import load_trained

    work = Path(args.work or tempfile.mkdtemp(prefix="calib_bench_"))
    run = Path(args.run) if args.run else work / "run"
    t0 = time.time()
    if not args.run:
        train(load_config(str(REPO / "configs" / "vibration.yaml"),
                          [f"train.iterations={args.iterations}", "train.progress=false", "train.checkpoint_every=0"]), run)
    r = export_bundle(run, work / "bundle", max_support=args.max_support, parity_tasks=2, log=lambda *_: None)
    print(f"run + export: {time.time() - t0:.0f} s", flush=True)
    m = Model(str(r.path), r.manifest)
    cal = Calibration.from_manifest(r.manifest)
    source = population.source_of(load_trained(run))
    x, y = population.global_label_tasks(source, "test", args.tasks, args.parts, torch.Generator().manual_seed(7))
    x, y = x.numpy(), y.numpy()

    rows = []  # (task, labels, src, raw probs, calibrated probs, y)
    for t in range(args.tasks):
        for i in range(args.parts):
            n = min(i, args.max_support)
            adapted = m.adapt(x[t, i - n:i], y[t, i - n:i]) if n else None
            src, state = m.predictors.choose(adapted, n, m.init_state)
            raw = m.predict(state, x[t, i:i + 1])
            k = 0 if src == "meta_init" else n
            rows.append((t, i, src, k, raw[0], cal.probabilities(src, k, raw)[0], int(y[t, i])))
    print(f"played {args.tasks} x {args.parts} parts: {time.time() - t0:.0f} s", flush=True)

    table = []
    for lo, hi in WINDOWS:
        sel = [r_ for r_ in rows if lo <= r_[1] <= hi]
        raw = np.array([r_[4] for r_ in sel])
        calp = np.array([r_[5] for r_ in sel])
        ys = np.array([r_[6] for r_ in sel])
        row = {"labels": f"{lo}" if lo == hi else (f"{lo}+" if hi > 10**6 else f"{lo}-{hi}"), "parts": len(sel),
               "error_rate": float((calp.argmax(-1) != ys).mean()),
               "ece_raw": ece(raw, ys), "ece_calibrated": ece(calp, ys),
               "sources": sorted({r_[2] for r_ in sel})}
        for cov in (0.9, 0.8):
            per_task_cov, per_task_size = {}, {}
            for r_ in sel:
                s = cal.prediction_set(r_[2], r_[3], r_[5], cov)
                per_task_cov.setdefault(r_[0], []).append(r_[6] in s)
                per_task_size.setdefault(r_[0], []).append(len(s))
            row[f"coverage_{int(cov * 100)}"] = _ci([np.mean(v) for v in per_task_cov.values()])
            row[f"set_size_{int(cov * 100)}"] = float(np.mean([np.mean(v) for v in per_task_size.values()]))
        table.append(row)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = "benchmarks/calibration.py " + " ".join(sys.argv[1:])
    (out / "calibration_vibration.json").write_text(json.dumps(
        {"command": cmd, "tasks": args.tasks, "parts": args.parts, "max_support": args.max_support,
         "iterations": args.iterations if not args.run else None, "windows": table,
         "manifest_calibration": r.manifest["predictors"]["expected_error"]["calibration"]["fit"]}, indent=1))
    lines = [f"# Calibration and prediction sets, vibration ({args.tasks} unseen test machines x {args.parts} parts)", "",
             f"`.venv/bin/python {cmd}`", "",
             "| labels | parts | error rate | ECE raw | ECE calibrated | 90 % set: coverage, size | 80 % set: coverage, size | source |",
             "|---|---|---|---|---|---|---|---|"]
    for w in table:
        c9, c8 = w["coverage_90"], w["coverage_80"]
        lines.append(f"| {w['labels']} | {w['parts']} | {w['error_rate']:.3f} | {w['ece_raw']:.3f} | {w['ece_calibrated']:.3f} "
                     f"| {100 * c9[0]:.1f} +- {100 * c9[1]:.1f} %, {w['set_size_90']:.2f} "
                     f"| {100 * c8[0]:.1f} +- {100 * c8[1]:.1f} %, {w['set_size_80']:.2f} | {', '.join(w['sources'])} |")
    (out / "calibration_vibration.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
