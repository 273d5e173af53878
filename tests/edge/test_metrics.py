"""Metrics: record events, scrape /metrics over real HTTP, check the numbers."""

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from edge_agent.metrics import Metrics

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
