"""Metrics: record events, scrape /metrics over real HTTP, check the numbers."""

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from edge_agent.metrics import Metrics
from conftest import write_config  # at import time: at run time 'conftest' may be another folder's

REPO = Path(__file__).resolve().parents[2]


def _parse(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture
def served():
    m = Metrics()
    server, _thread = m.start_server("127.0.0.1", 0)  # port 0: the kernel picks a free one, no race
    yield m, server.server_address[1]
    m.stop_server()


def _scrape(port) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        return _parse(r.read().decode())


def test_scrape_after_events(served):
    m, port = served
    for _ in range(5):
        m.on_sample()
    m.on_prediction(0.003)
    m.on_prediction(0.2)
    m.on_error("bad_json")
    m.on_error("bad_json")
    m.on_error("schema")
    m.on_adapt(0.04)
    m.on_reconnect()
    m.set_support_size("line1/press", 7)
    m.set_support_size("line2/oven", 3)
    m.set_support_size("line1/press", 9)
    m.set_model_version("0123456789abcdef")

    v = _scrape(port)
    assert v["edge_agent_samples_total"] == 5
    assert v["edge_agent_predictions_total"] == 2
    assert v['edge_agent_errors_total{reason="bad_json"}'] == 2
    assert v['edge_agent_errors_total{reason="schema"}'] == 1
    assert v["edge_agent_adaptations_total"] == 1
    assert v["edge_agent_reconnects_total"] == 1
    assert v['edge_agent_support_size{context="line1/press"}'] == 9
    assert v['edge_agent_support_size{context="line2/oven"}'] == 3
    assert v['edge_agent_model_info{version="0123456789abcdef"}'] == 1

    assert v["edge_agent_prediction_latency_seconds_count"] == 2
    assert v["edge_agent_prediction_latency_seconds_sum"] == pytest.approx(0.203)
    assert v['edge_agent_prediction_latency_seconds_bucket{le="0.005"}'] == 1
    assert v['edge_agent_prediction_latency_seconds_bucket{le="+Inf"}'] == 2
    assert v["edge_agent_adapt_seconds_count"] == 1
    assert v['edge_agent_adapt_seconds_bucket{le="0.05"}'] == 1
    assert v['edge_agent_adapt_seconds_bucket{le="0.025"}'] == 0

    m.on_sample()
    m.set_model_version("fedcba9876543210")
    v = _scrape(port)
    assert v["edge_agent_samples_total"] == 6
    assert v['edge_agent_model_info{version="fedcba9876543210"}'] == 1
    assert 'edge_agent_model_info{version="0123456789abcdef"}' not in v


def test_private_registry_not_global():
    from prometheus_client import REGISTRY

    a, b = Metrics(), Metrics()  # two instances must not clash ("Duplicated timeseries")
    a.on_sample()
    assert _parse(b.render().decode())["edge_agent_samples_total"] == 0
    assert REGISTRY.get_sample_value("edge_agent_samples_total") is None


def test_import_is_lazy():
    # The agent imports edge_agent.metrics even with metrics off; prometheus_client must not load then.
    code = "import sys, edge_agent.metrics; assert 'prometheus_client' not in sys.modules; print('lazy')"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "lazy" in r.stdout, r.stderr


def test_no_created_series_and_process_metrics(served):
    m, port = served
    m.on_sample()
    m.on_prediction(0.01)
    m.on_error("bad_json")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert "_created" not in text
    v = _parse(text)
    assert v["process_resident_memory_bytes"] > 10 * 2**20  # a Python process with numpy: > 10 MiB
    assert v["process_cpu_seconds_total"] > 0
    assert v["process_open_fds"] >= 3
    assert v["edge_agent_connected"] == 0 and v["edge_agent_last_adaptation_timestamp_seconds"] == 0


def test_queue_connected_and_last_adaptation(served):
    import time

    m, port = served
    m.set_queue(17, 4)
    m.set_connected(True)
    t0 = time.time()
    m.on_adapt(0.01)
    v = _scrape(port)
    assert v["edge_agent_queue_depth"] == 17 and v["edge_agent_outbox_size"] == 4
    assert v["edge_agent_connected"] == 1
    assert t0 - 1 <= v["edge_agent_last_adaptation_timestamp_seconds"] <= time.time() + 1
    m.set_connected(False)
    assert _scrape(port)["edge_agent_connected"] == 0


def test_context_labels_are_bounded():
    m = Metrics(max_context_labels=3)
    for i in range(5000):
        m.set_support_size(f"ctx-{i}", i % 7)
    m.set_support_size("ctx-1", 6)  # a labelled context keeps its own series
    v = _parse(m.render().decode())
    series = [k for k in v if k.startswith("edge_agent_support_size{")]
    assert sorted(series) == sorted(f'edge_agent_support_size{{context="{c}"}}' for c in
                                    ("ctx-0", "ctx-1", "ctx-2", "other"))
    assert v['edge_agent_support_size{context="ctx-1"}'] == 6
    assert v['edge_agent_support_size{context="other"}'] == 4999 % 7  # the latest beyond the cap
    # a context literally named "other" cannot take a slot of its own
    m2 = Metrics(max_context_labels=3)
    m2.set_support_size("other", 2)
    assert m2.context_label("a") == "a" and len(m2._context_labels) == 1


def test_agent_serves_the_new_metrics(tmp_path, broker, bundle, line, agent_factory):
    from tests.support.mosquitto import free_port

    port = free_port()
    cfg = write_config(tmp_path, broker, bundle, **{"metrics.enabled": True, "metrics.port": port,
                                                    "adaptation.min_labels": 1})
    agent = agent_factory(cfg).start(line)
    for i in range(3):
        line.sample(f"m{i}", bundle.x[i], label=bundle.label(bundle.y[i]))
    assert line.wait_predictions([f"m{i}" for i in range(3)], 15), agent.log()
    import time

    deadline = time.monotonic() + 10
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        v = _parse(text)
        if v.get("edge_agent_last_adaptation_timestamp_seconds", 0) > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "_created" not in text
    assert v["edge_agent_connected"] == 1
    assert v["edge_agent_last_adaptation_timestamp_seconds"] > 0, text
    assert "edge_agent_queue_depth" in v and "edge_agent_outbox_size" in v
    assert v["process_resident_memory_bytes"] > 0 and v["process_open_fds"] > 0
    assert agent.terminate() == 0
