"""sd_notify against a real AF_UNIX datagram socket; the watchdog pings only while the main loop runs."""

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest

from edge_agent.sdnotify import Notifier, Watchdog, watchdog_interval


class Receiver:
    """Plays systemd: a bound datagram socket recording (monotonic time, message)."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, n, timeout=2.0):
        deadline = time.monotonic() + timeout
        while len(self.messages) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return [m for _, m in self.messages]

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def receiver():
    # Not tmp_path: AF_UNIX paths are limited to 108 bytes and pytest's tmp paths can be longer.
    d = tempfile.mkdtemp(prefix="sdn-")
    path = os.path.join(d, "notify.sock")
    r = Receiver(path)
    r.path = path
    yield r
    r.close()
    shutil.rmtree(d, ignore_errors=True)


def test_ready_status_stopping_reloading(receiver):
    n = Notifier(receiver.path)
    assert n.enabled
    assert n.ready()
    assert n.status("connected to broker\nREADY=1")
    assert n.reloading()
    assert n.stopping()
    msgs = receiver.wait_for(4)
    assert msgs[0] == "READY=1"
    assert msgs[1] == "STATUS=connected to broker READY=1"  # newline cannot inject an assignment
    lines = msgs[2].split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
    assert abs(int(lines[1].split("=")[1]) - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 5_000_000
    assert msgs[3] == "STOPPING=1"
    n.close()


def test_ready_with_status_is_one_datagram(receiver):
    Notifier(receiver.path).ready("serving")
    assert receiver.wait_for(1) == ["READY=1\nSTATUS=serving"]


def test_notify_socket_from_env(receiver, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.path)
    assert Notifier().ready()
    assert receiver.wait_for(1) == ["READY=1"]


def test_abstract_namespace():
    name = f"edge-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    r = Receiver(b"\0" + name.encode())
    try:
        assert Notifier("@" + name).ready()
        assert r.wait_for(1) == ["READY=1"]
    finally:
        r.close()


def test_noop_without_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert Watchdog(n, interval=0.01).tick() is False


def test_dead_socket_does_not_raise(tmp_path):
    assert Notifier(str(tmp_path / "nobody-listens.sock")).ready() is False


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "500000"}, 0.25),
    ],
)
def test_watchdog_interval(env, expected):
    assert watchdog_interval(env) == expected


def test_watchdog_interval_from_process_env(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() == 1.0
    assert Watchdog(Notifier("/unused")).interval == 1.0


def test_watchdog_rate_limited_with_fake_clock(receiver):
    t = [100.0]
    wd = Watchdog(Notifier(receiver.path), interval=5.0, clock=lambda: t[0])
    sent = []
    for _ in range(30):  # 15 s of loop iterations at 0.5 s
        sent.append(wd.tick())
        t[0] += 0.5
    assert sent.count(True) == 3  # t=100, 105, 110
    assert wd.max_sleep(10.0) == 5.0 and wd.max_sleep(1.0) == 1.0


def test_watchdog_pings_while_loop_runs_and_stop_when_stuck(receiver, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # systemd timeout 0.2 s -> ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    wd = Watchdog()
    assert wd.enabled and wd.interval == pytest.approx(0.1)

    stuck = threading.Event()
    loop_started = time.monotonic()

    def main_loop():
        while True:
            wd.tick()
            if stuck.is_set():
                time.sleep(0.8)  # a wedged handler: no more ticks
                return
            time.sleep(0.01)

    t = threading.Thread(target=main_loop)
    t.start()
    time.sleep(0.65)
    stuck.set()
    stuck_at = time.monotonic()
    t.join(5)

    pings = [ts for ts, m in receiver.messages if m == "WATCHDOG=1"]
    during = [ts for ts in pings if ts <= stuck_at + 0.05]
    after = [ts for ts in pings if ts > stuck_at + 0.05]
    # ~0.65 s / 0.1 s; a loaded CI box may lose a few, never gain
    assert 4 <= len(during) <= 8, pings
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert min(gaps) >= 0.09, gaps  # rate-limited to the interval
    assert sorted(gaps)[len(gaps) // 2] < 0.2, gaps  # and roughly on time
    assert during[0] - loop_started < 0.1  # first tick pings at once
    assert after == [], "pings continued while the main loop was stuck"
