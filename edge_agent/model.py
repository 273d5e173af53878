"""The bundle at run time: two onnxruntime sessions and the meta-initialisation (docs/bundle.md)."""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from .errors import BundleError
from .predictors import Predictors

log = logging.getLogger(__name__)


def load_manifest(bundle_dir: str, public_key: str | None, allow_unsigned: bool) -> dict:
    """Verify (signature, hashes, no extra files) and return the manifest; nothing unverified is loaded."""
    from .verify import verify_bundle

    return verify_bundle(bundle_dir, public_key_path=public_key, allow_unsigned=allow_unsigned, isolate_signature=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def import_onnxruntime():
    """onnxruntime, imported without telemetry and without its coloured stderr lines.

    Its default logger (severity WARNING, ANSI colours, straight to fd 2) is created while the module
    is imported, before any API can change it; on a device with an unusual /sys/class/drm it prints a
    "GPU device discovery failed" warning there. fd 2 is pointed at a temp file for the import, and
    what it caught is logged at debug, one plain line each; afterwards the default severity is ERROR
    (session errors still raise as exceptions)."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # edge_agent/__init__ set it already; cheap to be sure
    with tempfile.TemporaryFile() as caught:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(caught.fileno(), 2)
        try:
            import onnxruntime as ort
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        caught.seek(0)
        text = caught.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        if line.strip():
            log.debug("onnxruntime at import: %s", _ANSI.sub("", line).strip())
    ort.set_default_logger_severity(3)
    return ort


def ort_session(path: Path):
    """The device's onnxruntime settings; the exporter proves parity with exactly these."""
    ort = import_onnxruntime()

    so = ort.SessionOptions()
    # One thread each: the device shares its cores with the line's own software, and our batches are
    # small enough that a thread pool costs more in wake-ups than it gains.
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types; all mean "bundle unusable"
        raise BundleError(f"{path.name}: onnxruntime cannot load it: {e}") from e


class Model:
    def __init__(self, bundle_dir: str, manifest: dict):
        self.manifest = manifest
        self.version: str = str(manifest["model_version"])
        self.task_kind: str = manifest["task_kind"]
        if self.task_kind not in ("regression", "classification"):
            raise BundleError(f"manifest task_kind {self.task_kind!r} is neither regression nor classification")
        self.feature_names: list[str] = list(manifest["feature_names"])
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in manifest["input_shape"])
        self.n_inputs = int(np.prod(self.input_shape))
        self.class_names: list[str] | None = manifest.get("class_names")
        if self.task_kind == "classification" and not self.class_names:
            raise BundleError("classification bundle without class_names")
        self.max_support = int(manifest["max_support"])
        self.recommended_k = int(manifest.get("recommended_k") or min(10, self.max_support))
        self.state_size = int(manifest["state_size"])

        d = Path(bundle_dir)
        try:
            init = np.load(d / "init_state.npy", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BundleError(f"init_state.npy: cannot load: {e}") from e
        if init.dtype != np.float32 or init.shape != (self.state_size,):
            raise BundleError(
                f"init_state.npy is {init.dtype}{list(init.shape)}, manifest says float32[{self.state_size}]"
            )
        self.init_state = init
        self.predictors = Predictors.from_bundle(d, manifest, init)  # population model + expected errors
        self._adapt = ort_session(d / "adapt.onnx")
        self._predict = ort_session(d / "predict.onnx")
        self._check_signatures()
        self.y_dtype = np.int64 if self.task_kind == "classification" else np.float32
        self._weights: dict[int, np.ndarray] = {}  # support size -> support_w (all ones)

    def _check_signatures(self) -> None:
        def names(sess, kind):
            return sorted(a.name for a in getattr(sess, f"get_{kind}")())

        if names(self._adapt, "inputs") != ["support_w", "support_x", "support_y"]:
            raise BundleError(f"adapt.onnx inputs are {names(self._adapt, 'inputs')}, expected support_x/y/w")
        if names(self._predict, "inputs") != ["state", "x"]:
            raise BundleError(f"predict.onnx inputs are {names(self._predict, 'inputs')}, expected state, x")
        self._adapt_out = self._adapt.get_outputs()[0].name
        self._predict_out = self._predict.get_outputs()[0].name
        # The sessions' C++ run: InferenceSession.run re-validates the feed names (checked once above)
        # on every call, ~3 us each; a label pays two calls (its own prediction and the adaptation).
        self._adapt_run = _fast_run(self._adapt)
        self._predict_run = _fast_run(self._predict)

    def adapt(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Support set (most recent last) -> adapted state. Keeps the newest max_support samples."""
        xs, ys = np.asarray(xs), np.asarray(ys)
        n = len(xs)
        if n > self.max_support:
            xs, ys, n = xs[-self.max_support:], ys[-self.max_support:], self.max_support
        w = self._weights.get(n)
        if w is None:  # one per support size, not one per label
            w = self._weights[n] = np.ones(n, dtype=np.float32)
        # A label pays this call: conversions only where needed (the worker's support arrays are already
        # float32 and contiguous: ContextState.support_arrays).
        if xs.dtype != np.float32 or not xs.flags.c_contiguous:
            xs = np.ascontiguousarray(xs, dtype=np.float32)
        if xs.shape[1:] != self.input_shape:
            xs = xs.reshape((n,) + self.input_shape)
        if ys.dtype != self.y_dtype:
            ys = ys.astype(self.y_dtype)
        state = self._adapt_run([self._adapt_out], {"support_x": xs, "support_y": ys, "support_w": w}, None)[0]
        if state.dtype != np.float32:
            state = state.astype(np.float32)
        state = state.reshape(-1)
        # One float64 reduction instead of isfinite().all(): NaN/inf propagate into it.
        if state.shape[0] != self.state_size or not math.isfinite(_sum64(state)):
            # A diverged inner loop must not replace a usable state; the caller keeps the old one.
            raise FloatingPointError("adaptation produced a non-finite or mis-shaped state")
        return state

    def dry_run(self) -> None:
        """Test-load: adapt on a zero support set and predict zeros; BundleError unless both work and
        give finite, well-shaped outputs. Run before a bundle replaces the one serving."""
        x = np.zeros((2,) + self.input_shape, np.float32)
        y = np.zeros(2, self.y_dtype)
        try:
            state = self.adapt(x, y)
            for s in (self.init_state, state):
                out = np.asarray(self.predict(s, x))
                want = (2,) if self.task_kind == "regression" else (2, len(self.class_names or []))
                if out.shape != want or not np.all(np.isfinite(out)):
                    raise FloatingPointError(f"predict gave {out.dtype}{list(out.shape)}, expected finite {list(want)}")
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; all mean "unusable"
            raise BundleError(f"test run on zeros failed: {e}") from e

    def predict(self, state: np.ndarray, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32).reshape((-1,) + self.input_shape)
        return self._predict_run([self._predict_out], {"state": state, "x": x}, None)[0]


def _sum64(a: np.ndarray) -> float:
    """The float64 sum of `a` (ndarray.sum's Python wrapper costs more than the sum of a state)."""
    return np.add.reduce(a, dtype=np.float64)


def _fast_run(session):
    """`session._sess.run` where this onnxruntime has it (1.x: the pybind11 session that
    InferenceSession.run calls after its checks), else the public run."""
    inner = getattr(session, "_sess", None)
    return inner.run if inner is not None and callable(getattr(inner, "run", None)) else session.run
