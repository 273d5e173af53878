"""Edge-agent fixtures: a real mosquitto per test, a bundle, and the agent as a real subprocess.

Bundle selection: $EDGE_TEST_BUNDLE (a real `meta-export` bundle dir; its task data from
$EDGE_TEST_TASK_FILE, an npz per docs/protocol.md, and optionally $EDGE_TEST_SCRATCH_BUNDLE), else a
linear bundle generated with onnx.helper (tests/edge/linear_bundle.py). Nothing here imports torch;
with EDGE_ASSERT_NO_TORCH=1 the session fails if anything did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from linear_bundle import FEATURES, LinearFamily, make_linear_bundle  # noqa: E402
from tests.support.mosquitto import start_mosquitto  # noqa: E402

# The broker's defaults (20 in flight, 1000 queued per client) would throttle or drop a test stream.
BROKER_CONF = "max_queued_messages 0\nmax_inflight_messages 0\n"


@pytest.fixture
def broker(tmp_path):
    b = start_mosquitto(tmp_path, extra_conf=BROKER_CONF)
    yield b
    b.kill()


class BundleInfo:
    def __init__(self, path: Path, scratch: Path | None, x: np.ndarray | None, y: np.ndarray | None, real: bool):
        self.path, self.scratch, self.x, self.y, self.real = path, scratch, x, y, real
        manifest = json.loads((path / "manifest.json").read_text())
        self.task_kind = manifest["task_kind"]
        self.n_classes = len(manifest.get("class_names") or [])

    def other_label(self, y):
        """A label very different from y: another product's quality."""
        return (int(y) + 1) % self.n_classes if self.task_kind == "classification" else float(y) + 50.0

    def label(self, y):
        return int(y) if self.task_kind == "classification" else float(y)

    @property
    def n_features(self) -> int:
        return int(np.prod(self.x.shape[1:])) if self.x is not None else len(FEATURES)


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> BundleInfo:
    env = os.environ.get("EDGE_TEST_BUNDLE")
    if env:
        task = os.environ.get("EDGE_TEST_TASK_FILE")
        x = y = None
        if task:
            d = np.load(task, allow_pickle=False)
            x, y = d["x"], d["y"]
        scratch = os.environ.get("EDGE_TEST_SCRATCH_BUNDLE")
        return BundleInfo(Path(env), Path(scratch) if scratch else None, x, y, real=True)
    base = tmp_path_factory.mktemp("bundles")
    fam = LinearFamily()
    path = make_linear_bundle(base / "bundle", fam)
    scratch = make_linear_bundle(base / "scratch", fam, init=np.zeros(len(fam.theta0), np.float32))
    # An unseen task: its seed is far from anything a "meta-training" would have drawn.
    x, y = fam.sample(fam.sample_task(987654), 1200, seed=4242)
    return BundleInfo(path, scratch, x, y, real=False)


def write_config(tmp_path: Path, broker, bundle: BundleInfo, **overrides) -> Path:
    cfg = {
        "topic_prefix": "factory/line1/dev1",
        "state_dir": str(tmp_path / "state"),
        "log_level": "info",
        "broker": {"host": broker.host, "port": broker.port, "client_id": "edge-test-agent", "keepalive": 10,
                   "reconnect_min_delay": 1, "reconnect_max_delay": 2, "connect_timeout": 10},
        "bundle": {"dir": str(bundle.path), "allow_unsigned": True},
        "adaptation": {"support_size": 10, "adapt_every": 1, "min_labels": 3},
        "limits": {"max_payload_bytes": 4096, "queue_size": 1000},
    }
    for key, value in overrides.items():  # "adaptation.min_labels": 5
        d = cfg
        *parts, last = key.split(".")
        for part in parts:
            d = d.setdefault(part, {})
        d[last] = value
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class AgentProc:
    """`python -m edge_agent run --config ...` as a real process, its stdout in a log file."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log_path = config, log
        self.proc: subprocess.Popen | None = None

    def start(self, line=None, timeout: float = 20.0) -> "AgentProc":
        mark = len(line.status) if line is not None else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        if line is not None:
            ok = line.wait_for(lambda: any(s.get("status") == "online" for s in line.status[mark:])
                               or self.proc.poll() is not None, timeout)
            if not ok or self.proc.poll() is not None:
                raise AssertionError(f"agent did not come online:\n{self.log()}")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def agent_factory(tmp_path):
    procs: list[AgentProc] = []

    def make(config: Path) -> AgentProc:
        a = AgentProc(config, tmp_path / f"agent{len(procs)}.log")
        procs.append(a)
        return a

    yield make
    for a in procs:
        a.stop_quietly()


@pytest.fixture
def line(broker):
    from edge_agent.simulator import LineClient

    c = LineClient(broker.host, broker.port, "factory/line1/dev1")
    yield c
    c.close()


def wait_until(pred, timeout: float = 10.0, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("EDGE_ASSERT_NO_TORCH") == "1" and "torch" in sys.modules:
        print("\nFAIL: torch was imported during the edge tests", file=sys.stderr)
        session.exitstatus = 1
