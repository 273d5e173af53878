"""`meta-export`: a thin entry point. ExportError / MetaTrainError become exit codes with one message."""

from __future__ import annotations

import argparse
import sys


def _keygen(args) -> int:
    # Only `cryptography` here: keys can be made on a machine without torch.
    from .errors import SigningKeyError
    from .signing import generate_keypair

    try:
        priv, pub = generate_keypair(args.out)
    except FileExistsError as e:
        raise SigningKeyError(str(e)) from None
    print(f"private key: {priv} (keep it off the devices)\npublic key:  {pub} (give this to the devices)")
    return 0


def _export(args) -> int:
    from .bundle import export_bundle

    result = export_bundle(args.run, args.out, sign_key=args.sign_key, max_support=args.max_support,
                           steps=args.steps, optimize=not args.no_optimize, pooled=args.pooled,
                           population_model=False if args.no_population else None)
    m = result.manifest
    print(f"bundle: {result.path} model_version {m['model_version']} "
          f"({'signed' if result.signed else 'UNSIGNED'}, {m['task_kind']}, state {m['state_size']}, "
          f"{m['inner']['steps']} steps, max_support {m['max_support']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meta-export",
        description="Export a meta-trained run as a device bundle (docs/bundle.md). "
                    "`meta-export keygen --out DIR` makes a signing key pair.",
    )
    p.add_argument("--run", help="run directory (or checkpoint.pt) written by meta-train")
    p.add_argument("--out", help="bundle directory to write (new, empty, or a previous bundle)")
    p.add_argument("--sign-key", help="Ed25519 private key (PEM) from `meta-export keygen`")
    p.add_argument("--max-support", type=int, default=64, help="largest support set the device may pass (default 64)")
    p.add_argument("--steps", type=int, default=None, help="inner steps in the graph (default: the trained number)")
    p.add_argument("--no-optimize", action="store_true",
                   help="export autograd's graph verbatim, without export/optimize.py's rewrites (slower; for diagnosis)")
    p.add_argument("--pooled", action="store_true",
                   help="export the run's pooled model (pretrain on all training tasks, fine-tuned on the device) "
                        "instead of the meta-learned one: for a run whose verdict is 'use a pooled model'")
    p.add_argument("--no-population", action="store_true",
                   help="do not ship the population model and expected-error curves (bundles have them by default "
                        "where the task family allows: regression, vibration; the device then always uses the "
                        "meta-init / adapted model)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["keygen"]:
            k = argparse.ArgumentParser(prog="meta-export keygen", description="Write an Ed25519 signing key pair.")
            k.add_argument("--out", required=True, help="directory for signing_key.pem and signing_key.pub.pem")
            return _keygen(k.parse_args(argv[1:]))
        args = build_parser().parse_args(argv)
        if not args.run or not args.out:
            build_parser().error("--run and --out are required (or: meta-export keygen --out DIR)")
        return _export(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        return _report(e)


def _report(e: Exception) -> int:
    from .errors import ExportError

    try:
        from meta_train.errors import MetaTrainError
    except ImportError:  # keygen without the training stack installed
        MetaTrainError = ExportError
    if isinstance(e, (ExportError, MetaTrainError)):
        print(f"meta-export: error: {e}", file=sys.stderr)
        return e.exit_code
    raise e


if __name__ == "__main__":
    sys.exit(main())
