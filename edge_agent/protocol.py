"""Incoming payloads -> validated values, or PayloadError with a short reason code (docs/protocol.md).

Reason codes are part of the protocol (dashboards count them): bad_json, bad_payload, feature_count,
unknown_feature, missing_feature, non_finite, bad_label, unknown_sample_id, duplicate_id, id_reused (not a
rejection), bad_context, oversized, queue_full (and, from the agent: bad_command, bundle_refused, rollback_unavailable, config_invalid,
internal_error, adapt_failed, model_error).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import PayloadError

MAX_ID_LEN = 200
MAX_INT_ID = 2**63
MAX_CONTEXT_LEN = 128
MAX_TS_LEN = 64


@dataclass
class Sample:
    id: str | int
    ts: Any
    x: np.ndarray  # float32, flat, manifest order
    label: Any = None  # raw, validated by parse_label_value when present
    has_label: bool = False
    context: str | None = None


@dataclass
class Label:
    id: str | int
    y: float | int


@dataclass
class Schema:
    """What the payloads are checked against: the fields of the bundle manifest."""

    feature_names: list[str]
    input_shape: tuple[int, ...]
    task_kind: str
    class_names: list[str] | None = None

    def __post_init__(self):
        self.n_inputs = int(np.prod(self.input_shape))


def decode(payload: bytes) -> dict:
    try:
        obj = json.loads(payload.decode("utf-8"))  # decoding first skips json's encoding sniffing
    except (ValueError, UnicodeDecodeError) as e:
        raise PayloadError("bad_json", f"payload is not JSON: {e}") from None
    except RecursionError:  # json's C decoder recurses per nesting level: "[[[[..." would kill the worker
        raise PayloadError("bad_json", "payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise PayloadError("bad_json", f"payload must be a JSON object, got {type(obj).__name__}")
    return obj


def _id(obj: dict, required: bool = True) -> str | int | None:
    v = obj.get("id")
    if v is None and not required:
        return None
    # Integers are common from PLC gateways. They stay integers (echoed as numbers) and are their own
    # ids: 12 and "12" are different samples (state.id_key tags the type), never a silent collision.
    if type(v) is int:
        if -MAX_INT_ID <= v < MAX_INT_ID:
            return v
        raise PayloadError("bad_payload", "an integer 'id' must fit in 64 bits")
    if type(v) is not str or not v or len(v) > MAX_ID_LEN:
        raise PayloadError("bad_payload", f"'id' must be a non-empty string of at most {MAX_ID_LEN} chars "
                                          "or a 64-bit integer")
    return v


def peek_id(payload: bytes) -> str | int | None:
    """Best effort: the sample id of a payload that was rejected for another reason."""
    try:
        obj = json.loads(payload)
        v = obj.get("id") if isinstance(obj, dict) else None
        return v if (type(v) is str and len(v) <= MAX_ID_LEN) or (type(v) is int and -MAX_INT_ID <= v < MAX_INT_ID) \
            else None
    except Exception:
        return None


def parse_sample(obj: dict, schema: Schema) -> Sample:
    sid = _id(obj)
    try:
        feats = obj["features"]
    except KeyError:
        raise PayloadError("bad_payload", "missing 'features'", sid) from None
    if isinstance(feats, dict):
        x = _from_map(feats, schema, sid)
    elif isinstance(feats, list):
        x = _to_array(feats, sid)
        if x.size != schema.n_inputs or (x.ndim > 1 and x.shape != schema.input_shape):
            raise PayloadError(
                "feature_count",
                f"expected {schema.n_inputs} features (shape {list(schema.input_shape)}), got shape {list(x.shape)}",
                sid,
            )
    else:
        raise PayloadError("bad_payload", "'features' must be a list or an object of name -> value", sid)
    if not _all_finite(x):
        bad = [schema.feature_names[i] if i < len(schema.feature_names) and x.ndim == 1 else str(i)
               for i in np.flatnonzero(~np.isfinite(x.reshape(-1)))[:5]]
        raise PayloadError("non_finite", f"NaN or infinite feature value(s) at {', '.join(bad)}", sid)
    ctx = obj.get("context")
    if ctx is not None:
        ctx = check_context_name(ctx, sid)
    has_label = "label" in obj and obj["label"] is not None
    return Sample(sid, _ts(obj.get("ts"), sid), x.reshape(-1), obj.get("label"), has_label, ctx)


def _ts(v: Any, sid: str | None) -> Any:
    # Echoed verbatim in the prediction: only what a timestamp can be, and bounded (it also sits in the outbox).
    t = type(v)
    if v is None or (t is str and len(v) <= MAX_TS_LEN) or ((t is int or t is float) and math.isfinite(v)):
        return v
    raise PayloadError("bad_payload", f"'ts' must be a finite number or a string of at most {MAX_TS_LEN} chars, "
                                      f"got {_kind(v)}", sid)


def _kind(v: Any) -> str:
    return {bool: "a boolean", str: "a string", dict: "an object", list: "a list", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


# A value beyond float32 range becomes inf and is reported as non_finite; numpy's warning about
# that cast is noise (and a per-message errstate() would cost more than the conversion).
warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning)


_NUMBER_TYPES = frozenset((int, float))


def _check_numbers(v: list, sid: str | None, depth: int = 0) -> None:
    """JSON numbers only. numpy would convert "1", " 5 ", "1_000", "1e3" and true/false silently; null
    would become NaN and be misreported as non_finite. A set of the element types is C-speed (a few us
    for a 3x256 window), far below the cost of the graph call."""
    types = set(map(type, v))
    if types <= _NUMBER_TYPES:
        return
    if types == {list} and depth < 8:
        for row in v:
            _check_numbers(row, sid, depth + 1)
        return
    bad = next((e for e in v if type(e) not in _NUMBER_TYPES and type(e) is not list), v[0])  # else ragged
    raise PayloadError("bad_payload", f"features must be JSON numbers (or equal-length arrays of numbers), "
                                      f"got {_kind(bad)}", sid)


def _to_array(v: Any, sid: str | None) -> np.ndarray:
    _check_numbers(v, sid)
    try:
        return np.asarray(v, dtype=np.float32)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise PayloadError("bad_payload", "features must be numbers (or equal-length arrays of numbers)", sid) from None


def _all_finite(x: np.ndarray) -> bool:
    # One reduction instead of isfinite().all(): NaN/inf propagate into the float64 sum, and a float64
    # sum of float32 values cannot overflow.
    # np.add.reduce: ndarray.sum's Python wrapper costs more than the sum of a feature vector.
    return math.isfinite(np.add.reduce(x.reshape(-1), dtype=np.float64))


def _from_map(feats: dict, schema: Schema, sid: str | None) -> np.ndarray:
    names = schema.feature_names
    unknown = [k for k in feats if k not in names]
    if unknown:
        raise PayloadError("unknown_feature", f"unknown feature(s) {', '.join(map(repr, unknown[:5]))}", sid)
    missing = [n for n in names if n not in feats]
    if missing:
        raise PayloadError("missing_feature", f"missing feature(s) {', '.join(map(repr, missing[:5]))}", sid)
    x = _to_array([feats[n] for n in names], sid)
    if x.size != schema.n_inputs:
        raise PayloadError(
            "feature_count",
            f"features add up to {x.size} values, expected {schema.n_inputs} (shape {list(schema.input_shape)})",
            sid,
        )
    return x


def parse_label(obj: dict, schema: Schema) -> Label:
    sid = _id(obj)
    if "label" not in obj:
        raise PayloadError("bad_payload", "missing 'label'", sid)
    return Label(sid, label_value(obj["label"], schema, sid))


def label_value(v: Any, schema: Schema, sid: str | None) -> float | int:
    if schema.task_kind == "classification":
        names = schema.class_names or []
        if isinstance(v, str):
            if v in names:
                return names.index(v)
            raise PayloadError("bad_label", f"unknown class {v!r} (classes: {', '.join(names)})", sid)
        if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
            return v
        raise PayloadError("bad_label", f"label must be a class name or an index 0..{len(names) - 1}", sid)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if math.isfinite(v):
            return float(v)
        raise PayloadError("non_finite", "label is NaN or infinite", sid)
    raise PayloadError("bad_label", "label must be a number", sid)


def parse_context(obj: dict) -> str:
    if "context" not in obj:
        raise PayloadError("bad_payload", "missing 'context'")
    return check_context_name(obj["context"], None)


def check_context_name(v: Any, sid: str | None) -> str:
    if not isinstance(v, str) or not v or len(v) > MAX_CONTEXT_LEN:
        raise PayloadError("bad_context", f"context must be a non-empty string of at most {MAX_CONTEXT_LEN} chars", sid)
    return v
