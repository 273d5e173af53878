"""Soak test of the edge agent (not in CI): a long stream through a real mosquitto on 127.0.0.1.

    .venv/bin/python benchmarks/agent_soak.py                   # 1,000,000 samples
    .venv/bin/python benchmarks/agent_soak.py --samples 60000   # shortened
    .venv/bin/python benchmarks/agent_soak.py --distinct-contexts --samples 100000

--distinct-contexts: every sample names a context never seen before and carries its label (issue 12
item 2: any publisher can invent context names), so every sample creates a context; the agent keeps
limits.max_contexts (--max-contexts) of them. Also reported: the state directory's size (snapshot +
journal) at the start, middle and end, and RSS at the same points; pass also needs the state size at
the end within --max-state-growth-mib of the middle one.

The agent runs as a real process (`python -m edge_agent run`) on a linear test bundle (tests/edge/
linear_bundle.py), every 4th sample carries its label (so it adapts all along), a context switch every
50,000 samples. The publisher keeps at most --window samples without a prediction in flight (the
line's pace is whatever the agent sustains). RSS of the agent is read from /proc every second.
Pass criteria: 0 samples without a prediction, RSS growth after warm-up < 5 MiB. Prints a table and
one JSON line; exit 1 when a criterion fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "tests" / "edge")):
    if p not in sys.path:
        sys.path.insert(0, p)

import numpy as np  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
import yaml  # noqa: E402

from fault_tools import RobustPublisher, rss_kib  # noqa: E402
from linear_bundle import LinearFamily, make_linear_bundle  # noqa: E402
from tests.support.mosquitto import start_mosquitto  # noqa: E402

PREFIX = "factory/soak/dev1"


class Counter:
    """Counts predictions per id (a bytearray: 1 byte per sample, 1 MB for a million)."""

    def __init__(self, host, port, n):
        self.seen = bytearray(n)
        self.received = self.dups = self.errors = 0
        self.online = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-consumer", protocol=mqtt.MQTTv5)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe([(f"{PREFIX}/predictions", 1),
                                                                (f"{PREFIX}/errors", 1), (f"{PREFIX}/status", 1)])
        self.c.on_message = self._on_message
        self.c.connect(host, port, 30)
        self.c.loop_start()

    def _on_message(self, client, userdata, msg):
        kind = msg.topic.rsplit("/", 1)[1]
        if kind == "predictions":
            i = int(json.loads(msg.payload)["id"][2:])
            if self.seen[i]:
                self.dups += 1
            else:
                self.seen[i] = 1
                self.received += 1
        elif kind == "errors":
            self.errors += 1
        elif b'"online"' in msg.payload:
            self.online.set()

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def state_mib(state_dir: Path) -> float:
    """Snapshot + journals (+ installed bundles) on disk."""
    return sum(p.stat().st_size for p in state_dir.rglob("*") if p.is_file()) / 2**20 if state_dir.exists() else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--warmup", type=int, default=None, help="samples before the RSS baseline (default: "
                    "min(100000, samples/3), at least 25000 so that the id/pending/resend caches are full)")
    ap.add_argument("--window", type=int, default=500, help="samples in flight without a prediction")
    ap.add_argument("--max-growth-mib", type=float, default=5.0)
    ap.add_argument("--distinct-contexts", action="store_true", help="each sample in a new context, labelled")
    ap.add_argument("--max-contexts", type=int, default=1000, help="limits.max_contexts of the agent")
    ap.add_argument("--max-state-growth-mib", type=float, default=2.0)
    args = ap.parse_args(argv)
    n = args.samples
    warmup = args.warmup if args.warmup is not None else max(25_000, min(100_000, n // 3))
    work = Path(tempfile.mkdtemp(prefix="agent-soak-"))
    broker = start_mosquitto(work, extra_conf="max_queued_messages 0\nmax_inflight_messages 0\n")
    fam = LinearFamily()
    bundle = make_linear_bundle(work / "bundle", fam)
    cfg = {"topic_prefix": PREFIX, "state_dir": str(work / "state"), "log_level": "warning",
           "broker": {"host": broker.host, "port": broker.port, "client_id": "soak-agent"},
           "bundle": {"dir": str(bundle), "allow_unsigned": True},
           "adaptation": {"support_size": 10, "min_labels": 3, "adapt_every": 1},
           "limits": {"max_contexts": args.max_contexts}}
    (work / "agent.yaml").write_text(yaml.safe_dump(cfg))
    log = open(work / "agent.log", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(work / "agent.yaml")],
                             stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
    counter = Counter(broker.host, broker.port, n)
    rss_samples: list[tuple[int, int]] = []  # (samples sent, RSS KiB)
    points: dict[str, tuple[int, float, float]] = {}  # start/middle/end -> (samples, RSS MiB, state MiB)
    try:
        if not counter.online.wait(30):
            raise SystemExit("agent did not come online")
        pub = RobustPublisher(broker.host, broker.port, PREFIX, client_id="soak-publisher")
        x, y = fam.sample(fam.sample_task(7), 5000, seed=3)
        t0 = time.monotonic()
        t_rss = 0.0
        baseline = None
        t_warm = None
        for i in range(n):
            while i - counter.received >= args.window:
                time.sleep(0.001)
            j = i % len(x)
            if i in (0, n // 2):
                points["start" if i == 0 else "middle"] = (i, rss_kib(agent.pid) / 1024, state_mib(work / "state"))
            if args.distinct_contexts:
                pub.publish("samples", {"id": f"s-{i}", "features": [float(v) for v in x[j]], "label": float(y[j]),
                                        "context": f"ctx-{i}"})
            else:
                if i % 50_000 == 0 and i:
                    pub.publish("context", {"context": f"recipe-{(i // 50_000) % 5}"})
                pub.sample(f"s-{i}", x[j], float(y[j]) if i % 4 == 0 else None)
            now = time.monotonic()
            if now - t_rss >= 1.0:
                t_rss = now
                rss_samples.append((i, rss_kib(agent.pid)))
            if i == warmup:
                baseline, t_warm = rss_kib(agent.pid), now
        deadline = time.monotonic() + 60
        while counter.received < n and time.monotonic() < deadline:
            time.sleep(0.05)
        t_end = time.monotonic()
        final = rss_kib(agent.pid)
        rss_samples.append((n, final))
        points["end"] = (n, final / 1024, state_mib(work / "state"))
        pub.close()
        agent.send_signal(15)
        rc = agent.wait(30)
    finally:
        if agent.poll() is None:
            agent.kill()
        counter.close()
        broker.kill()
        log.close()
    after = [r for i, r in rss_samples if i >= warmup]
    lost = n - counter.received
    res = {
        "samples": n, "warmup": warmup, "lost": lost, "duplicates": counter.dups, "errors": counter.errors,
        "seconds": round(t_end - t0, 1), "samples_per_s": round(n / (t_end - t0)),
        "rss_start_mib": round(rss_samples[0][1] / 1024, 1),
        "rss_at_warmup_mib": round(baseline / 1024, 1) if baseline else None,
        "rss_final_mib": round(final / 1024, 1),
        "rss_max_after_warmup_mib": round(max(after) / 1024, 1) if after else None,
        "rss_growth_after_warmup_mib": round((final - baseline) / 1024, 2) if baseline else None,
        "rss_max_growth_after_warmup_mib": round((max(after) - baseline) / 1024, 2) if baseline and after else None,
        "measured_span_s": round(t_end - t_warm, 1) if t_warm else None,
        "agent_exit": rc,
    }
    for name, (i, rss, st) in points.items():
        res[f"{name}_samples"], res[f"{name}_rss_mib"], res[f"{name}_state_mib"] = i, round(rss, 1), round(st, 2)
    if args.distinct_contexts:
        res["distinct_contexts"], res["max_contexts"] = n, args.max_contexts
    state_ok = "middle" not in points or points["end"][2] - points["middle"][2] < args.max_state_growth_mib
    ok = lost == 0 and res["rss_growth_after_warmup_mib"] is not None and \
        res["rss_growth_after_warmup_mib"] < args.max_growth_mib and rc == 0 and state_ok
    res["pass"] = ok
    print(f"{'metric':<34}{'value':>14}")
    for k, v in res.items():
        print(f"{k:<34}{v!s:>14}")
    print(json.dumps(res))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
