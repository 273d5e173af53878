"""Latency of one device adaptation: adapt (K support samples) + predict one sample, single thread.

    .venv/bin/python benchmarks/export_latency.py                 # trains a tiny 1-40-40-1 sinusoid run
    .venv/bin/python benchmarks/export_latency.py --run RUN_DIR   # or export an existing run
    .venv/bin/python benchmarks/export_latency.py --bundle DIR    # or time an existing bundle

Backends: ONNX Runtime with the device's session options, the bundle's TorchScript model.pt, and torch
eager (meta_train.inner.adapt itself). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _timeit(fn, repeat: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    ms = [s * 1e3 for s in samples]
    return {"median_ms": statistics.median(ms), "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


def _make_run(tmp: Path, steps: int) -> Path:
    from meta_train.config import load_config
    from meta_train.train import train

    overrides = ["algorithm.name=maml", f"algorithm.inner_steps={steps}", "train.iterations=20", "train.meta_batch=4",
                 "train.progress=false", "train.checkpoint_every=0", "model.hidden=[40,40]"]
    train(load_config(None, overrides), tmp / "run")
    return tmp / "run"


def _node_counts(bundle: Path) -> dict:
    import onnx
    import onnxruntime as ort

    counts = {}
    for name in ("adapt", "predict"):
        counts[f"{name}_nodes"] = len(onnx.load(str(bundle / f"{name}.onnx")).graph.node)
        with tempfile.TemporaryDirectory() as d:
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.optimized_model_filepath = str(Path(d) / "opt.onnx")
            so.log_severity_level = 3
            ort.InferenceSession(str(bundle / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
            counts[f"{name}_nodes_after_ort"] = len(onnx.load(so.optimized_model_filepath).graph.node)
    return counts


def main(argv=None) -> int:
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="export_latency."))
    try:
        return _main(argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _main(argv, tmp: Path) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run")
    src.add_argument("--bundle")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeat", type=int, default=2000)
    p.add_argument("--no-eager", action="store_true", help="skip torch eager (needs the run, slow)")
    p.add_argument("--no-optimize", action="store_true", help="export without export/optimize.py's rewrites")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from export.bundle import export_bundle, ort_session

    run = Path(args.run) if args.run else None
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        run = run or _make_run(tmp, args.steps)
        with contextlib.redirect_stderr(io.StringIO()):  # the unsigned-bundle warning: expected here
            bundle = export_bundle(run, tmp / "bundle", steps=args.steps, optimize=not args.no_optimize,
                                   log=lambda *_: None).path
    manifest = json.loads((bundle / "manifest.json").read_text())
    shape = manifest["input_shape"]
    rng = np.random.default_rng(0)
    sx = rng.standard_normal((args.k, *shape)).astype(np.float32)
    qx = rng.standard_normal((1, *shape)).astype(np.float32)
    if manifest["task_kind"] == "classification":
        sy = rng.integers(0, len(manifest["class_names"]), args.k).astype(np.int64)
    else:
        sy = rng.standard_normal(args.k).astype(np.float32)
    sw = np.ones(args.k, np.float32)

    results = {}
    a, pr = ort_session(bundle / "adapt.onnx"), ort_session(bundle / "predict.onnx")
    feeds = {"support_x": sx, "support_y": sy, "support_w": sw}

    def ort_once():
        state = a.run(None, feeds)[0]
        return pr.run(None, {"state": state, "x": qx})[0]

    results["onnxruntime"] = _timeit(ort_once, args.repeat, 200)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts = torch.jit.load(str(bundle / "model.pt"))
    tx, ty, tw, tq = (torch.from_numpy(v) for v in (sx, sy, sw, qx))

    def ts_once():
        with torch.no_grad():
            return ts.predict(ts.adapt(tx, ty, tw), tq)

    results["torchscript"] = _timeit(ts_once, args.repeat, 200)

    if run is not None and not args.no_eager:
        from export.trace import Functions
        from meta_train.trained import load_trained

        fns = Functions(load_trained(run), manifest["inner"]["steps"])

        def eager_once():
            return fns.predict(fns.adapt(tx, ty, tw), tq)

        results["torch eager"] = _timeit(eager_once, max(50, args.repeat // 10), 20)

    counts = _node_counts(bundle)
    arch = f"{shape[0]}-" + "-".join(str(e["shape"][0]) for e in manifest["state_layout"] if e["name"].endswith("weight"))
    print(f"adapt (K={args.k}, {manifest['inner']['steps']} steps) + predict 1 sample, single thread, {arch}")
    print(f"{'backend':<14}{'median ms':>12}{'p99 ms':>12}")
    for name, r in results.items():
        print(f"{name:<14}{r['median_ms']:>12.4f}{r['p99_ms']:>12.4f}")
    print("nodes: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    load = [round(v, 2) for v in os.getloadavg()]  # a busy machine shows in the medians; report it with them
    print(f"load average (1, 5, 15 min): {load[0]} {load[1]} {load[2]}")
    print(json.dumps({"arch": arch, "k": args.k, "steps": manifest["inner"]["steps"], "optimized": not args.no_optimize,
                      "results": results, **counts, "load_avg": load,
                      "model_version": manifest["model_version"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
