"""The worker in-process, with a recording transport instead of MQTT: policy details that the
end-to-end tests would need many messages (or a classification bundle) to reach."""

import collections
import json
import threading
import time

import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.config import config_from_dict
from edge_agent.model import Model, load_manifest

PREFIX = "f/l/d"


class RecordingTransport:
    def __init__(self, cfg, deliver, online, offline, obs):
        self.deliver = deliver
        self.published = collections.deque()  # (mid, ok) as paho's on_publish would report
        self.gen = 1
        self.connected = threading.Event()
        self.connected.set()
        self.sent: list[tuple[str, dict]] = []
        self.acks: list[int] = []
        self._mid = 0

    def publish(self, topic, payload, qos=1, retain=False, resent=False):
        self._mid += 1
        self.sent.append((topic.rsplit("/", 1)[1], json.loads(payload)))
        self.published.append((self._mid, True))
        return self._mid

    def ack(self, mid, qos, gen):
        self.acks.append(mid)

    def stop(self):
        self.connected.clear()


class StubModel:
    """Classification with 2 classes; the 'state' is the mean label of the support set."""

    version = "stub0001"
    task_kind = "classification"
    feature_names = ["a", "b"]
    input_shape = (2,)
    class_names = ["ok", "scrap"]
    max_support = 8
    recommended_k = 4
    init_state = np.zeros(1, np.float32)

    def __init__(self):
        self.adapt_calls = []

    def adapt(self, xs, ys):
        self.adapt_calls.append(len(ys))
        return np.array([np.mean(ys)], np.float32)

    def predict(self, state, x):
        p = np.full(len(x), 0.2 + 0.6 * float(state[0]), np.float32)
        return np.stack([1 - p, p], axis=1)


def _agent(tmp_path, model, **adaptation):
    cfg = config_from_dict({"topic_prefix": PREFIX, "state_dir": str(tmp_path / "state"),
                            "bundle": {"dir": str(tmp_path), "allow_unsigned": True},
                            "adaptation": adaptation})
    a = Agent(cfg, model, transport_cls=RecordingTransport)
    a._restore()
    return a


def _send(agent, topic, obj, mid=[0]):  # noqa: B006 - a counter on purpose
    mid[0] += 1
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    agent._on_message(f"{PREFIX}/{topic}", payload, mid[0], 1, 1)
    agent._process(agent._take(0))


def _predictions(agent):
    return [m for t, m in agent.transport.sent if t == "predictions"]


def test_classification_payload_and_adaptation_policy(tmp_path):
    model = StubModel()
    a = _agent(tmp_path, model, support_size=4, min_labels=3, adapt_every=2)
    for i in range(6):
        _send(a, "samples", {"id": f"s{i}", "features": {"a": 1, "b": 2}, "label": "scrap"})
    preds = _predictions(a)
    assert [p["adapted"] for p in preds] == [False, False, False, True, True, True]
    # min_labels=3 reached at label 3 (since_adapt=3 >= 2) -> adapt; then every 2 labels: at label 5
    assert model.adapt_calls == [3, 4]
    assert [p["n_support"] for p in preds] == [0, 0, 0, 3, 3, 4]
    p = preds[-1]
    assert p["prediction"] == "scrap" and p["class_index"] == 1
    assert set(p["probabilities"]) == {"ok", "scrap"} and abs(sum(p["probabilities"].values()) - 1) < 1e-6
    a.store.close()


def test_duplicates_and_bad_labels(tmp_path):
    a = _agent(tmp_path, StubModel(), min_labels=1)
    _send(a, "samples", {"id": "x1", "features": [0, 0]})
    _send(a, "samples", {"id": "x1", "features": [0, 0]})  # redelivery
    _send(a, "labels", {"id": "x1", "label": 1})
    _send(a, "labels", {"id": "x1", "label": 1})  # redelivered label: ignored, not an error
    _send(a, "labels", {"id": "x2", "label": 1})  # before its sample: held (limits.early_labels), no error
    _send(a, "samples", {"id": "x3", "features": [0, 0], "label": "bogus"})  # predicted; label rejected
    assert [p["id"] for p in _predictions(a)] == ["x1", "x3"]
    errors = [(m["reason"], m["id"]) for t, m in a.transport.sent if t == "errors"]
    assert errors == [("bad_label", "x3")]
    assert len(a.transport.acks) == 6  # every message acknowledged, rejected ones too
    a.store.close()


def test_qos0_overflow_is_reported_qos1_never_dropped(tmp_path):
    a = _agent(tmp_path, StubModel())
    a._queue_max = 3
    for i in range(5):
        a._on_message(f"{PREFIX}/samples", json.dumps({"id": f"q{i}", "features": [0, 0]}).encode(), i + 1, 1, 1)
    for i in range(5):
        a._on_message(f"{PREFIX}/samples", json.dumps({"id": f"z{i}", "features": [0, 0]}).encode(), 0, 0, 1)
    while a.queue:
        a._process(a._take(0))
    assert {p["id"] for p in _predictions(a)} == {f"q{i}" for i in range(5)}
    assert [m["reason"] for t, m in a.transport.sent if t == "errors"] == ["queue_full"]
    a.store.close()


def test_new_model_version_re_adapts_from_stored_support(tmp_path):
    model = StubModel()
    a = _agent(tmp_path, model, min_labels=1)
    for i in range(3):
        _send(a, "samples", {"id": f"s{i}", "features": [0, 0], "label": 1})
    a._shutdown()
    m2 = StubModel()
    m2.version = "stub0002"
    b = _agent(tmp_path, m2, min_labels=1)
    assert m2.adapt_calls == [3]  # at start, before the first prediction
    _send(b, "samples", {"id": "after", "features": [0, 0]})
    p = _predictions(b)[-1]
    assert p["adapted"] and p["n_support"] == 3 and p["model_version"] == "stub0002"
    b.store.close()


class SlowBrokerTransport(RecordingTransport):
    """PUBACKs only when the test says so: a broker that confirms slower than the agent predicts."""

    def __init__(self, *a):
        super().__init__(*a)
        self.unconfirmed: list[int] = []
        self.on_published = None

    def publish(self, topic, payload, qos=1, retain=False, resent=False):
        self._mid += 1
        self.sent.append((topic.rsplit("/", 1)[1], json.loads(payload)))
        self.unconfirmed.append(self._mid)
        return self._mid

    def confirm(self, n):
        for mid in self.unconfirmed[:n]:
            self.published.append((mid, True))
            if self.on_published:
                self.on_published()
        del self.unconfirmed[:n]


def test_publish_window_bounds_unconfirmed_predictions(tmp_path):
    cfg = config_from_dict({"topic_prefix": PREFIX, "state_dir": str(tmp_path / "state"),
                            "bundle": {"dir": str(tmp_path), "allow_unsigned": True},
                            "limits": {"publish_window": 3}})
    a = Agent(cfg, StubModel(), transport_cls=SlowBrokerTransport)
    a._restore()
    for i in range(8):
        a._on_message(f"{PREFIX}/samples", json.dumps({"id": f"w{i}", "features": [0, 0]}).encode(), i + 1, 1, 1)
    a._process(a._take(0))
    # All 8 committed (outbox) and acknowledged to the broker; only the window went to the client.
    assert [p["id"] for p in _predictions(a)] == ["w0", "w1", "w2"]
    assert len(a.state.outbox) == 8 and len(a.transport.acks) == 8
    a.transport.confirm(2)
    assert a._wake.is_set()  # a PUBACK wakes the worker while predictions wait
    # PUBACKs that came in before the worker cleared its wake-up must not leave it asleep (a lost
    # wake-up stalled the benchmark for a tick at a time): it returns at once to handle them.
    a._wake.clear()
    t0 = time.monotonic()
    assert a._take(5.0) == [] and time.monotonic() - t0 < 1.0
    a._process([])
    assert [p["id"] for p in _predictions(a)] == [f"w{i}" for i in range(5)]
    assert len(a.state.outbox) == 6
    a.store.close()  # crash: 3 in flight, 3 never handed to the client; all 6 still in the outbox

    b = Agent(cfg, StubModel(), transport_cls=SlowBrokerTransport)
    b._restore()
    b._resend_outbox()
    assert [p["id"] for p in _predictions(b)] == ["w2", "w3", "w4"]  # the window again, oldest first
    b.transport.confirm(3)
    b._process([])
    b.transport.confirm(3)
    b._process([])
    assert [p["id"] for p in _predictions(b)] == [f"w{i}" for i in range(2, 8)] and not b.state.outbox
    b.store.close()


@pytest.fixture(scope="module")
def linear_model(tmp_path_factory):
    from linear_bundle import make_linear_bundle

    d = make_linear_bundle(tmp_path_factory.mktemp("b") / "bundle")
    return Model(str(d), load_manifest(str(d), None, True))


def test_linear_bundle_adapt_moves_towards_the_task(linear_model):
    from linear_bundle import LinearFamily

    fam = LinearFamily()
    theta = fam.sample_task(5)
    x, y = fam.sample(theta, 40, seed=1)
    m = linear_model
    s = m.adapt(x[:10], y[:10])
    assert s.shape == (m.state_size,) and s.dtype == np.float32
    err_init = np.mean((m.predict(m.init_state, x[10:]) - y[10:]) ** 2)
    err_adapt = np.mean((m.predict(s, x[10:]) - y[10:]) ** 2)
    assert err_adapt < err_init


def test_contexts_are_bounded_least_recently_used_evicted(tmp_path):
    """Issue 12 item 2: a publisher inventing context names cannot grow the agent: at most
    limits.max_contexts contexts, the one the line keeps using survives, every sample is predicted."""
    cfg = config_from_dict({"topic_prefix": PREFIX, "state_dir": str(tmp_path / "state"),
                            "bundle": {"dir": str(tmp_path), "allow_unsigned": True},
                            "adaptation": {"min_labels": 1}, "limits": {"max_contexts": 3}})
    a = Agent(cfg, StubModel(), transport_cls=RecordingTransport)
    a._restore()
    for i in range(30):
        _send(a, "samples", {"id": f"k{i}", "features": [0, 0], "label": 1, "context": "keep"})
        _send(a, "samples", {"id": f"s{i}", "features": [0, 0], "label": 1, "context": f"spam-{i}"})
        _send(a, "samples", {"id": f"u{i}", "features": [0, 0], "context": f"unlabelled-{i}"})
    assert sorted(a.state.contexts) == ["keep", "spam-28", "spam-29"]
    preds = {p["id"]: p for p in _predictions(a)}
    assert len(preds) == 90 and preds["k29"]["adapted"] and preds["k29"]["n_support"] == 4
    assert not preds["u29"]["adapted"]  # a context without labels predicts with the meta-initialisation
    a.store.compact(a.state)
    a.store.close()
    snap = json.loads((tmp_path / "state" / "snapshot.jsonl").read_text().splitlines()[0])
    assert sorted(snap["state"]["contexts"]) == sorted(a.state.contexts)


def _agent_limits(tmp_path, model, **limits):
    cfg = config_from_dict({"topic_prefix": PREFIX, "state_dir": str(tmp_path / "state"),
                            "bundle": {"dir": str(tmp_path), "allow_unsigned": True},
                            "adaptation": {"min_labels": 1}, "limits": limits})
    a = Agent(cfg, model, transport_cls=RecordingTransport)
    a._restore()
    return a


def _errors(agent):
    return [(m["reason"], m["id"], m["message"]) for t, m in agent.transport.sent if t == "errors"]


def test_early_labels_are_held_and_joined_bounded_and_expire(tmp_path):
    """Issue 12 item 8: a label before its sample is held (bounded count, TTL, journaled) and joined when
    the sample comes; the sample is still predicted before its label is used."""
    model = StubModel()
    a = _agent_limits(tmp_path, model, early_labels=2, early_label_ttl_s=0.5)
    _send(a, "labels", {"id": "e1", "label": "scrap"})
    assert _errors(a) == [] and len(a.state.early) == 1
    _send(a, "samples", {"id": "e1", "features": [0, 0]})
    p = _predictions(a)[-1]
    assert p["id"] == "e1" and not p["adapted"]  # predicted before its own label is used
    assert model.adapt_calls == [1] and a.state.labelled("e1") and len(a.state.early) == 0
    _send(a, "samples", {"id": "n1", "features": [0, 0]})
    assert _predictions(a)[-1]["adapted"]

    # bounded: a third held label pushes out the oldest, reported
    for sid in ("o1", "o2", "o3"):
        _send(a, "labels", {"id": sid, "label": 1})
    errs = _errors(a)
    assert [(r, i) for r, i, _ in errs] == [("unknown_sample_id", "o1")] and "limits.early_labels" in errs[0][2]
    # held across a restart (journaled)
    a.store.close()
    b = _agent_limits(tmp_path, StubModel(), early_labels=2, early_label_ttl_s=0.5)
    assert len(b.state.early) == 2
    _send(b, "samples", {"id": "o2", "features": [0, 0]})
    assert b.state.labelled("o2")
    # expired: reported once, on the errors topic, even with no further traffic
    time.sleep(0.6)
    b._process([])
    assert [(r, i) for r, i, _ in _errors(b)] == [("unknown_sample_id", "o3")]
    assert "early_label_ttl_s" in _errors(b)[0][2] and len(b.state.early) == 0
    _send(b, "samples", {"id": "o3", "features": [0, 0]})
    assert not b.state.labelled("o3")
    b.store.close()
    c = _agent_limits(tmp_path, StubModel(), early_labels=2, early_label_ttl_s=0.5)
    assert len(c.state.early) == 0 and not c.state.labelled("o3")
    c.store.close()


def test_reused_ids_default_policy_refuses_and_reports(tmp_path):
    """Issue 12 item 9: a known id with other content (PLC counter reset) is neither answered with the
    old part's prediction nor given the old part's label: refused, reported; 12 and "12" are two ids."""
    a = _agent_limits(tmp_path, StubModel())
    _send(a, "samples", {"id": "p1", "ts": 1, "features": [0, 0]})
    _send(a, "samples", {"id": "p1", "ts": 1, "features": [0, 0]})  # the same part re-published: no error
    _send(a, "samples", {"id": "p1", "ts": 2, "features": [5, 5]})  # another part, same id
    _send(a, "labels", {"id": "p1", "label": 1})  # which part? not used
    assert [p["id"] for p in _predictions(a)] == ["p1"]
    assert [(r, i) for r, i, _ in _errors(a)] == [("duplicate_id", "p1"), ("unknown_sample_id", "p1")]
    assert "limits.dedupe_window_s" in _errors(a)[0][2]
    assert not a.state.contexts  # no label joined
    # integer and string ids never collide; each is echoed with its own JSON type
    _send(a, "samples", {"id": 12, "features": [0, 0]})
    _send(a, "samples", {"id": "12", "features": [1, 1]})
    _send(a, "labels", {"id": 12, "label": 1})
    assert [p["id"] for p in _predictions(a)][-2:] == [12, "12"]
    sup = a.state.contexts["default"].support
    assert [(sid, x.tolist()) for sid, x, _ in sup] == [(12, [0.0, 0.0])]
    assert a.state.unlabelled("12") is not None and a.state.unlabelled(12) is None
    a.store.close()
    b = _agent_limits(tmp_path, StubModel())  # the journal keeps the type of every id
    assert b.state.unlabelled("12") is not None and b.state.labelled(12) and not b.state.labelled("12")
    b.store.close()


def test_reused_ids_dedupe_window_accepts_a_new_part(tmp_path):
    a = _agent_limits(tmp_path, StubModel(), dedupe_window_s=0.5)
    _send(a, "samples", {"id": 7, "features": [0, 0]})
    _send(a, "samples", {"id": 7, "features": [3, 3]})  # within the window: refused
    time.sleep(0.6)
    _send(a, "samples", {"id": 7, "features": [0, 0]})  # the same content again: re-sent, not re-predicted
    _send(a, "samples", {"id": 7, "features": [4, 4]})  # after the window: a new part
    _send(a, "labels", {"id": 7, "label": 1})
    preds = _predictions(a)
    assert [p["id"] for p in preds] == [7, 7, 7] and preds[1] == preds[0] and preds[2] != preds[0]
    assert [(r, i) for r, i, _ in _errors(a)] == [("duplicate_id", 7), ("id_reused", 7)]
    assert [x.tolist() for _, x, _ in a.state.contexts["default"].support] == [[4.0, 4.0]]
    a.store.close()


def test_adapted_state_not_journaled_but_rederived_after_a_crash(tmp_path):
    """Issue 12 item 15: a label no longer writes the adapted state (up to 10^5 floats) to the journal;
    after a crash the state is re-derived from the journaled support set, identical."""
    a = _agent(tmp_path, StubModel(), min_labels=1)
    for i, y in enumerate(["scrap", "ok", "scrap"]):
        _send(a, "samples", {"id": f"r{i}", "features": [i, 1], "label": y})
    _send(a, "samples", {"id": "r3", "features": [0, 1], "context": "B", "label": "ok"})
    before = {n: c.state.copy() for n, c in a.state.contexts.items()}
    a.store.close()  # a crash: no compaction, the journal is all there is
    journal = [r for p in sorted((tmp_path / "state").glob("journal-*.jsonl"))
               for line in p.read_text().splitlines() for r in json.loads(line)]
    adapts = [r for r in journal if r["t"] == "a"]
    assert len(adapts) == 4 and all(r["s"] is None for r in adapts)
    model = StubModel()
    b = _agent(tmp_path, model, min_labels=1)
    assert {n: c.state.tolist() for n, c in b.state.contexts.items()} == {n: s.tolist() for n, s in before.items()}
    assert model.adapt_calls == [3, 1]  # re-derived once per context, on the support set of its last adaptation
    _send(b, "samples", {"id": "r4", "features": [0, 1]})
    assert _predictions(b)[-1]["adapted"] and _predictions(b)[-1]["n_support"] == 3
    b.store.close()


def test_adapt_takes_any_layout_and_refuses_a_diverged_state(linear_model, tmp_path):
    """Model.adapt converts only where needed (issue 12 item 15): float64, non-contiguous, list and
    shaped inputs give the state of the float32 contiguous ones; beyond max_support the newest are
    kept; a diverged inner loop (a real graph with a huge step) raises instead of serving inf."""
    from linear_bundle import LinearFamily, make_linear_bundle

    fam = LinearFamily()
    x, y = fam.sample(fam.sample_task(3), 80, seed=2)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    m = linear_model
    ref = m.adapt(x[:10], y[:10])
    wide = np.zeros((10, 8), np.float32)
    wide[:, ::2] = x[:10]  # a strided view: not contiguous
    for xs, ys in [(x[:10].astype(np.float64), y[:10].astype(np.float64)), (wide[:, ::2], y[:10]),
                   (x[:10].tolist(), y[:10].tolist()), (x[:10].reshape(10, 1, 4), y[:10])]:
        np.testing.assert_array_equal(m.adapt(xs, ys), ref)
    np.testing.assert_array_equal(m.adapt(x[:80], y[:80]), m.adapt(x[16:80], y[16:80]))  # max_support 64
    d = make_linear_bundle(tmp_path / "diverging", fam, lr=1e30)
    bad = Model(str(d), load_manifest(str(d), None, True))
    with pytest.raises(FloatingPointError, match="non-finite"):
        bad.adapt(x[:10], y[:10] * 1e6)


def test_a_message_wakes_the_worker_whether_or_not_its_event_was_set(tmp_path):
    """_on_message sets the wake event only when it is clear (issue 12 item 15): a message that
    arrives after the worker cleared it still wakes the worker at once."""
    a = _agent(tmp_path, StubModel())
    a._on_message(f"{PREFIX}/samples", b'{"id": "a", "features": [1, 2]}', 1, 1, 1)
    assert a._wake.is_set()
    a._on_message(f"{PREFIX}/samples", b'{"id": "b", "features": [1, 2]}', 2, 1, 1)  # already set: kept
    assert a._wake.is_set() and len(a._take(5.0)) == 2
    a._wake.clear()  # as _take does before it waits
    t = threading.Thread(target=lambda: (time.sleep(0.2), a._on_message(
        f"{PREFIX}/samples", b'{"id": "c", "features": [1, 2]}', 3, 1, 1)))
    t.start()
    t0 = time.monotonic()
    batch = a._take(5.0)
    t.join()
    assert [it.mid for it in batch] == [3] and time.monotonic() - t0 < 2.0
