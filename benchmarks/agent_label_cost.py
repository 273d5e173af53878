"""What a label costs the agent's worker, against the bundle's adapt graph call (issue 12 item 15).

    .venv/bin/python benchmarks/agent_label_cost.py [--bundle DIR --public-key K] [--n 4000] [--repeats 3]

In process, without MQTT (the transport is a stub that confirms every publish at once), so that the
number is the worker's own CPU: parse, predict, join, adapt, journal (with its fsync per batch of
256). Three streams of --n samples through the real `Agent` and the real onnxruntime sessions:
no labels, a label inside every sample, a label message after every sample; adaptation.adapt_every 1.

The target (issue 12 item 15): a labelled part costs at most 2 adapt graph calls. A labelled part is
its sample (parse, predict, publish, journal, PUBACK record) plus its label (join, adapt, journal): the
CPU per sample of a labelled stream. The graph call: the bundle's adapt graph alone, in a tight loop,
on a support set of the agent's size K (what every adaptation after the first K labels runs), through
the same onnxruntime entry point the agent calls, 40 calls after each batch of every stream (so that
a shared machine's changing load hits the graph and the streams alike). Reported, each as the median
over --repeats and its range [min, max], every repeat's ratio from its own streams and graph calls:
- labelled_part_in_graph_calls: CPU per sample of the labelled stream / the graph alone (the target);
- extra_per_label_in_graph_calls: (labelled - unlabelled stream) / the graph as timed inside the agent
  (the session wrapped where the agent calls it): what a label adds on top of its sample.
Like `Agent.run`, the import-time heap is frozen (gc.freeze) before the streams.
Without --bundle a linear test bundle (tests/edge/linear_bundle.py) is made.
"""

from __future__ import annotations

import argparse
import collections
import gc
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


def stream(model: Model, bundle: str, key: str | None, labels: str, n: int, feats: list, probe=None) -> float:
    """CPU ms per sample of the worker for n samples; `probe()` (timed on its own) runs after every batch."""
    with tempfile.TemporaryDirectory() as d:
        cfg = config_from_dict({"topic_prefix": PREFIX, "state_dir": d, "adaptation": {"adapt_every": 1},
                                "bundle": {"dir": bundle, "public_key": key, "allow_unsigned": key is None}})
        agent = Agent(cfg, model, transport_cls=ConfirmingTransport)
        agent._restore()
        gc.freeze()  # as Agent.run does once online
        msgs = []
        for i in range(n):
            x = feats[i % len(feats)]
            y = round(float(np.sum(x)) * 0.01 + (i % 7) * 0.01, 4)
            o = {"id": f"s{i}", "features": x, **({"label": y} if labels == "inline" else {})}
            msgs.append((f"{PREFIX}/samples", json.dumps(o).encode()))
            if labels == "topic":
                msgs.append((f"{PREFIX}/labels", json.dumps({"id": f"s{i}", "label": y}).encode()))
        dt = 0.0
        for j in range(0, len(msgs), 256):
            t = time.process_time()
            for k, (topic, payload) in enumerate(msgs[j:j + 256]):
                agent._on_message(topic, payload, j + k + 1, 1, 1)
            agent._process(agent._take(0))
            dt += time.process_time() - t
            if probe is not None:
                probe()
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

    k = min(model.recommended_k, model.max_support)  # the agent's K (adaptation.support_size unset)
    xs = np.asarray([feats[i % len(feats)] for i in range(k)], np.float32).reshape((k,) + model.input_shape)
    ys = np.linspace(0, 1, k).astype(np.float32)
    if model.task_kind == "classification":
        ys = (np.arange(k) % len(model.class_names)).astype(np.int64)
    feeds = {"support_x": xs, "support_y": ys, "support_w": np.ones(k, np.float32)}
    run = getattr(model, "_adapt_run", None)
    if run is None:  # an older agent (before/after comparisons)
        def run(out, feeds, opts, _r=model._adapt.run):
            return _r(out, feeds)

    alone = [0.0, 0]  # CPU seconds, calls

    def graph_alone(calls=40):
        """The adapt graph alone in a tight loop, between the streams' batches: timed at the same
        moments as the streams, so that a shared machine's changing load hits both alike."""
        t = time.process_time()
        for _ in range(calls):
            run([model._adapt_out], feeds, None)
        alone[0] += time.process_time() - t
        alone[1] += calls

    for _ in range(200):
        run([model._adapt_out], feeds, None)

    stream(model, bundle, key, "none", 300, feats)  # warm-up
    if hasattr(model, "_adapt_run"):  # the call the agent makes
        timed = TimedSession(getattr(model._adapt_run, "__self__", model._adapt))
        model._adapt_run = timed.run
    else:  # an older agent (before/after comparisons): it calls the session's public run
        timed = model._adapt = TimedSession(model._adapt)
    runs = []
    for _ in range(args.repeats):  # each repeat's ratio from its own three streams: the load they share cancels
        r = {}
        alone[:] = [0.0, 0]
        for mode in ("none", "inline", "topic"):
            timed.t, timed.n = 0.0, 0
            r[mode] = stream(model, bundle, key, mode, args.n, feats, graph_alone)
            if timed.n:
                r[f"graph_{mode}"] = timed.t / timed.n * 1e3
        r["alone"] = alone[0] / alone[1] * 1e3
        r["graph"] = (r["graph_inline"] + r["graph_topic"]) / 2
        runs.append(r)

    def med(f, nd=4):
        v = [f(r) for r in runs]
        return [round(float(np.median(v)), nd), [round(min(v), nd), round(max(v), nd)]]

    modes = ("inline", "topic")
    res = {
        "bundle": Path(bundle).name, "state_size": model.state_size, "support_k": k, "n": args.n,
        "repeats": args.repeats,
        "adapt_graph_ms_alone": med(lambda r: r["alone"]), "adapt_graph_ms_in_agent": med(lambda r: r["graph"]),
        "cpu_ms_per_sample": {m: med(lambda r: r[m]) for m in ("none",) + modes},
        "labelled_part_in_graph_calls": {m: med(lambda r: r[m] / r["alone"], 2) for m in modes},
        "extra_ms_per_label": {m: med(lambda r: r[m] - r["none"]) for m in modes},
        "extra_per_label_in_graph_calls": {m: med(lambda r: (r[m] - r["none"]) / r["graph"], 2) for m in modes},
    }
    for k, v in res.items():
        print(f"{k:<34}{v}")
    print(json.dumps(res))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
