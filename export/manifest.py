"""manifest.json (docs/bundle.md): what the device must know, plus the sha256 of every bundle file."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from pathlib import Path

import onnx
import torch

from .onnx_export import OPSET
from .signing import file_sha256
from .trace import Functions

FORMAT_VERSION = 1
# The files whose bytes define the model: two bundles with the same ones behave identically.
VERSIONED_FILES = ("adapt.onnx", "predict.onnx", "init_state.npy")
OPTIONAL_VERSIONED_FILES = ("population_state.npy",)


def _meta_train_version() -> str:
    # The editable install can present meta_train as a namespace package without __version__.
    from importlib import metadata

    try:
        return metadata.version("edge-meta")
    except metadata.PackageNotFoundError:
        import meta_train

        return getattr(meta_train, "__version__", "unknown")


def model_version(bundle_dir: Path) -> str:
    h = hashlib.sha256()
    for name in VERSIONED_FILES + tuple(n for n in OPTIONAL_VERSIONED_FILES if (bundle_dir / n).exists()):
        h.update(name.encode() + b"\0")
        h.update((bundle_dir / name).read_bytes())
    return h.hexdigest()[:16]


def lr_summary(lrs: dict[str, torch.Tensor], lr_mode: str) -> dict:
    # Per-step modes keep one mean per step; the others collapse to one number per parameter.
    if lr_mode == "per_layer_per_step":
        return {n: [round(float(r[s].mean()), 8) for s in range(r.shape[0])] for n, r in lrs.items()}
    return {n: round(float(r.mean()), 8) for n, r in lrs.items()}


def preprocessing(spec: dict) -> dict:
    t = spec.get("input_transform") or {}
    kind = t.get("kind") or "none"
    if kind == "standardize":
        out = {"kind": "standardize", "mean": [float(v) for v in t["mean"]], "std": [float(v) for v in t["std"]]}
        if t.get("clip") is not None:  # robust scaling: the graphs clip the scaled values
            out["clip"] = float(t["clip"])
    elif kind == "spectrum":
        out = {"kind": "spectrum", "window": int(t["window"]), "bins": int(t["bins"])}
    else:
        out = {"kind": "none"}
    if spec.get("target_transform"):  # the graphs map labels in and predictions out: y_model = (y - center) / scale
        out["target"] = {k: spec["target_transform"][k] for k in ("kind", "center", "scale")}
    return out


def recommended_k(fns: Functions, max_support: int) -> int:
    shots = int(fns.trained.config.train.shots)
    if fns.kind == "classification":  # shots are per class during training
        shots *= int(fns.trained.spec["out_features"])
    return max(1, min(shots, max_support))


def feature_names(fns: Functions) -> list[str]:
    names = fns.trained.source.get("feature_names")
    if names:
        return [str(n) for n in names]
    width = math.prod(fns.input_shape)
    return ["signal"] if (fns.trained.spec.get("input_transform") or {}).get("kind") == "spectrum" else [
        f"x{i}" for i in range(width)
    ]


def class_names(fns: Functions) -> list[str] | None:
    if fns.kind != "classification":
        return None
    names = fns.trained.source.get("class_names")
    n = int(fns.trained.spec["out_features"])
    if names and len(names) == n:
        return [str(c) for c in names]
    return [str(i) for i in range(n)]


def predictors(population_file: str, curves: dict, trained: dict) -> dict:
    """manifest.predictors (docs/bundle.md): where the population model is, how it was trained (the record
    of meta_train.evaluate.pooled_model) and what each predictor's error is expected to be against the
    number of labels, measured on validation tasks."""
    return {
        "population": {"file": population_file, "graph": "predict.onnx",
                       "trained": {"iterations": int(trained["iterations_run"]),
                                   "iterations_budget": int(trained["iterations_budget"]),
                                   "best_iteration": int(trained["best_iteration"]),
                                   "batch": int(trained["batch"]), "lr": float(trained["lr"])}},
        "expected_error": curves,
    }


def build(fns: Functions, bundle_dir: Path, *, max_support: int, parity: dict, files: list[str],
          predictors: dict | None = None) -> dict:
    trained = fns.trained
    cfg = fns.cfg
    extra = {} if predictors is None else {"predictors": predictors}
    return {
        "format_version": FORMAT_VERSION,
        "model_version": model_version(bundle_dir),
        "task_kind": fns.kind,
        "feature_names": feature_names(fns),
        "input_shape": list(fns.input_shape),
        "class_names": class_names(fns),
        "target_name": trained.source.get("target_name"),
        "recommended_k": recommended_k(fns, max_support),
        "max_support": int(max_support),
        "inner": {
            "steps": fns.steps,
            "lr_mode": cfg.lr_mode,
            "lr_summary": lr_summary(fns.lrs, cfg.lr_mode),
            "head_only": bool(cfg.head_only),
            "algorithm": trained.algorithm.name,
        },
        "loss": cfg.loss,
        "preprocessing": preprocessing(trained.spec),
        "state_size": fns.layout.size,
        "state_layout": fns.layout.to_json(),
        "producer": {
            "meta_train": _meta_train_version(),
            "torch": torch.__version__.split("+")[0],
            "onnx": onnx.__version__,
            "opset": OPSET,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "parity": parity,
        **extra,
        "files": {name: file_sha256(bundle_dir / name) for name in files},
    }


def write(manifest: dict, bundle_dir: Path) -> Path:
    path = bundle_dir / "manifest.json"
    # Written once, as bytes: the signature covers exactly these bytes.
    path.write_bytes((json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    return path
