"""Never worse than the best thing we know (issue 13 part 1), measured through the real agent.

For a family: meta-train a run (or take --run), export it with its population model, start mosquitto and
the edge agent on the bundle, play --tasks unseen test lines of --parts parts each through the agent
(each line in its own context, inspection labels --label-delay parts later), and compare, per window
of label count, the agent's error with the population model, the adapted meta-init and the bare
meta-init on the same samples (edge_agent/simulate_many.py). Writes OUT/predictions_<family>.md/.json.

    .venv/bin/python benchmarks/predictions.py --family quality --tasks 100 --parts 300 --out docs/results
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))


def sh(*cmd) -> None:
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=REPO)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early ({proc.returncode})")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def dump_vibration_tasks(out: Path, tasks: int, parts: int, config: Path) -> None:
    """Unseen test machines, parts of random condition, labelled with the global class index."""
    import torch

    from export.population import global_label_tasks
    from meta_train.tasks import build_source

    source = build_source(dict((yaml.safe_load(config.read_text()) or {})["task"]))
    for i in range(tasks):
        x, y = global_label_tasks(source, "test", 1, parts, torch.Generator().manual_seed(500_000 + i))
        np.savez(out / f"line{i:04d}.npz", x=x[0].numpy().astype(np.float32), y=y[0].numpy().astype(np.int64))


def dump_quality_tasks(out: Path, tasks: int, parts: int, config: Path, scenario: str = "stationary") -> None:
    """Unseen test lines. stationary: one line per file. changeover: the line changes over to another
    unseen product halfway, without telling the agent (no context message). drift: the process drifts
    slowly from one unseen line's behaviour to another's over the file (every task parameter linearly)."""
    import torch

    from meta_train.config import from_dict
    from meta_train.tasks.quality import QualityOptions, QualitySource, unseen_task_id, write_task_file

    task = dict((yaml.safe_load(config.read_text()) or {}).get("task") or {})
    task.pop("name", None)
    opts = from_dict(QualityOptions, task, "task")
    if scenario == "stationary":
        for i in range(tasks):
            write_task_file(out / f"line{i:04d}.npz", parts, 100_000 + i, opts)  # test stream: never trained on
        return
    source = QualitySource(opts)
    for i in range(tasks):
        a, b = source.task_params([unseen_task_id(200_000 + i), unseen_task_id(300_000 + i)])
        w = torch.linspace(0, 1, parts, dtype=torch.float64)[:, None]
        if scenario == "changeover":
            w = (w >= 0.5).double()
        params = (1 - w) * a + w * b  # [parts, 12]: each part under its own moment's behaviour
        gen = torch.Generator().manual_seed(400_000 + i)
        x = source._settings(parts, 1, gen)  # [parts, 1, 4]
        y = source.response(params, x, torch.randn(parts, 1, generator=gen, dtype=torch.float64))
        np.savez(out / f"line{i:04d}.npz", x=x[:, 0].numpy().astype(np.float32), y=y[:, 0].numpy().astype(np.float32))


def through_agent(work: Path, bundle: Path, tasks, coverage: float, args):
    """Broker + agent (predictions.coverage = coverage), every task played through them; (ids, predictions)."""
    from edge_agent.simulate_many import play_all
    from edge_agent.simulator import LineClient

    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    user = pwd.getpwuid(os.geteuid()).pw_name
    (work / "mosquitto.conf").write_text(f"user {user}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
                                         "persistence false\nmax_queued_messages 0\n")
    broker = agent = line = None
    try:
        broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")],
                                  stdout=open(work / "mosquitto.log", "w"), stderr=subprocess.STDOUT)
        wait_port(port, broker)
        prefix = "bench/predictions"
        cfg = {"topic_prefix": prefix, "state_dir": str(work / "state"), "log_level": "warning",
               "broker": {"host": "127.0.0.1", "port": port, "client_id": "bench-predictions"},
               "bundle": {"dir": str(bundle), "allow_unsigned": True},
               "adaptation": {"support_size": args.support_size, "adapt_every": 1, "min_labels": 1},
               "predictions": {"coverage": coverage, "spec": {"lower": args.spec_lower},
                               "alarm_threshold": args.alarm_threshold}}
        (work / "agent.yaml").write_text(yaml.safe_dump(cfg))
        agent = subprocess.Popen([str(BIN / "edge-agent"), "run", "--config", str(work / "agent.yaml")],
                                 stdout=open(work / "agent.log", "w"), stderr=subprocess.STDOUT, cwd=REPO)
        line = LineClient("127.0.0.1", port, prefix)
        if not line.wait_for(lambda: any(s.get("status") == "online" for s in line.status), 30):
            raise RuntimeError("agent did not come online: " + (work / "agent.log").read_text()[-2000:])
        ids = play_all(line, tasks, f"b{uuid.uuid4().hex[:4]}", args.label_delay, timeout=60)
        line.wait_for(lambda: False, 1.0)  # the last alarms follow their predictions
        return ids, line.predictions, {a.get("id") for a in line.alarms}
    finally:
        if line is not None:
            line.close()
        for p in (agent, broker):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="quality", choices=["quality", "vibration"],
                    help="vibration: classification (error rate; no intervals or alarms)")
    ap.add_argument("--run", help="an existing run directory (default: train one with --config)")
    ap.add_argument("--config", default=None, help="default: configs/<family>.yaml")
    ap.add_argument("--iterations", type=int, default=None, help="override train.iterations")
    ap.add_argument("--tasks", type=int, default=100)
    ap.add_argument("--parts", type=int, default=300)
    ap.add_argument("--label-delay", type=int, default=5)
    ap.add_argument("--support-size", type=int, default=10)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--bundle", help="an existing bundle (skips training and export)")
    ap.add_argument("--coverages", type=lambda v: [float(c) for c in v.split(",")], default=[0.9, 0.8],
                    help="predictions.coverage values to run the agent with, one pass each (default 0.9,0.8)")
    ap.add_argument("--spec-lower", type=float, default=2.0,
                    help="lower spec limit of the quality (about 9 %% of parts on unseen lines fall below 2.0)")
    ap.add_argument("--alarm-threshold", type=float, default=0.2, help="predictions.alarm_threshold of the agent")
    ap.add_argument("--scenario", default="stationary", choices=["stationary", "changeover", "drift"],
                    help="changeover: each line changes product halfway unannounced; drift: slowly (default stationary)")
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one, removed)")
    args = ap.parse_args()
    args.config = args.config or f"configs/{args.family}.yaml"
    metric = "error rate" if args.family == "vibration" else "MSE"

    from edge_agent.model import Model, load_manifest
    from edge_agent.simulate_many import (alarm_markdown, alarm_rows, interval_markdown, load_tasks, markdown,
                                          score_task, summarise)

    work = Path(args.work or tempfile.mkdtemp(prefix="predictions-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    run = Path(args.run) if args.run else work / "run"
    if not args.run and not args.bundle:
        extra = [f"train.iterations={args.iterations}"] if args.iterations else []
        sh(BIN / "meta-train", "train", "--config", args.config, "--out", run, "train.progress=false", *extra)
    bundle = Path(args.bundle) if args.bundle else work / "bundle"
    if not args.bundle:
        sh(BIN / "meta-export", "--run", run, "--out", bundle)
    tasks_dir = work / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    if args.family == "vibration":
        dump_vibration_tasks(tasks_dir, args.tasks, args.parts, REPO / args.config)
    else:
        dump_quality_tasks(tasks_dir, args.tasks, args.parts, REPO / args.config, args.scenario)

    tasks = load_tasks(tasks_dir)
    runs = {c: through_agent(work / f"cov{c}", bundle, tasks, c, args) for c in args.coverages}
    model = Model(str(bundle), load_manifest(str(bundle), None, allow_unsigned=True))
    md, result, ok = "", {"args": vars(args), "coverages": {}}, True
    for c, (ids, predictions, alarmed) in runs.items():
        scored = [score_task(model, x, y, tid, predictions, args.label_delay, args.support_size)
                  for (name, x, y), tid in zip(tasks, ids)]
        missing = sum(int(np.isnan(s["agent"]).sum()) for s in scored)
        rows = summarise(scored)
        result["coverages"][str(c)] = {"rows": rows, "missing": missing}
        ok = ok and missing == 0 and all(r["no_worse"] for r in rows)
        what = (f"{args.tasks} unseen test lines x {args.parts} parts ({args.scenario}) through the edge agent (support "
                f"{args.support_size}, labels {args.label_delay} parts late, predictions.coverage {c})")
        if c == args.coverages[0]:
            md += markdown(rows, f"### {args.family}: errors, {what}; {metric}, mean ± 95 % CI over lines", metric) + "\n"
            md += f"Predictions missing: {missing}.\n\n"
        md += "" if args.family == "vibration" else interval_markdown(rows, c, f"### {args.family}: intervals at {c:.0%}, {what}; coverage mean ± "
                                         "95 % CI over lines") + f"\nPredictions missing: {missing}.\n\n"
        if c == args.coverages[0] and args.family == "quality":
            arows = alarm_rows(scored, alarmed, args.spec_lower, None, thresholds=(0.5,))
            result["alarms"] = arows
            md += alarm_markdown(arows, f"### {args.family}: scrap detection (spec: quality >= {args.spec_lower}), {what}",
                                 args.alarm_threshold, (0.5,)) + "\n"
    curves = model.manifest["predictors"]["expected_error"]
    md += (f"Validation curves in the manifest ({curves['tasks']} val tasks): population {curves['metric']} "
           f"{curves['population']:.4g}; adapted at K=0/1/2/5/10: "
           + "/".join(f"{curves['adapted'][k]:.4g}" for k in (0, 1, 2, 5, 10) if k < len(curves["adapted"]))
           + f". Wall time {time.time() - t0:.0f} s.\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = f"Made by `.venv/bin/python benchmarks/predictions.py {' '.join(sys.argv[1:])}`\n\n" + md
    stem = f"predictions_{args.family}" + ("" if args.scenario == "stationary" else f"_{args.scenario}")
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str))
    print(md)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
