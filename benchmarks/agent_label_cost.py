"""What a label costs the agent's worker, against the bundle's adapt graph call (issue 12 item 15).

    .venv/bin/python benchmarks/agent_label_cost.py [--bundle DIR --public-key K] [--n 4000] [--repeats 3]

In process, without MQTT (the transport is a stub that confirms every publish at once), so that the
number is the worker's own CPU: parse, predict, join, adapt, journal (with its fsync per batch of
256). Three streams of --n samples through the real `Agent` and the real onnxruntime sessions:
no labels, a label inside every sample, a label message after every sample; adaptation.adapt_every 1.
The adapt graph call is timed where the agent makes it (the session wrapped, caches as they are in
the worker), and alone in a tight loop. Reported: CPU ms per sample of each stream, the extra per
label, and that extra in units of the in-agent graph call (target <= 2): each repeat's ratio from its
own three streams (a shared machine's load hits them alike), the median over --repeats. Without --bundle a linear test bundle (tests/edge/linear_bundle.py) is made.
"""

from __future__ import annotations

import argparse
import collections
import json
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

from edge_agent.agent import Agent  # noqa: E402
from edge_agent.config import config_from_dict  # noqa: E402
from edge_agent.model import Model, load_manifest  # noqa: E402

PREFIX = "bench/line/agent"


class ConfirmingTransport:
    def __init__(self, cfg, deliver, online, offline, obs):
        self.published = collections.deque()
        self.connected = threading.Event()
        self.connected.set()
        self._mid = 0

    def publish(self, topic, payload, qos=1, retain=False, resent=False):
        self._mid += 1
        self.published.append((self._mid, True))
        return self._mid

    def ack(self, mid, qos, gen):
        pass

    def stop(self):
        pass


class TimedSession:
    """The adapt session, timing each graph call as the agent makes it (thread CPU time, like the
    streams: a shared machine's preemptions would count as graph time in wall-clock time)."""

    def __init__(self, sess):
        self.sess, self.t, self.n = sess, 0.0, 0

    def run(self, *a):  # the same call the agent makes (Model._adapt_run)
        t = time.thread_time()
        r = self.sess.run(*a)
        self.t += time.thread_time() - t
        self.n += 1
        return r

    def __getattr__(self, k):
        return getattr(self.sess, k)


def stream(model: Model, bundle: str, key: str | None, labels: str, n: int, feats: list) -> float:
    """CPU ms per sample of the worker for n samples."""
    with tempfile.TemporaryDirectory() as d:
        cfg = config_from_dict({"topic_prefix": PREFIX, "state_dir": d, "adaptation": {"adapt_every": 1},
                                "bundle": {"dir": bundle, "public_key": key, "allow_unsigned": key is None}})
        agent = Agent(cfg, model, transport_cls=ConfirmingTransport)
        agent._restore()
        msgs = []
        for i in range(n):
            x = feats[i % len(feats)]
            y = round(float(np.sum(x)) * 0.01 + (i % 7) * 0.01, 4)
            o = {"id": f"s{i}", "features": x, **({"label": y} if labels == "inline" else {})}
            msgs.append((f"{PREFIX}/samples", json.dumps(o).encode()))
            if labels == "topic":
                msgs.append((f"{PREFIX}/labels", json.dumps({"id": f"s{i}", "label": y}).encode()))
        t = time.process_time()
        for j in range(0, len(msgs), 256):
            for k, (topic, payload) in enumerate(msgs[j:j + 256]):
                agent._on_message(topic, payload, j + k + 1, 1, 1)
            agent._process(agent._take(0))
        dt = time.process_time() - t
        agent.store.close()
    return dt / n * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--public-key", default=None)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    if args.bundle:
        bundle, key = args.bundle, args.public_key
    else:
        from linear_bundle import make_linear_bundle

        bundle, key = str(make_linear_bundle(Path(tmp.name) / "bundle")), None
    model = Model(bundle, load_manifest(bundle, key, key is None))
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=model.input_shape).astype(np.float32).tolist() for _ in range(64)]

    xs = np.asarray(feats[:10], np.float32)
    ys = np.linspace(0, 1, 10).astype(np.float32 if model.task_kind == "regression" else np.int64)
    if model.task_kind == "classification":
        ys = (np.arange(10) % len(model.class_names)).astype(np.int64)
    feeds = {"support_x": xs, "support_y": ys, "support_w": np.ones(10, np.float32)}
    for _ in range(200):
        model._adapt.run([model._adapt_out], feeds)
    t = time.process_time()
    for _ in range(3000):
        model._adapt.run([model._adapt_out], feeds)
    graph_alone = (time.process_time() - t) / 3000 * 1e3

    stream(model, bundle, key, "none", 300, feats)  # warm-up
    if hasattr(model, "_adapt_run"):  # the call the agent makes
        timed = TimedSession(getattr(model._adapt_run, "__self__", model._adapt))
        model._adapt_run = timed.run
    else:  # an older agent (before/after comparisons): it calls the session's public run
        timed = model._adapt = TimedSession(model._adapt)
    runs = []
    for _ in range(args.repeats):  # each repeat's ratio from its own three streams: the load they share cancels
        r = {}
        for mode in ("none", "inline", "topic"):
            timed.t, timed.n = 0.0, 0
            r[mode] = stream(model, bundle, key, mode, args.n, feats)
            if timed.n:
                r[f"graph_{mode}"] = timed.t / timed.n * 1e3
        r["graph"] = (r["graph_inline"] + r["graph_topic"]) / 2
        runs.append(r)

    def med(f):
        return float(np.median([f(r) for r in runs]))

    res = {
        "bundle": Path(bundle).name, "state_size": model.state_size, "n": args.n, "repeats": args.repeats,
        "adapt_graph_ms_in_agent": round(med(lambda r: r["graph"]), 4), "adapt_graph_ms_alone": round(graph_alone, 4),
        "cpu_ms_per_sample": {k: round(med(lambda r: r[k]), 4) for k in ("none", "inline", "topic")},
        "extra_ms_per_label": {k: round(med(lambda r: r[k] - r["none"]), 4) for k in ("inline", "topic")},
        "extra_per_label_in_graph_calls": {k: round(med(lambda r: (r[k] - r["none"]) / r["graph"]), 2)
                                           for k in ("inline", "topic")},
        "per_repeat_inline_ratio": [round((r["inline"] - r["none"]) / r["graph"], 2) for r in runs],
    }
    for k, v in res.items():
        print(f"{k:<34}{v}")
    print(json.dumps(res))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
