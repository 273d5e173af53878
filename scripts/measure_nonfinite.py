"""Measure what each answer to a diverging run does on a glitchy table (issue 11): train.on_nonfinite stop /
skip_batch, and robust input scaling, over several seeds. Prints a Markdown table (docs/tasks.md quotes it).

    .venv/bin/python scripts/measure_nonfinite.py [--seeds 4] [--iterations 1000]

The table is tests/tasks/spiky_table.py's: 8 experiments x 400 rows, one glitch row in each of two columns
(~48 standard deviations out after standardisation); MAML, 5 inner steps at inner_lr 0.3 (and 0.1).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tasks"))

from spiky_table import write_spiky_csv  # noqa: E402

from meta_train import checkpoint  # noqa: E402
from meta_train.config import EvalConfig, BaselineConfig, load_config  # noqa: E402
from meta_train.errors import NonFiniteError  # noqa: E402
from meta_train.evaluate import evaluate  # noqa: E402
from meta_train.tasks import build_source  # noqa: E402
from meta_train.trained import load_trained  # noqa: E402
from meta_train.train import train  # noqa: E402

POLICIES = {
    "standard, stop": ["task.scaling.inputs=standard", "train.on_nonfinite=stop"],
    "standard, skip_batch (max 10)": ["task.scaling.inputs=standard", "train.on_nonfinite=skip_batch"],
    "robust (clip 5), stop": ["task.scaling.inputs=robust", "train.on_nonfinite=stop"],
    "standard, stop, inner_lr 0.1": ["task.scaling.inputs=standard", "algorithm.inner_lr=0.1"],
    "robust (clip 5), stop, inner_lr 0.1": ["task.scaling.inputs=robust", "algorithm.inner_lr=0.1"],
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=1000)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="nonfinite."))
    csv_path = write_spiky_csv(work / "mill.csv")
    base = [f"task.path={csv_path}", "task.name=table", "task.task_column=exp", "task.target=target",
            "model.hidden=[16]", "algorithm.name=maml", "algorithm.inner_steps=5", "algorithm.inner_lr=0.3",
            f"train.iterations={args.iterations}", "train.meta_batch=8", "train.shots=10", "train.query=10",
            "train.meta_lr=0.003", "train.checkpoint_every=0", "train.progress=false"]
    print(f"| policy | runs finished | stopped at iteration | test MSE K=10, 5 steps (finished runs) | time |")
    print("|---|---|---|---|---|")
    for index, (name, extra) in enumerate(POLICIES.items()):
        finished, stops, mses, t0 = 0, [], [], time.time()
        for seed in range(args.seeds):
            out = work / f"run-{index}-{seed}"
            cfg = load_config(None, [*base, *extra, f"seed={seed}"])
            try:
                train(cfg, out)
            except NonFiniteError as e:
                stops.append(str(e).split(" at iteration ")[1].split(":")[0])
                continue
            finished += 1
            trained = load_trained(out)
            res = evaluate(trained, build_source(dict(cfg.task)), EvalConfig(tasks=200, shots=[10], steps=[5], query=20),
                           BaselineConfig(), which=["meta"])
            mses.append(res["by_shots"]["10"]["meta"]["loss"]["5"]["mean"])
            shutil.rmtree(out)
        mse = ", ".join(f"{m:.3g}" for m in mses) or "-"
        print(f"| {name} | {finished}/{args.seeds} | {', '.join(stops) or '-'} | {mse} | {time.time() - t0:.0f} s |",
              flush=True)
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
