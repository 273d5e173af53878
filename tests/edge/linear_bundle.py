"""A small but real bundle (docs/bundle.md) built with onnx.helper alone: no torch, no meta_train.

The model is linear regression on standardised features, y = xn . w + b, state = [w..., b]. adapt.onnx
unrolls `steps` weighted gradient steps on the MSE from a baked-in initialisation, exactly the shape of
a meta-learned inner loop. A "task family" of linear tasks around a mean parameter vector stands in for
the quality-regression family: the family mean is the ideal meta-initialisation, a zero init is
"scratch" (adaptation from no prior), so the edge tests can check meta-init vs adapted vs scratch.

    python tests/edge/linear_bundle.py OUT_DIR      # bundle/, scratch_bundle/, task.npz for the simulator
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FEATURES = ["temperature", "pressure", "speed", "feed"]
OPSET = 17


@dataclass
class LinearFamily:
    """Tasks y = sum_i a_i * (x_i - mean_i) / std_i + c + noise, with (a, c) near the family mean."""

    mean_x: np.ndarray = field(default_factory=lambda: np.array([200.0, 5.0, 1200.0, 0.3], np.float32))
    std_x: np.ndarray = field(default_factory=lambda: np.array([10.0, 0.5, 100.0, 0.05], np.float32))
    theta0: np.ndarray = field(default_factory=lambda: np.array([2.0, -1.0, 0.5, 1.5, 5.0], np.float32))
    task_spread: float = 0.4
    noise: float = 0.05

    def sample_task(self, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return (self.theta0 + rng.normal(0, self.task_spread, self.theta0.shape)).astype(np.float32)

    def sample(self, theta: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        x = (self.mean_x + self.std_x * rng.normal(size=(n, len(self.mean_x)))).astype(np.float32)
        xn = (x - self.mean_x) / self.std_x
        y = xn @ theta[:-1] + theta[-1] + rng.normal(0, self.noise, n)
        return x, y.astype(np.float32)


def _const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, np.float32), name))


def _adapt_graph(fam: LinearFamily, init: np.ndarray, steps: int, lr: float) -> onnx.ModelProto:
    F = len(fam.mean_x)
    nodes = [
        _const("mean", fam.mean_x), _const("std", fam.std_x), _const("lr", lr), _const("two", 2.0),
        _const("eps", 1e-6), _const("w_0", init[:F]), _const("b_0", init[F]),
        helper.make_node("Sub", ["support_x", "mean"], ["xc"]),
        helper.make_node("Div", ["xc", "std"], ["xn"]),
        helper.make_node("ReduceSum", ["support_w"], ["wsum"], keepdims=0),
        helper.make_node("Max", ["wsum", "eps"], ["wsum_safe"]),
        helper.make_node("Div", ["two", "wsum_safe"], ["scale"]),
    ]
    for s in range(steps):
        w, b, nw, nb = f"w_{s}", f"b_{s}", f"w_{s + 1}", f"b_{s + 1}"
        nodes += [
            helper.make_node("MatMul", ["xn", w], [f"xw_{s}"]),
            helper.make_node("Add", [f"xw_{s}", b], [f"pred_{s}"]),
            helper.make_node("Sub", [f"pred_{s}", "support_y"], [f"r_{s}"]),
            helper.make_node("Mul", ["support_w", f"r_{s}"], [f"wr_{s}"]),
            helper.make_node("MatMul", [f"wr_{s}", "xn"], [f"gw_raw_{s}"]),
            helper.make_node("Mul", [f"gw_raw_{s}", "scale"], [f"gw_{s}"]),
            helper.make_node("ReduceSum", [f"wr_{s}"], [f"gb_raw_{s}"], keepdims=0),
            helper.make_node("Mul", [f"gb_raw_{s}", "scale"], [f"gb_{s}"]),
            helper.make_node("Mul", ["lr", f"gw_{s}"], [f"dw_{s}"]),
            helper.make_node("Mul", ["lr", f"gb_{s}"], [f"db_{s}"]),
            helper.make_node("Sub", [w, f"dw_{s}"], [nw]),
            helper.make_node("Sub", [b, f"db_{s}"], [nb]),
        ]
    nodes += [
        helper.make_node("Constant", [], ["one_shape"], value=numpy_helper.from_array(np.array([1], np.int64))),
        helper.make_node("Reshape", [f"b_{steps}", "one_shape"], ["b_vec"]),
        helper.make_node("Concat", [f"w_{steps}", "b_vec"], ["state"], axis=0),
    ]
    graph = helper.make_graph(
        nodes, "adapt",
        [helper.make_tensor_value_info("support_x", TensorProto.FLOAT, ["N", F]),
         helper.make_tensor_value_info("support_y", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("support_w", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [F + 1])],
    )
    return _model(graph)


def _predict_graph(fam: LinearFamily) -> onnx.ModelProto:
    F = len(fam.mean_x)
    i64 = lambda name, v: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.int64)))
    nodes = [
        _const("mean", fam.mean_x), _const("std", fam.std_x),
        i64("s0", [0]), i64("sF", [F]), i64("sP", [F + 1]),
        helper.make_node("Slice", ["state", "s0", "sF"], ["w"]),
        helper.make_node("Slice", ["state", "sF", "sP"], ["b"]),
        helper.make_node("Sub", ["x", "mean"], ["xc"]),
        helper.make_node("Div", ["xc", "std"], ["xn"]),
        helper.make_node("MatMul", ["xn", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "predict",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [F + 1]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M"])],
    )
    return _model(graph)


def _model(graph) -> onnx.ModelProto:
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="linear_bundle")
    m.ir_version = 8  # readable by any onnxruntime >= 1.14, whatever the local onnx writes by default
    onnx.checker.check_model(m)
    return m


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_linear_bundle(out_dir, fam: LinearFamily | None = None, init: np.ndarray | None = None,
                       steps: int = 3, lr: float = 0.1, recommended_k: int = 10, max_support: int = 64) -> Path:
    """Write an unsigned bundle; `init=None` uses the family mean (the ideal meta-initialisation)."""
    fam = fam or LinearFamily()
    F = len(fam.mean_x)
    init = (fam.theta0 if init is None else np.asarray(init)).astype(np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(_adapt_graph(fam, init, steps, lr), str(out / "adapt.onnx"))
    onnx.save(_predict_graph(fam), str(out / "predict.onnx"))
    np.save(out / "init_state.npy", init, allow_pickle=False)
    files = {n: _sha(out / n) for n in ("adapt.onnx", "predict.onnx", "init_state.npy")}
    version = hashlib.sha256("".join(files[n] for n in sorted(files)).encode()).hexdigest()[:16]
    manifest = {
        "format_version": 1,
        "model_version": version,
        "task_kind": "regression",
        "feature_names": FEATURES[:F],
        "input_shape": [F],
        "class_names": None,
        "target_name": "quality",
        "recommended_k": recommended_k,
        "max_support": max_support,
        "inner": {"steps": steps, "lr_mode": "fixed", "lr_summary": {"lr": lr}, "head_only": False,
                  "algorithm": "linear-test"},
        "loss": "mse",
        "preprocessing": {"kind": "standardize", "mean": fam.mean_x.tolist(), "std": fam.std_x.tolist()},
        "state_size": F + 1,
        "state_layout": [{"name": "weight", "shape": [F], "offset": 0}, {"name": "bias", "shape": [1], "offset": F}],
        "producer": {"meta_train": "tests/edge/linear_bundle.py", "torch": None, "onnx": onnx.__version__,
                     "opset": OPSET, "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
        "parity": {"onnx_max_abs": 0.0, "torchscript_max_abs": None, "tasks": 0},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def write_task_file(path, x: np.ndarray, y: np.ndarray, feature_names=None) -> Path:
    """The simulator's task file (docs/protocol.md): x float32 [n, *input_shape], y [n]."""
    extra = {} if feature_names is None else {"feature_names": np.asarray(feature_names, dtype=str)}
    np.savez(path, x=np.asarray(x, np.float32), y=np.asarray(y), **extra)
    return Path(path)


if __name__ == "__main__":
    base = Path(sys.argv[1] if len(sys.argv) > 1 else "linear_demo")
    fam = LinearFamily()
    make_linear_bundle(base / "bundle", fam)
    make_linear_bundle(base / "scratch_bundle", fam, init=np.zeros(5, np.float32))
    x, y = fam.sample(fam.sample_task(12345), 500, seed=1)
    write_task_file(base / "task.npz", x, y, FEATURES)
    print(f"wrote {base}/bundle, {base}/scratch_bundle, {base}/task.npz")
