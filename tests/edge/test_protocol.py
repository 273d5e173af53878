"""Payload parsing: what is accepted, and the reason code of everything that is not."""

import json

import numpy as np
import pytest

from edge_agent.errors import PayloadError
from edge_agent.protocol import Schema, decode, parse_context, parse_label, parse_sample

REG = Schema(["t", "p", "s", "f"], (4,), "regression")
CLS = Schema(["t", "p", "s", "f"], (4,), "classification", ["ok", "scrap"])
VIB = Schema(["vib_x", "vib_y"], (2, 8), "regression")


def _sample(schema, **d):
    return parse_sample(decode(json.dumps(d).encode()), schema)


def test_list_and_map_forms_agree():
    a = _sample(REG, id="1", features=[1, 2, 3, 4])
    b = _sample(REG, id=1, features={"f": 4, "s": 3, "p": 2, "t": 1})
    assert a.id == "1" and b.id == 1  # an integer id stays one: 1 and "1" are two ids (sample_ids.py)
    np.testing.assert_array_equal(a.x, b.x)
    assert a.x.dtype == np.float32


def test_vibration_windows():
    w = np.arange(16, dtype=float).reshape(2, 8)
    a = _sample(VIB, id="v", features=w.tolist())
    b = _sample(VIB, id="v", features={"vib_x": w[0].tolist(), "vib_y": w[1].tolist()})
    np.testing.assert_array_equal(a.x, w.reshape(-1))
    np.testing.assert_array_equal(b.x, a.x)
    with pytest.raises(PayloadError) as e:
        _sample(VIB, id="v", features={"vib_x": w[0].tolist(), "vib_y": w[1, :5].tolist()})
    assert e.value.reason == "bad_payload"  # ragged


@pytest.mark.parametrize("payload, reason", [
    (b"{nope", "bad_json"),
    (b"[1,2,3,4]", "bad_json"),
    (b'{"features": [1,2,3,4]}', "bad_payload"),
    (b'{"id": "x"}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3]}', "feature_count"),
    (b'{"id": "x", "features": [[1,2],[3,4]]}', "feature_count"),
    (b'{"id": "x", "features": [1,2,3,NaN]}', "non_finite"),
    (b'{"id": "x", "features": [1,2,3,1e400]}', "non_finite"),
    (b'{"id": "x", "features": [1,2,3,1e39]}', "non_finite"),  # beyond float32
    (b'{"id": "x", "features": [1,2,3,"a"]}', "bad_payload"),
    (b'{"id": "x", "features": {"t":1,"p":2,"s":3}}', "missing_feature"),
    (b'{"id": "x", "features": {"t":1,"p":2,"s":3,"f":4,"zz":5}}', "unknown_feature"),
    (b'{"id": "x", "features": 5}', "bad_payload"),
    (b'{"id": true, "features": [1,2,3,4]}', "bad_payload"),
    (b'{"id": 1.5, "features": [1,2,3,4]}', "bad_payload"),
    (b'{"id": 9223372036854775808, "features": [1,2,3,4]}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,4], "context": 7}', "bad_context"),
    # numbers only: numpy would convert all of these silently (issue 12, item 10)
    (b'{"id": "x", "features": [1,2,3,"1"]}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3," 5 "]}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,"1_000"]}', "bad_payload"),
    (b'{"id": "x", "features": ["1e3",2,3,4]}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,true]}', "bad_payload"),
    (b'{"id": "x", "features": [1.5,false,3,4]}', "bad_payload"),
    (b'{"id": "x", "features": [true,true,true,true]}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,null]}', "bad_payload"),
    (b'{"id": "x", "features": {"t":1,"p":2,"s":"3","f":4}}', "bad_payload"),
    (b'{"id": "x", "features": {"t":1,"p":2,"s":true,"f":4}}', "bad_payload"),
    (b'{"id": "x", "features": {"t":1,"p":2,"s":null,"f":4}}', "bad_payload"),
    (b'{"id": "x", "features": [[1,2],[3,"4"]]}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,{"v":4}]}', "bad_payload"),
    # ts: a number or a string, echoed verbatim; anything else is refused, not echoed
    (b'{"id": "x", "features": [1,2,3,4], "ts": {"a": 1}}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,4], "ts": true}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,4], "ts": [1]}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,4], "ts": NaN}', "bad_payload"),
    (b'{"id": "x", "features": [1,2,3,4], "ts": "' + b"9" * 65 + b'"}', "bad_payload"),
])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # the agent filters it process-wide
def test_rejections(payload, reason):
    with pytest.raises(PayloadError) as e:
        parse_sample(decode(payload), REG)
    assert e.value.reason == reason
    if reason not in ("bad_json",) and b'"id": "x"' in payload:
        assert e.value.sample_id == "x"


def test_ts_forms_accepted():
    for ts in (None, 1732789200.123, 17, "2024-11-28T10:20:00Z"):
        assert _sample(REG, id="x", features=[1, 2, 3, 4], ts=ts).ts == ts
    assert _sample(REG, id="x", features=[1, 2, 3, 4]).ts is None


def test_vibration_window_of_strings_rejected():
    w = [[str(v) for v in range(8)], list(range(8))]
    for feats in (w, {"vib_x": w[0], "vib_y": w[1]}):
        with pytest.raises(PayloadError) as e:
            _sample(VIB, id="v", features=feats)
        assert e.value.reason == "bad_payload" and "a string" in str(e.value)


def test_labels():
    assert parse_label({"id": "a", "label": 3}, REG).y == 3.0
    assert parse_label({"id": "a", "label": "scrap"}, CLS).y == 1
    assert parse_label({"id": "a", "label": 0}, CLS).y == 0
    for schema, bad, reason in [(REG, "x", "bad_label"), (REG, float("nan"), "non_finite"), (CLS, "weird", "bad_label"),
                                (CLS, 2, "bad_label"), (REG, True, "bad_label")]:
        with pytest.raises(PayloadError) as e:
            parse_label({"id": "a", "label": bad}, schema)
        assert e.value.reason == reason


def test_context():
    assert parse_context({"context": "recipe-7"}) == "recipe-7"
    for bad in ({}, {"context": ""}, {"context": 3}, {"context": "x" * 500}):
        with pytest.raises(PayloadError):
            parse_context(bad)
