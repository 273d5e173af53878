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
    print(f"checkpoint: {path}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .train import leave_worker

        leave_worker(0)  # under torchrun: see leave_worker for why not a normal interpreter exit
    return 0


def _eval(args) -> int:
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
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    results = evaluate(trained, source, ecfg, bcfg, which=methods, split=args.split)
    paths = write_reports(results, Path(args.out or args.run), stem=args.stem)
    print(Path(paths["markdown"]).read_text())
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    if results["skipped"]:  # the other Ks are written above; the exit code still says something was left out
        print(f"meta-train: error: K={', '.join(results['skipped'])} skipped (see the table); exit 3", file=sys.stderr)
        return 3
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
    e.add_argument("set", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. eval.tasks=1000 eval.shots=[5]")
    e.set_defaults(func=_eval)

    from .crossval import add_parser as add_cv  # `meta-train cv`: its flags live with its code

    add_cv(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MetaTrainError as e:
        print(f"meta-train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
