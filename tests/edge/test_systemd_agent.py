"""systemd notify integration of the running agent, with a real AF_UNIX datagram socket playing systemd:
READY=1 only once the bundle is loaded and the broker connected, WATCHDOG=1 at half $WATCHDOG_USEC from
the main loop only (a stopped or blocked main loop stops the pings), STATUS= lines, RELOADING=1 +
READY=1 around SIGHUP, STOPPING=1 on SIGTERM."""

import collections
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import BROKER_CONF, wait_until, write_config
from test_sdnotify import Receiver
from tests.support.mosquitto import MosquittoProc


@pytest.fixture
def notify(monkeypatch):
    d = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # AF_UNIX paths are limited to 108 bytes
    path = str(Path(d) / "notify.sock")
    r = Receiver(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # pings every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield r
    r.close()
    shutil.rmtree(d, ignore_errors=True)


def _first(r, word, after=0.0):
    return next((t for t, m in list(r.messages) if t >= after and word in m.split("\n")), None)


def _pings(r, t0, t1):
    return [t for t, m in list(r.messages) if t0 <= t < t1 and "WATCHDOG=1" in m.split("\n")]


def _statuses(r):
    return [line[7:] for _, m in list(r.messages) for line in m.split("\n") if line.startswith("STATUS=")]


def test_agent_notify_lifecycle(tmp_path, bundle, notify, agent_factory):
    from edge_agent.simulator import LineClient

    workdir = tmp_path / "mosq"
    workdir.mkdir()
    broker = MosquittoProc(workdir, BROKER_CONF)  # not started yet: the agent must wait for it
    try:
        cfg = write_config(tmp_path, broker, bundle, **{"broker.connect_timeout": 30})
        agent = agent_factory(cfg).start()
        time.sleep(2.5)
        assert agent.proc.poll() is None, agent.log()
        assert _first(notify, "READY=1") is None, "READY=1 before the broker was connected"
        assert not _pings(notify, 0, time.monotonic() + 1), "watchdog pings before READY=1"

        t_broker = time.monotonic()
        broker.start()
        assert wait_until(lambda: _first(notify, "READY=1") is not None, 15), agent.log()
        assert _first(notify, "READY=1") > t_broker
        line = LineClient(broker.host, broker.port, "factory/line1/dev1")
        try:
            assert line.wait_for(lambda: any(s.get("status") == "online" for s in line.status), 10)
            assert wait_until(lambda: any(s.startswith("online, model ") for s in _statuses(notify)), 5)

            # watchdog: about every 0.5 s, from the main loop
            t0 = time.monotonic()
            time.sleep(2.6)
            n = len(_pings(notify, t0, time.monotonic()))
            assert 3 <= n <= 8, n

            # a stopped main loop stops the pings; they resume with it
            agent.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.3)  # a datagram already in flight
            t_stop = time.monotonic()
            time.sleep(2.0)
            assert _pings(notify, t_stop, time.monotonic()) == []
            agent.proc.send_signal(signal.SIGCONT)
            t_cont = time.monotonic()
            assert wait_until(lambda: _pings(notify, t_cont, time.monotonic() + 1), 3)

            # STATUS follows the broker connection
            broker.kill()
            assert wait_until(lambda: "reconnecting" in _statuses(notify), 15), _statuses(notify)
            broker.start()
            assert wait_until(lambda: _statuses(notify)[-1].startswith("online, model "), 20), _statuses(notify)
            line.sample("s-1", np.zeros(bundle.n_features), label=bundle.label(0))  # a context exists once labelled
            assert line.wait_predictions(["s-1"], 15)
            assert wait_until(lambda: _statuses(notify)[-1].endswith(", 1 contexts"), 5), _statuses(notify)

            # SIGHUP: RELOADING=1 then READY=1 again
            t_hup = time.monotonic()
            agent.proc.send_signal(signal.SIGHUP)
            assert wait_until(lambda: _first(notify, "READY=1", t_hup) is not None, 10), agent.log()
            t_rel = _first(notify, "RELOADING=1", t_hup)
            assert t_rel is not None and t_rel <= _first(notify, "READY=1", t_hup)
            assert any(m.startswith("RELOADING=1\nMONOTONIC_USEC=") for _, m in notify.messages)

            t_term = time.monotonic()
            assert agent.terminate() == 0, agent.log()
            assert _first(notify, "STOPPING=1", t_term) is not None
        finally:
            line.close()
    finally:
        broker.kill()


class _Transport:
    """Connected at once; records publishes. Its deliveries come from the test thread, as paho's
    network thread's would, while the main loop is blocked."""

    def __init__(self, cfg, deliver, online, offline, obs):
        self.deliver = deliver
        self.connected = threading.Event()
        self.published = collections.deque()
        self.sent = []
        self._mid = 0

    def start(self):
        self.connected.set()

    def stop(self):
        self.connected.clear()

    def publish(self, topic, payload, qos=1, retain=False, resent=False):
        self._mid += 1
        self.sent.append(topic)
        self.published.append((self._mid, True))
        return self._mid

    def ack(self, mid, qos, gen):
        pass


def test_blocked_main_loop_stops_pings_while_other_threads_run(tmp_path, bundle, notify, monkeypatch):
    """Not a stopped process: only the main loop is stuck (inside onnxruntime's predict, say), the
    network thread keeps delivering. No thread pings on its behalf."""
    from edge_agent import sdnotify
    from edge_agent.agent import Agent
    from edge_agent.config import config_from_dict
    from edge_agent.model import Model, load_manifest
    from edge_agent.observer import SystemdObserver

    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s

    class Blocking:
        def __init__(self, m):
            self._m, self.gate, self.entered = m, threading.Event(), threading.Event()
            self.gate.set()

        def __getattr__(self, name):
            return getattr(self._m, name)

        def predict(self, state, x):
            self.entered.set()
            self.gate.wait(30)
            return self._m.predict(state, x)

    model = Blocking(Model(str(bundle.path), load_manifest(str(bundle.path), None, True)))
    cfg = config_from_dict({"topic_prefix": "f/l/d", "state_dir": str(tmp_path / "state"),
                            "bundle": {"dir": str(bundle.path), "allow_unsigned": True}})
    agent = Agent(cfg, model, SystemdObserver(sdnotify), transport_cls=_Transport)
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: _first(notify, "READY=1") is not None, 10)
        time.sleep(1.0)
        assert len(_pings(notify, 0, time.monotonic())) >= 3

        model.gate.clear()
        agent._on_message("f/l/d/samples", b'{"id": "a", "features": [200, 5, 1200, 0.3]}', 1, 1, 1)
        assert model.entered.wait(5)
        time.sleep(0.2)
        t_block = time.monotonic()
        for i in range(20):  # the "network thread" keeps queueing
            agent._on_message("f/l/d/samples", b'{"id": "b%d", "features": [200, 5, 1200, 0.3]}' % i, 2 + i, 1, 1)
            time.sleep(0.05)
        assert _pings(notify, t_block, time.monotonic()) == [], "pinged while the main loop was blocked"
        assert len(agent.queue) == 20
        model.gate.set()
        t_free = time.monotonic()
        assert wait_until(lambda: _pings(notify, t_free, time.monotonic() + 1), 2)
        assert wait_until(lambda: not agent.queue, 5)
    finally:
        model.gate.set()
        agent.request_stop()
        t.join(10)
    assert _first(notify, "STOPPING=1") is not None
