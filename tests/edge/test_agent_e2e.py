"""The agent as a real process against a real mosquitto: every sample predicted once, adaptation helps,
SIGKILL loses nothing, bad payloads are reported, contexts keep their own state, SIGTERM is clean."""

import json
import signal
import time

import numpy as np
import pytest

from conftest import write_config
from edge_agent.simulator import _local_model, play, score

K = 10


def _value(p):
    return p.get("probabilities", p["prediction"])


def _need_task(bundle):
    if bundle.x is None:
        pytest.skip("EDGE_TEST_BUNDLE given without EDGE_TEST_TASK_FILE: no truth to score against")


def test_stream_with_delayed_labels_adapts_and_predicts_each_sample_once(tmp_path, broker, bundle, line,
                                                                         agent_factory):
    _need_task(bundle)
    agent = agent_factory(write_config(tmp_path, broker, bundle)).start(line)
    x, y = bundle.x[:500], bundle.y[:500]
    ids = play(line, x, y, "run", rate=1000, label_delay=5)
    assert line.wait_predictions(ids, 30), f"missing {sum(i not in line.predictions for i in ids)}\n{agent.log()}"
    time.sleep(0.3)  # a duplicate would arrive right behind the original
    assert all(len(line.predictions[i]) == 1 for i in ids)
    assert len(line.predictions) == len(ids)
    assert not line.errors, line.errors

    first = line.predictions[ids[0]][0]
    assert first["adapted"] is False and first["n_support"] == 0  # meta-initialisation, and it says so
    late = line.predictions[ids[-1]][0]
    assert late["adapted"] is True and late["n_support"] == K
    assert late["context"] == "default" and late["model_version"] and late["latency_ms"] >= 0

    rep = score(ids, x, y, line.predictions, 5, _local_model(str(bundle.path)),
                _local_model(str(bundle.scratch)) if bundle.scratch else None, K)
    assert rep["n_predicted"] == 500 and rep["duplicates"] == 0
    # on the same (adapted) samples: adapted agent < meta-initialisation (< scratch, when available)
    assert rep["mse_agent_adapted"] < rep["mse_meta_init_reference"], rep
    if rep["mse_scratch_reference"] is not None:
        assert rep["mse_agent_adapted"] < rep["mse_scratch_reference"], rep
    assert agent.terminate() == 0


def test_sigkill_mid_stream_loses_nothing_and_comes_back_adapted(tmp_path, broker, bundle, line, agent_factory):
    _need_task(bundle)
    cfg = write_config(tmp_path, broker, bundle)
    agent = agent_factory(cfg).start(line)
    x, y = bundle.x[:400], bundle.y[:400]
    ids = [f"k-{i}" for i in range(len(x))]
    for i in range(200):
        line.sample(ids[i], x[i])
        if i >= 5:
            line.label(ids[i - 5], y[i - 5])
    assert line.wait_predictions(ids[:150], 20)
    # Frozen, the agent cannot process or acknowledge what the broker keeps sending it: these 50 are
    # delivered to its socket but unacknowledged when it dies, so the broker must redeliver them.
    agent.proc.send_signal(signal.SIGSTOP)
    for i in range(200, 250):
        line.sample(ids[i], x[i])
        line.label(ids[i - 5], y[i - 5])
    time.sleep(0.3)
    agent.kill()
    # the line keeps producing while the agent is down; the broker queues it in the persistent session
    for i in range(250, 400):
        line.sample(ids[i], x[i])
        line.label(ids[i - 5], y[i - 5])
    for j in range(395, 400):
        line.label(ids[j], y[j])
    agent2 = agent_factory(cfg).start(line)
    assert line.wait_predictions(ids, 30), f"lost: {[i for i in ids if i not in line.predictions][:10]}\n{agent2.log()}"
    time.sleep(0.3)
    for sid in ids:
        got = line.predictions[sid]
        # QoS 1 allows a re-sent prediction (outbox after a crash), but never a second, different one
        assert all(json.dumps({k: v for k, v in g.items() if k != "_t"}, sort_keys=True)
                   == json.dumps({k: v for k, v in got[0].items() if k != "_t"}, sort_keys=True) for g in got), got
    post = [line.predictions[s][0] for s in ids[200:]]
    assert all(p["adapted"] and p["n_support"] == K for p in post)  # restored support set and state
    assert not [e for e in line.errors if e["reason"] != "unknown_sample_id"], line.errors
    assert agent2.terminate() == 0
    assert "journal records replayed" in agent2.log() or "restored" in agent2.log()


def test_malformed_payloads_are_reported_not_fatal(tmp_path, broker, bundle, line, agent_factory):
    from tests.support.mosquitto import free_port

    mport = free_port()
    agent = agent_factory(write_config(tmp_path, broker, bundle, **{"metrics.enabled": True, "metrics.port": mport,
                                                                    "limits.early_label_ttl_s": 1.0})).start(line)
    nf = bundle.n_features
    good = np.zeros(nf).tolist() if bundle.x is None else bundle.x[0].tolist()
    line.publish("samples", b"{not json")
    line.publish("samples", {"id": "short", "features": good[:-1]})
    line.publish("samples", b'{"id": "nan", "features": [NaN' + b", 1.0" * (nf - 1) + b"]}")
    line.publish("samples", {"id": "big", "features": good, "pad": "x" * 5000})
    line.publish("samples", {"features": good})
    line.publish("labels", {"id": "never-seen", "label": 1.0})  # held 1 s for its sample, then reported
    line.publish("labels", {"id": "late", "label": 1.0})  # its sample comes after it: joined, no error
    line.publish("labels", b"[1, 2]")
    line.publish("context", {"context": ""})
    line.sample("ok", good)
    line.sample("late", good)
    assert line.wait_predictions(["ok", "late"], 10), agent.log()
    assert line.wait_for(lambda: len(line.errors) >= 8, 10), line.errors
    got = {(e["reason"], e["id"]) for e in line.errors}
    assert ("bad_json", None) in got
    assert ("feature_count", "short") in got
    assert ("non_finite", "nan") in got
    assert ("oversized", None) in got  # too big to be parsed for its id, by design
    assert ("bad_payload", None) in got
    assert ("unknown_sample_id", "never-seen") in got
    assert ("bad_context", None) in got
    assert set(line.predictions) == {"ok", "late"}
    assert not [e for e in line.errors if e["id"] == "late"]
    assert agent.proc.poll() is None

    # the same events, counted for Prometheus
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
    assert 'edge_agent_errors_total{reason="feature_count"} 1.0' in text
    assert "edge_agent_predictions_total 2.0" in text
    assert agent.terminate() == 0


def test_context_switch_restores_previous_context_state(tmp_path, broker, bundle, line, agent_factory):
    _need_task(bundle)
    cfg = write_config(tmp_path, broker, bundle)
    agent = agent_factory(cfg).start(line)
    x, y = bundle.x, bundle.y
    probe = x[-1]

    def labelled(prefix, xs, ys):
        for i in range(len(xs)):
            line.sample(f"{prefix}-{i}", xs[i], label=ys[i])

    line.context("recipe-A")
    labelled("a", x[:12], [bundle.label(v) for v in y[:12]])
    line.sample("probe-a1", probe)
    line.context("recipe-B")
    labelled("b", x[12:15], [bundle.other_label(v) for v in y[12:15]])  # another product: its own state
    line.sample("probe-b", probe)
    line.context("recipe-A")
    line.sample("probe-a2", probe)
    assert line.wait_predictions(["probe-a1", "probe-b", "probe-a2"], 15), agent.log()
    a1, b, a2 = (line.predictions[i][0] for i in ("probe-a1", "probe-b", "probe-a2"))
    assert a1["context"] == a2["context"] == "recipe-A" and b["context"] == "recipe-B"
    assert a1["adapted"] and a1["n_support"] == K
    assert b["adapted"] and b["n_support"] == 3
    assert _value(a2) == _value(a1) and a2["n_support"] == K  # A's state came back untouched
    assert _value(b) != _value(a1)

    # ... and survives a restart, with the current context remembered
    assert agent.terminate() == 0
    agent2 = agent_factory(cfg).start(line)
    line.sample("probe-a3", probe)
    assert line.wait_predictions(["probe-a3"], 15), agent2.log()
    a3 = line.predictions["probe-a3"][0]
    assert a3["context"] == "recipe-A" and _value(a3) == _value(a1)
    assert agent2.terminate() == 0


def test_sigterm_exits_0_and_status_offline(tmp_path, broker, bundle, line, agent_factory):
    cfg = write_config(tmp_path, broker, bundle)
    agent = agent_factory(cfg).start(line)
    online = [s for s in line.status if s.get("status") == "online"][-1]
    assert online["model_version"]
    good = np.zeros(bundle.n_features).tolist() if bundle.x is None else bundle.x[0].tolist()
    ids = [f"t-{i}" for i in range(200)]
    for sid in ids:
        line.sample(sid, good)
    time.sleep(0.05)  # SIGTERM mid-stream
    assert agent.terminate() == 0, agent.log()
    assert line.wait_for(lambda: line.status and line.status[-1].get("status") == "offline", 5), line.status
    log = agent.log()
    assert "stopped cleanly (0 prediction(s) left in the outbox)" in log and "<6>" in log

    # the retained status a newcomer sees is offline, too
    from edge_agent.simulator import LineClient

    late = LineClient(broker.host, broker.port, "factory/line1/dev1")
    try:
        assert late.wait_for(lambda: bool(late.status), 5)
        assert late.status[-1]["status"] == "offline"
    finally:
        late.close()

    # what was received but not processed was not acknowledged: the next run predicts it, once
    agent2 = agent_factory(cfg).start(line)
    assert line.wait_predictions(ids, 20), agent2.log()
    time.sleep(0.3)
    assert all(len(line.predictions[i]) == 1 for i in ids)
    assert agent2.terminate() == 0


def test_burst_beyond_queue_size_loses_nothing(tmp_path, broker, bundle, line, agent_factory):
    """A burst far larger than the queue: the broker may overshoot our Receive Maximum (mosquitto
    2.0.11 does), and a QoS 1 sample must still never be dropped."""
    cfg = write_config(tmp_path, broker, bundle, **{"limits.queue_size": 10, "limits.batch_size": 4})
    agent = agent_factory(cfg).start(line)
    good = np.zeros(bundle.n_features) if bundle.x is None else bundle.x[0]
    ids = [f"burst-{i}" for i in range(1000)]
    for sid in ids:
        line.sample(sid, good)
    assert line.wait_predictions(ids, 30), f"{sum(i in line.predictions for i in ids)}/1000\n{agent.log()[-2000:]}"
    assert not line.errors, line.errors[:3]
    assert agent.terminate() == 0


def test_tls_with_password_file(tmp_path, bundle, agent_factory):
    """broker.tls + username/password_file: the agent serves over an authenticated TLS listener."""
    from edge_agent.simulator import LineClient
    from tests.support.certs import make_tls_files
    from tests.support.mosquitto import start_mosquitto, write_password_file

    tls = make_tls_files(tmp_path / "tls")
    users = write_password_file(tmp_path / "passwd", {"agent": "s3cret", "line": "l1ne"})
    b = start_mosquitto(tmp_path, extra_conf=(
        f"cafile {tls.ca_cert}\ncertfile {tls.server_cert}\nkeyfile {tls.server_key}\n"
        f"allow_anonymous false\npassword_file {users}\n"))
    try:
        (tmp_path / "agent.pw").write_text("s3cret\n")
        cfg = write_config(tmp_path, b, bundle, **{"broker.tls": {"ca": str(tls.ca_cert)},
                                                   "broker.username": "agent",
                                                   "broker.password_file": str(tmp_path / "agent.pw")})
        agent = agent_factory(cfg).start()
        line = LineClient(b.host, b.port, "factory/line1/dev1", tls_ca=str(tls.ca_cert),
                          username="line", password="l1ne")
        try:
            good = np.zeros(bundle.n_features) if bundle.x is None else bundle.x[0]
            assert line.wait_for(lambda: any(s.get("status") == "online" for s in line.status), 15), agent.log()
            line.sample("tls-1", good)
            assert line.wait_predictions(["tls-1"], 10), agent.log()
        finally:
            line.close()
        assert agent.terminate() == 0
    finally:
        b.kill()



def test_no_broker_exits_5(tmp_path, bundle):
    import subprocess
    import sys

    from tests.support.mosquitto import free_port

    class Nowhere:
        host, port = "127.0.0.1", free_port()

    cfg = write_config(tmp_path, Nowhere, bundle, **{"broker.connect_timeout": 1.5})
    r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 5, r.stdout + r.stderr
    assert "BrokerError" in r.stderr


def test_tampered_bundle_exits_3(tmp_path, bundle):
    import shutil
    import subprocess
    import sys

    bad = tmp_path / "bad_bundle"
    shutil.copytree(bundle.path, bad)
    with open(bad / "init_state.npy", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x01" if f.read(1) != b"\x01" else b"\x02")

    class Nowhere:
        host, port = "127.0.0.1", 1

    cfg = write_config(tmp_path, Nowhere, bundle, **{"bundle.dir": str(bad)})
    r = subprocess.run([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "init_state.npy" in r.stderr and "sha256" in r.stderr


def test_simulate_and_verify_subcommands(tmp_path, broker, bundle, line, agent_factory):
    import subprocess
    import sys

    from linear_bundle import write_task_file

    _need_task(bundle)
    cfg = write_config(tmp_path, broker, bundle)
    agent = agent_factory(cfg).start(line)
    task = write_task_file(tmp_path / "task.npz", bundle.x[:80], bundle.y[:80])
    cmd = [sys.executable, "-m", "edge_agent", "simulate", "--config", str(cfg), "--task-file", str(task),
           "--rate", "0", "--label-delay", "3", "--bundle", str(bundle.path), "--out", str(tmp_path / "sim")]
    if bundle.scratch:
        cmd += ["--scratch-bundle", str(bundle.scratch)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr + agent.log()
    report = json.loads((tmp_path / "sim" / "report.json").read_text())
    assert report["n_predicted"] == 80 and report["duplicates"] == 0 and report["bins"]
    assert "agent" in r.stdout and "scratch" in r.stdout  # the table
    assert agent.terminate() == 0

    r = subprocess.run([sys.executable, "-m", "edge_agent", "verify", str(bundle.path), "--allow-unsigned"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr
