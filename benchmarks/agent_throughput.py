"""Agent throughput and latency through a real mosquitto on loopback (a benchmark, not a test).

    .venv/bin/python benchmarks/agent_throughput.py [--duration 3] [--max-samples 20000] [--bundle DIR]

Measures, with the agent as a real `python -m edge_agent run` process:
- time from process start to the retained `online` status,
- sample -> prediction latency p50/p99 (publish to receipt, both in this process) at 100/s, 1,000/s
  and as fast as this process can publish,
- sustained samples/s at max rate (first publish to last prediction),
- the agent's RSS (VmRSS at the end, VmHWM peak).
Targets: >= 10,000 samples/s, p99 < 10 ms at 1,000/s, RSS < 80 MiB, online < 1 s.
Without --bundle a linear test bundle (tests/edge/linear_bundle.py, needs onnx) is generated and signed:
the agent runs with the production trust settings (signature checked at start).
QoS 1 both ways, the full durable path (journal fsync per batch). Samples only by default;
`--labels inline` gives every sample its label (`"label"` in the sample), `--labels topic` sends each
label as its own message on `labels` right after its sample: with adaptation.adapt_every 1 (the
default) every sample then costs a re-adaptation (issue 12 item 15). `--profile PATH` runs the agent
under cProfile and writes its stats there (read with `python -m pstats PATH`).
`--paho-echo` runs the same load against benchmarks/paho_echo.py (paho-mqtt with the agent's MQTT
pattern but no work at all): the ceiling that paho itself sets on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "edge"))

from tests.support.mosquitto import free_port, find_mosquitto  # noqa: E402

PREFIX = "bench/line/agent"
TARGETS = {"max_rate_sps": 10_000, "p99_ms_at_1000": 10.0, "rss_mib": 80.0, "online_s": 1.0}


class Probe:
    """Two MQTT clients (publisher, subscriber) so that receiving never waits behind publishing."""

    def __init__(self, port: int):
        import paho.mqtt.client as mqtt

        self.sent: dict[str, float] = {}
        self.recv: dict[str, float] = {}
        self.online_at: float | None = None
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.expect = 0
        self.sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-sub", protocol=mqtt.MQTTv5)
        self.sub.on_message = self._on_message
        ready = threading.Event()
        self.sub.on_subscribe = lambda *a: ready.set()
        self.sub.connect("127.0.0.1", port)
        self.sub.subscribe([(f"{PREFIX}/predictions", 1), (f"{PREFIX}/status", 1)])
        self.sub.loop_start()
        ready.wait(10)
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
        self.pub.max_inflight_messages_set(0)  # no client-side cap: measure the agent, not paho's window
        self.pub.max_queued_messages_set(0)
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()

    def _on_message(self, client, userdata, msg):
        t = time.monotonic()
        if msg.topic.endswith("/status"):
            if b'"online"' in msg.payload and self.online_at is None:
                self.online_at = t
            return
        sid = json.loads(msg.payload)["id"]
        with self._lock:
            self.recv.setdefault(sid, t)
            if len(self.recv) >= self.expect:
                self.done.set()

    def run(self, tag: str, n: int, rate: float, features: list[list[float]], timeout: float = 120.0,
            labels: str = "none") -> dict:
        ids = [f"{tag}-{i}" for i in range(n)]
        with self._lock:
            self.expect = len(self.recv) + n
            self.done.clear()

        def label(i):  # a label that depends on the features, so the adapted state keeps moving
            return round(float(np.sum(features[i % len(features)])) * 0.5 + (i % 7) * 0.01, 4)

        payloads = [json.dumps({"id": sid, "features": features[i % len(features)],
                                **({"label": label(i)} if labels == "inline" else {})}) for i, sid in enumerate(ids)]
        label_payloads = ([json.dumps({"id": sid, "label": label(i)}) for i, sid in enumerate(ids)]
                          if labels == "topic" else None)
        topic, label_topic = f"{PREFIX}/samples", f"{PREFIX}/labels"
        t0 = time.monotonic()
        for i, (sid, p) in enumerate(zip(ids, payloads)):
            if rate:
                due = t0 + i / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            self.sent[sid] = time.monotonic()
            self.pub.publish(topic, p, qos=1)
            if label_payloads:
                self.pub.publish(label_topic, label_payloads[i], qos=1)
        t_pub = time.monotonic()
        self.done.wait(timeout)
        got = [sid for sid in ids if sid in self.recv]
        lat = np.array([self.recv[s] - self.sent[s] for s in got]) * 1e3
        t_last = max(self.recv[s] for s in got) if got else t_pub
        return {
            "phase": tag, "target_rate": rate or "max", "samples": n, "labels": labels, "predicted": len(got),
            "publish_rate_sps": round(n / max(t_pub - t0, 1e-9), 1),
            "throughput_sps": round(len(got) / max(t_last - t0, 1e-9), 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 3) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 3) if len(lat) else None,
            "max_ms": round(float(lat.max()), 3) if len(lat) else None,
        }

    def close(self):
        for c in (self.pub, self.sub):
            c.disconnect()
            c.loop_stop()


def _cpu(pid: int) -> list[float]:
    """CPU seconds (user+system) per thread of a process, busiest first."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out.append((int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError):
            continue
    return sorted(out, reverse=True)


def _rss(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = round(int(line.split()[1]) / 1024, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds for the 100/s and 1,000/s phases")
    ap.add_argument("--max-samples", type=int, default=20000)
    ap.add_argument("--bundle", default=None, help="a signed bundle (default: a linear test bundle, signed here)")
    ap.add_argument("--public-key", default=None, help="the key that --bundle is signed with")
    ap.add_argument("--queue-size", type=int, default=1000, help="agent limits.queue_size (default as shipped)")
    ap.add_argument("--paho-echo", action="store_true",
                    help="baseline: replace the agent by benchmarks/paho_echo.py (paho alone, no work)")
    ap.add_argument("--json", default=None, help="also write the JSON result here")
    ap.add_argument("--broker-inflight", type=int, default=0,
                    help="mosquitto max_inflight_messages (0: unlimited; deploy/mosquitto ships 100)")
    ap.add_argument("--agent-log", default=None, help="keep the agent's log (level info) at this path")
    ap.add_argument("--labels", choices=["none", "inline", "topic"], default="none",
                    help="a label with every sample: inside it, or as its own message on the labels topic")
    ap.add_argument("--profile", default=None, help="run the agent under cProfile, stats to this path")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="agent-bench-"))
    broker = agent = probe = None
    try:
        # Signed, as on a line: the agent checks the bundle's Ed25519 signature at start.
        if args.bundle:
            if not args.public_key:
                ap.error("--bundle needs --public-key: the agent runs with signature checks, as on a line")
            bundle, public_key = Path(args.bundle), args.public_key
        else:
            from export.signing import generate_keypair, sign_manifest
            from linear_bundle import make_linear_bundle

            bundle = make_linear_bundle(work / "bundle")
            private_key, public_key = generate_keypair(work / "keys")
            sign_manifest(bundle, private_key)
        manifest = json.loads((bundle / "manifest.json").read_text())
        rng = np.random.default_rng(0)
        shape = manifest["input_shape"]
        features = [rng.normal(size=shape).astype(np.float32).tolist() for _ in range(64)]

        port = free_port()
        (work / "mosquitto.conf").write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
            f"max_inflight_messages {args.broker_inflight}\npersistence false\nlog_dest none\n")
        broker = subprocess.Popen([find_mosquitto(), "-c", str(work / "mosquitto.conf")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        (work / "agent.yaml").write_text(json.dumps({
            "topic_prefix": PREFIX, "state_dir": str(work / "state"),
            "log_level": "debug" if args.agent_log else "warning",
            "bundle": {"dir": str(bundle), "public_key": str(public_key)},
            "broker": {"host": "127.0.0.1", "port": port},
            "limits": {"queue_size": args.queue_size},
        }))
        probe = Probe(port)
        t_spawn = time.monotonic()
        cmd = [sys.executable, "-m", "edge_agent", "run", "--config", str(work / "agent.yaml")]
        if args.profile:
            cmd[1:1] = ["-m", "cProfile", "-o", str(Path(args.profile).resolve())]
        if args.paho_echo:
            cmd = [sys.executable, str(Path(__file__).with_name("paho_echo.py")), str(port), PREFIX]
        agent = subprocess.Popen(cmd, cwd=str(REPO), stdout=open(work / "agent.log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while probe.online_at is None and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.005)
        if probe.online_at is None:
            print((work / "agent.log").read_text(), file=sys.stderr)
            return 1
        online_s = probe.online_at - t_spawn
        rss_online = _rss(agent.pid).get("VmRSS")
        probe.run("warmup", 200, 0, features, labels=args.labels)
        phases = [
            probe.run("r100", int(100 * args.duration), 100, features, labels=args.labels),
            probe.run("r1000", int(1000 * args.duration), 1000, features, labels=args.labels),
        ]
        phases[0]["rss_mib_after"] = _rss(agent.pid).get("VmRSS")
        phases[1]["rss_mib_after"] = _rss(agent.pid).get("VmRSS")
        cpu0 = {"agent": _cpu(agent.pid), "mosquitto": _cpu(broker.pid), "bench": _cpu(os.getpid())}
        phases.append(probe.run("max", args.max_samples, 0, features, labels=args.labels))
        cpu1 = {"agent": _cpu(agent.pid), "mosquitto": _cpu(broker.pid), "bench": _cpu(os.getpid())}
        # Where the max-rate phase spent CPU (the 2 shared cores are the limit on a small box)
        phases[-1]["cpu_s"] = {k: round(sum(cpu1[k]) - sum(cpu0[k]), 2) for k in cpu1}
        phases[-1]["agent_threads_cpu_s"] = [round(b - a, 2) for a, b in zip(cpu0["agent"], cpu1["agent"])][:4]
        rss = _rss(agent.pid)
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(30)
        phases[-1]["rss_mib_after"] = rss.get("VmRSS")
        result = {"labels": args.labels, "online_s": round(online_s, 3), "rss_mib_online": rss_online, "rss_mib": rss.get("VmRSS"), "peak_rss_mib": rss.get("VmHWM"),
                  "phases": phases, "sigterm_exit_code": rc, "cpus": os.cpu_count(),
                  "load_avg_1m": round(os.getloadavg()[0], 2)}
        p1000 = phases[1]["p99_ms"]
        result["targets"] = {
            "max_rate_sps >= 10000": phases[2]["throughput_sps"] >= TARGETS["max_rate_sps"],
            "p99 at 1000/s < 10 ms": p1000 is not None and p1000 < TARGETS["p99_ms_at_1000"],
            "peak RSS < 80 MiB": (rss.get("VmHWM") or 1e9) < TARGETS["rss_mib"],
            "online < 1 s": online_s < TARGETS["online_s"],
        }
    finally:
        if probe:
            probe.close()
        for p in (agent, broker):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        if args.agent_log and (work / "agent.log").exists():
            shutil.copyfile(work / "agent.log", args.agent_log)
        shutil.rmtree(work, ignore_errors=True)

    print(f"{'phase':>8} {'target':>7} {'n':>6} {'pred':>6} {'pub/s':>8} {'thru/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    for p in phases:
        print(f"{p['phase']:>8} {str(p['target_rate']):>7} {p['samples']:6d} {p['predicted']:6d} "
              f"{p['publish_rate_sps']:8.0f} {p['throughput_sps']:8.0f} {p['p50_ms']:7.2f} {p['p99_ms']:7.2f} "
              f"{p['max_ms']:7.2f}")
    print(f"max-rate phase CPU seconds: {phases[-1]['cpu_s']} (agent threads {phases[-1]['agent_threads_cpu_s']})")
    print(f"RSS MiB: online {result['rss_mib_online']}, after " +
          ", ".join(f"{p['phase']} {p['rss_mib_after']}" for p in phases))
    print(f"labels: {args.labels}")
    print(f"online in {result['online_s']:.3f} s; RSS {result['rss_mib']} MiB (peak {result['peak_rss_mib']} MiB); "
          f"SIGTERM exit {result['sigterm_exit_code']}")
    for k, ok in result["targets"].items():
        print(f"  {'PASS' if ok else 'MISS'}  {k}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
