"""Fault injection with a real mosquitto and real agent processes (127.0.0.1 only).

Sizes come from $FAULT_REPEATS (tests/edge/fault_tools.py): unset -> 3 broker SIGKILLs, 3 agent
SIGKILLs, 5,000 fuzzed payloads (CI); FAULT_REPEATS=full -> 10 / 10 / 100,000.

    FAULT_REPEATS=full .venv/bin/python -m pytest tests/edge/test_faults.py -s
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BROKER_CONF, wait_until, write_config
from edge_agent.simulator import LineClient
from edge_agent.errors import PayloadError
from edge_agent.protocol import Schema, decode, parse_context, parse_label, parse_sample
from fault_tools import Consumer, RobustPublisher, repeats, rss_kib
from linear_bundle import FEATURES

PREFIX = "factory/line1/dev1"
N = repeats()
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


def _xs(bundle, n):
    if bundle.x is not None:
        return bundle.x[np.arange(n) % len(bundle.x)]
    return np.zeros((n, bundle.n_features), np.float32)


def _stream(pub, ids, xs, rate, labels=None):
    t0 = time.monotonic()
    for i, sid in enumerate(ids):
        pub.sample(sid, xs[i], None if labels is None else labels[i])
        lag = t0 + (i + 1) / rate - time.monotonic()
        if lag > 0:
            time.sleep(lag)


def _finish(pub, consumer, ids, xs, labels=None, timeout=60):
    """Wait for every prediction; then re-publish (end to end) what a broker crash lost, and wait again."""
    assert pub.wait_confirmed(timeout), f"{len(pub.unconfirmed)} samples never confirmed by the broker"
    consumer.wait_all(ids, timeout)
    republished = 0
    for _ in range(3):
        missing = consumer.missing(ids)
        if not missing:
            break
        index = {sid: i for i, sid in enumerate(ids)}
        for sid in missing:
            i = index[sid]
            pub.sample(sid, xs[i], None if labels is None else labels[i])
        republished += len(missing)
        consumer.wait_all(ids, 30)
    return republished


def _check_copies(consumer, ids):
    dups = consumer.duplicates()
    assert dups["all_identical"], "a sample got two different predictions"
    for sid in ids:
        p = json.loads(consumer.copies[sid][0][0])
        assert p["id"] == sid and p["model_version"]
    return dups


def test_broker_sigkilled_and_restarted_mid_stream(tmp_path, broker, bundle, agent_factory):
    restarts = N["broker_restarts"]
    cfg = write_config(tmp_path, broker, bundle)
    consumer = Consumer(broker.host, broker.port, PREFIX)
    agent = agent_factory(cfg).start()
    assert wait_until(lambda: any(s.get("status") == "online" for s in consumer.status), 20), agent.log()
    pub = RobustPublisher(broker.host, broker.port, PREFIX)
    n = 500 * (restarts + 1)
    ids = [f"b-{i}" for i in range(n)]
    xs = _xs(bundle, n)
    t0 = time.monotonic()
    th = threading.Thread(target=_stream, args=(pub, ids, xs, 200))
    th.start()
    try:
        for _ in range(restarts):
            time.sleep(1.5)
            broker.kill()  # SIGKILL: only what autosave (1 s) wrote survives
            time.sleep(0.5)
            broker.start()
    finally:
        th.join()
    republished = _finish(pub, consumer, ids, xs)
    missing = consumer.missing(ids)
    assert not missing, f"{len(missing)} samples without a prediction, e.g. {missing[:5]}\n{agent.log()[-3000:]}"
    dups = _check_copies(consumer, ids)
    assert agent.proc.poll() is None, agent.log()
    assert not consumer.errors, consumer.errors[:5]
    print(f"\nbroker restarts={restarts} samples={n} missing=0 republished_end_to_end={republished} "
          f"duplicates={dups} in {time.monotonic() - t0:.1f}s")
    pub.close()
    consumer.close()
    assert agent.terminate() == 0


def test_agent_sigkilled_and_restarted_mid_stream(tmp_path, broker, bundle, agent_factory):
    if bundle.x is None:
        pytest.skip("needs the task data for labels")
    kills = N["agent_kills"]
    cfg = write_config(tmp_path, broker, bundle)
    consumer = Consumer(broker.host, broker.port, PREFIX)
    agent = agent_factory(cfg).start()
    assert wait_until(lambda: any(s.get("status") == "online" for s in consumer.status), 20), agent.log()
    pub = RobustPublisher(broker.host, broker.port, PREFIX)
    n = 400 * (kills + 1)
    ids = [f"k-{i}" for i in range(n)]
    xs = _xs(bundle, n)
    ys = bundle.y[np.arange(n) % len(bundle.y)]
    labels = [bundle.label(ys[i]) if i % 2 == 0 else None for i in range(n)]  # every other sample labelled
    t0 = time.monotonic()
    th = threading.Thread(target=_stream, args=(pub, ids, xs, 200, labels))
    th.start()
    try:
        for _ in range(kills):
            time.sleep(1.5)
            agent.kill()  # SIGKILL mid-stream
            agent = agent_factory(cfg).start()
    finally:
        th.join()
    republished = _finish(pub, consumer, ids, xs, labels)
    missing = consumer.missing(ids)
    assert not missing, f"{len(missing)} samples without a prediction, e.g. {missing[:5]}\n{agent.log()[-3000:]}"
    dups = _check_copies(consumer, ids)
    # the adapted state came back after every kill: from the 30th sample on (15 labels) always K=10
    preds = [json.loads(consumer.copies[sid][0][0]) for sid in ids[30:]]
    bad = [p["id"] for p in preds if not (p["adapted"] and p["n_support"] == 10)]
    assert not bad, f"{len(bad)} predictions without the restored state, e.g. {bad[:5]}"
    assert not consumer.errors, consumer.errors[:5]
    print(f"\nagent kills={kills} samples={n} missing=0 republished_end_to_end={republished} duplicates={dups} "
          f"in {time.monotonic() - t0:.1f}s")
    pub.close()
    consumer.close()
    assert agent.terminate() == 0


# -- fuzz ----------------------------------------------------------------------------------------------

MAX_BYTES = 4096  # write_config's limits.max_payload_bytes


def _fuzz(rng: np.random.Generator, i: int, nf: int):
    c = i % 15
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if c == 0:
        return "samples", rng.bytes(int(rng.integers(0, 300)))
    if c == 1:
        return "samples", {"id": f"f{i}", "features": pick(["abc", 5, None, True, {"x": 1}, ["a"] * nf, [[1, 2], [3]]])}
    if c == 2:
        return "samples", {"id": pick([[1], 1.5, True, "", "x" * 300, {"a": 1}]), "features": [0.0] * nf}
    if c == 3:
        return "samples", {"id": f"h{i}", "features": [1.0] * int(rng.integers(nf + 1, 700))}
    if c == 4:
        v = pick([b"NaN", b"Infinity", b"-Infinity", b"1e39"])
        return "samples", b'{"id":"n%d","features":[' % i + b",".join([v] + [b"1"] * (nf - 1)) + b"]}"
    if c == 5:
        d = int(rng.integers(500, 2000))
        return "samples", pick([b"[" * d + b"]" * d, b'{"id":"d%d","features":' % i + b"[" * d + b"]" * d + b"}",
                                b'{"a":' * (d // 3) + b"1" + b"}" * (d // 3)])
    if c == 6:
        return "labels", {"id": f"ghost-{i}", "label": float(rng.normal())}
    if c == 7:
        return "samples", b'{"id":"big%d","features":[' % i + b"1," * int(rng.integers(2100, 40000)) + b"1]}"
    if c == 8:
        return "context", pick([{"context": ""}, {"context": 5}, {"context": "x" * 200}, [], "str", {}])
    if c == 9:
        return "labels", {"id": f"g{i}", "label": pick(["abc", None, [1], True, {"a": 1}])}
    if c == 10:
        return "commands", pick([{"command": "nope"}, {"command": "load_bundle"}, {"command": "load_bundle", "path": 5},
                                 b"\x00\x01", [], {"command": "load_bundle", "path": "/nonexistent/bundle"}])
    if c == 11:
        return "samples", {"id": f"u{i}", "features": {"bogus": 1.0}}
    if c == 12:
        return "samples", {"id": f"m{i}", "ts": 1}
    if c == 13:
        return "samples", {"id": f"o{i}", "features": [1e300] * nf}
    return "samples", b"\xff\xfe" + rng.bytes(20)


def _expect_error(topic: str, payload: bytes, schema: Schema, seen: set) -> bool:
    """The oracle: would the protocol reject this? (False for a payload that is valid by chance.)"""
    if len(payload) > MAX_BYTES:
        return True
    try:
        obj = decode(payload)
        if topic == "samples":
            s = parse_sample(obj, schema)
            if s.id in seen:
                return False  # a duplicate: silently ignored
            seen.add(s.id)
            return False
        if topic == "labels":
            parse_label(obj, schema)
            return True  # never-seen ids only: held, then unknown_sample_id after limits.early_label_ttl_s
        if topic == "context":
            parse_context(obj)
            return False
        return True  # every fuzzed command is invalid
    except PayloadError:
        return True


def test_fuzzed_payloads_are_reported_not_fatal_and_memory_stays_bounded(tmp_path, broker, bundle, line,
                                                                          agent_factory):
    total = N["fuzz"]
    nf = bundle.n_features
    schema = Schema(FEATURES[:nf] if bundle.x is None or nf == len(FEATURES) else [str(i) for i in range(nf)],
                    (nf,), bundle.task_kind)
    # ghost labels (never-seen ids) are held for their sample, reported once their time is up
    agent = agent_factory(write_config(tmp_path, broker, bundle, **{"limits.early_label_ttl_s": 0.5})).start(line)
    rng = np.random.default_rng(1234)
    good = _xs(bundle, 1)[0]
    seen: set = set()
    sent = {"bad": 0, "valid_by_chance": 0, "good": 0}
    good_ids = []

    def send(n, start):
        for i in range(start, start + n):
            topic, obj = _fuzz(rng, i, nf)
            payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            if _expect_error(topic, payload, schema, seen):
                sent["bad"] += 1
            else:
                sent["valid_by_chance"] += 1
            line.publish(topic, payload)
            if i % 100 == 99:
                sid = f"good-{i}"
                line.sample(sid, good)
                good_ids.append(sid)
                sent["good"] += 1
            if i % 2000 == 1999:  # let the agent keep up: the broker holds 1000 in flight at most per client
                line.wait_for(lambda: len(line.errors) >= sent["bad"] - 1000, 60)

    t0 = time.monotonic()
    warm = min(1000, total // 5)
    send(warm, 0)
    assert line.wait_for(lambda: len(line.errors) >= sent["bad"], 60), (len(line.errors), sent)
    rss0 = rss_kib(agent.proc.pid)
    send(total - warm, warm)
    timeout = 60 + total / 200
    assert line.wait_for(lambda: len(line.errors) >= sent["bad"], timeout), (len(line.errors), sent, agent.log()[-2000:])
    assert line.wait_predictions(good_ids, 30)
    time.sleep(0.5)
    rss1 = rss_kib(agent.proc.pid)
    assert agent.proc.poll() is None, agent.log()[-3000:]
    assert len(line.errors) == sent["bad"], (len(line.errors), sent)
    reasons: dict = {}
    for e in line.errors:
        reasons[e["reason"]] = reasons.get(e["reason"], 0) + 1
    assert "internal_error" not in reasons, [e for e in line.errors if e["reason"] == "internal_error"][:3]
    assert all(len(line.predictions[s]) == 1 for s in good_ids)
    growth = (rss1 - rss0) / 1024
    print(f"\nfuzz payloads={total} bad={sent['bad']} valid_by_chance={sent['valid_by_chance']} "
          f"errors={len(line.errors)} reasons={reasons} rss {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB "
          f"in {time.monotonic() - t0:.1f}s")
    assert growth < 20, f"RSS grew by {growth:.1f} MiB"
    assert agent.terminate() == 0


SHIPPED_CONF = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto" / "mosquitto.conf"


def shipped_durability() -> str:
    """The autosave lines of the shipped broker config, as they are (the case must test those)."""
    lines = [ln.strip() for ln in SHIPPED_CONF.read_text().splitlines() if ln.strip().startswith("autosave_")]
    assert lines, f"{SHIPPED_CONF} sets no autosave policy"
    return "\n".join(lines) + "\n"


def test_broker_sigkill_before_any_autosave_keeps_queued_samples(tmp_path, bundle, agent_factory):
    """Samples queued for the stopped agent, acknowledged by the broker, then the broker SIGKILLed at
    once, long before a time-based autosave (the old shipped config: every 60 s): after the broker
    restarts, the agent must get and predict every one (deploy/mosquitto/README.md, Durability)."""
    from tests.support.mosquitto import start_mosquitto

    broker = start_mosquitto(tmp_path, extra_conf=BROKER_CONF + shipped_durability())
    try:
        cfg = write_config(tmp_path, broker, bundle)
        line = LineClient(broker.host, broker.port, PREFIX)
        agent = agent_factory(cfg).start(line)  # its persistent session and subscriptions exist now
        assert agent.terminate() == 0
        line.close()

        n = 500
        ids = [f"q-{i}" for i in range(n)]
        xs = _xs(bundle, n)
        pub = LineClient(broker.host, broker.port, PREFIX)
        t0 = time.monotonic()
        infos = [pub.sample(sid, xs[i]) for i, sid in enumerate(ids)]
        for info in infos:
            info.wait_for_publish(30)
        acked_s = time.monotonic() - t0
        assert all(info.is_published() for info in infos)
        # The guarantee: what was acknowledged in an earlier pass of mosquitto's main loop is on disk
        # (the pass in progress may not be). 0.2 s is thousands of passes and far below any
        # time-based autosave.
        time.sleep(0.2)
        broker.kill()
        pub.close()

        broker.start()
        line = LineClient(broker.host, broker.port, PREFIX)
        try:
            agent = agent_factory(cfg).start(line, timeout=30)
            ok = line.wait_predictions(ids, 60)
            missing = [sid for sid in ids if sid not in line.predictions]
            assert ok and not missing, f"{len(missing)} of {n} queued samples lost, e.g. {missing[:5]}\n" \
                                       f"{agent.log()[-2000:]}"
            print(f"\nqueued={n} published+acked in {acked_s:.2f}s under {shipped_durability()!r}; lost=0")
            assert agent.terminate() == 0
        finally:
            line.close()
    finally:
        broker.kill()
