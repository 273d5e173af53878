"""`meta-train`: a thin entry point. Errors of the MetaTrainError family become exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import MetaTrainError


def _train(args) -> int:
    from .config import load_config
    from .train import train

    overrides = list(args.set) + ([f"device={args.device}"] if args.device else [])
    cfg = load_config(args.config, overrides)
    path = train(cfg, args.out, resume=args.resume, max_iterations=args.max_iterations)
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 writes the checkpoint
        print(final_line(path))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .train import leave_worker

        leave_worker(0)  # under torchrun: see leave_worker for why not a normal interpreter exit
    return 0


def final_line(path) -> str:
    """The run's last line: where the checkpoint is, and the meta-loss it ended with (so a bad run shows)."""
    from . import checkpoint

    ckpt = checkpoint.load(path)
    loss, ema = ckpt.get("meta_loss"), ckpt.get("meta_loss_ema")
    losses = "no iteration run" if loss is None else f"final meta-loss {loss:.6g} (moving average {ema:.6g})"
    skips = ckpt.get("nonfinite_skips", 0)
    skipped = f", {skips} non-finite batch(es) skipped" if skips else ""
    return f"checkpoint: {path} (iteration {ckpt['iteration']}, {losses}{skipped})"


def _eval(args) -> int:
    from . import split_guard
    from .config import apply_overrides, from_dict, EvalConfig, BaselineConfig, to_dict
    from .evaluate import evaluate, write_reports
    from .tasks import build_source
    from .trained import load_trained

    trained = load_trained(args.run)
    data = {"eval": to_dict(trained.config)["eval"], "baselines": to_dict(trained.config)["baselines"],
            "task": dict(trained.config.task)}
    data = apply_overrides(data, args.set)
    unknown = set(data) - {"eval", "baselines", "task"}
    if unknown:
        raise MetaTrainError(f"meta-train eval only takes eval.*, baselines.* and task.* overrides, not {sorted(unknown)}")
    ecfg = from_dict(EvalConfig, data["eval"], "eval")
    bcfg = from_dict(BaselineConfig, data["baselines"], "baselines")
    source = build_source(data["task"])
    note = split_guard.check(trained.split, split_guard.identity(data["task"], source), args.new_tasks)
    if note:
        print(note)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = evaluate(trained, source, ecfg, bcfg, which=methods, split=args.split)
    if note:
        results["split_note"] = note
    paths = write_reports(results, Path(args.out or args.run), stem=args.stem)
    print(Path(paths["markdown"]).read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    if results["skipped"]:  # the other Ks are written above; the exit code still says something was left out
        print(f"meta-train: error: K={', '.join(results['skipped'])} skipped (see the table); exit 3", file=sys.stderr)
        return 3
    return 0


def _dump_task(args) -> int:
    from . import dump_task
    from .config import apply_overrides, load_config
    from .errors import ConfigError
    from .tasks import build_source

    if bool(args.run) == bool(args.config):
        raise ConfigError("give --run RUN (its task settings) or --config CFG, one of them")
    if args.rows < 2:
        raise ConfigError("--rows must be >= 2")
    if args.run and any(not item.startswith("task.") for item in args.set):
        raise ConfigError(f"dump-task --run only takes task.* overrides, not {[i for i in args.set if not i.startswith('task.')]}")
    if args.run:
        from . import split_guard
        from .trained import load_trained

        trained = load_trained(args.run)
        task = apply_overrides({"task": dict(trained.config.task)}, args.set)["task"]
        source = build_source(task)
        # the test split's tasks are unseen only while the split is the run's own (as for eval)
        note = split_guard.check(trained.split, split_guard.identity(task, source), args.new_tasks)
        if note:
            print(note)
    else:
        source = build_source(dict(load_config(args.config, args.set).task))
    x, y, what = dump_task.task_arrays(source, args.split, args.task, args.rows, args.seed)
    path = dump_task.write(args.out, x, y, source.describe().get("feature_names"))
    print(f"task file: {path} ({what}; x {list(x.shape)}, y {y.dtype})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meta-train", description="Meta-train and evaluate initialisations.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="meta-train from a YAML config")
    t.add_argument("--config", help="YAML config (defaults are the MAML paper's sinusoid setup)")
    t.add_argument("--out", required=True, help="run directory for checkpoint.pt and metrics.jsonl")
    t.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    t.add_argument("--device", help="cpu (default) or cuda / cuda:N where a GPU exists")
    t.add_argument("--max-iterations", type=int, default=None, help="stop after this many more iterations")
    t.add_argument("set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.iterations=500")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a run against scratch and pretrain + fine-tune")
    e.add_argument("--run", required=True)
    e.add_argument("--out", help="directory for eval.json / eval.md / eval.png (default: the run dir)")
    e.add_argument("--stem", default="eval")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--methods", default="meta,scratch,pretrain")
    e.add_argument("--new-tasks", action="store_true",
                   help="evaluate even though the data or task settings give another split than the run's "
                        "(the tasks may overlap the run's training tasks; the output says so)")
    e.add_argument("set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. eval.tasks=1000 eval.shots=[5]")
    e.set_defaults(func=_eval)

    d = sub.add_parser("dump-task", help="write one task as a line-simulator task file (edge-agent simulate)")
    d.add_argument("--run", help="take the task settings from this run (default split: its test tasks)")
    d.add_argument("--config", help="or from this YAML config")
    d.add_argument("--out", required=True, help="task file to write (.npz)")
    d.add_argument("--split", default="test", choices=["train", "val", "test"])
    d.add_argument("--task", help="a table's task (a value of task_column; default: the split's first)")
    d.add_argument("--rows", type=int, default=500, help="at most this many samples (default 500)")
    d.add_argument("--seed", type=int, default=0, help="which task a synthetic source draws")
    d.add_argument("--new-tasks", action="store_true", help="with --run: as for eval, accept another split")
    d.add_argument("set", nargs="*", metavar="KEY=VALUE", help="task overrides, e.g. task.path=new.csv")
    d.set_defaults(func=_dump_task)

    from .crossval import add_parser as add_cv  # `meta-train cv`: its flags live with its code

    add_cv(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MetaTrainError as e:
        print(f"meta-train: error: {e}", file=sys.stderr)
        if args.command == "train" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from .train import leave_worker

            leave_worker(e.exit_code)  # every rank stops alike (e.g. one non-finite average); see leave_worker
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
