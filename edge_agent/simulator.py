"""Line simulator: play an unseen task through a running agent and score its predictions.

It publishes the task's samples (and each label `--label-delay` samples later, as an inspection
station would), collects the agent's predictions, and reports the error against the truth as a
function of how many labels the agent had: the agent's own predictions, which model gave them
(`source`) and how often their intervals held (`cover`), against the bare meta-initialisation and the
bundle's population model on the same samples (given `--bundle`) and, given `--scratch-bundle`, a
from-scratch reference computed locally on the same support sets.

`--task-dir DIR` plays every task file in DIR, each in its own context, and prints per window of label
count the mean error over tasks with its 95 % CI against the population model and the adapted
meta-init on the same samples (simulate_many.py; benchmarks/predictions.py runs it at scale).

The truth comes from a task file written on the workstation (docs/protocol.md, "Task file"):
`np.savez(path, x=float32[n, *input_shape], y=[n])`. Torch-free: numpy, paho, onnxruntime only.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from .predictors import of as predictors_of

BINS = [0, 1, 5, 10, 20, 50, 100, 200, 500, 1000]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="agent.yaml to take broker and topic prefix from")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--prefix", help="topic prefix, e.g. factory/line1/press2")
    p.add_argument("--task-file", help="npz with x [n, ...] and y [n]")
    p.add_argument("--task-dir", help="directory of task files: each played in its own context (needs --bundle)")
    p.add_argument("--n", type=int, default=None, help="samples to play (default: all); with --task-dir: tasks")
    p.add_argument("--rate", type=float, default=100.0, help="samples per second (0: as fast as possible)")
    p.add_argument("--label-delay", type=int, default=5, help="a sample's label follows this many samples later")
    p.add_argument("--context", default=None, help="switch the line to this context first")
    p.add_argument("--bundle", default=None, help="bundle dir: meta-init reference computed locally")
    p.add_argument("--scratch-bundle", default=None, help="scratch bundle dir: from-scratch reference")
    p.add_argument("--k", type=int, default=None, help="support size for the scratch reference (default manifest)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the last predictions")
    p.add_argument("--out", default=None, help="directory for report.json and error_vs_labels.png")


class LineClient:
    """The line's side of the protocol over real MQTT: publish samples/labels/context, collect output."""

    def __init__(self, host: str, port: int, prefix: str, client_id: str | None = None,
                 tls_ca: str | None = None, username: str | None = None, password: str | None = None):
        import paho.mqtt.client as mqtt

        self.prefix = prefix
        self.predictions: dict[str, list[dict]] = {}
        self.errors: list[dict] = []
        self.status: list[dict] = []
        self.alarms: list[dict] = []
        self._cv = threading.Condition()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"sim-{uuid.uuid4().hex[:8]}",
                             protocol=mqtt.MQTTv5)
        self.c.max_inflight_messages_set(1000)
        if tls_ca:
            self.c.tls_set(ca_certs=tls_ca)
        if username is not None:
            self.c.username_pw_set(username, password)
        self.c.max_queued_messages_set(0)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self._subscribed = threading.Event()
        self.c.on_subscribe = lambda *a: self._subscribed.set()
        self.c.connect(host, port, 30)
        self.c.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError(f"simulator could not subscribe on {host}:{port}")

    def _on_connect(self, client, userdata, flags, rc, props):
        client.subscribe([(f"{self.prefix}/{t}", 1) for t in ("predictions", "errors", "status", "alarms")])

    def _on_message(self, client, userdata, msg):
        try:
            d = json.loads(msg.payload)
        except ValueError:
            return
        d["_t"] = time.monotonic()
        d["_qos"] = msg.qos
        kind = msg.topic.rsplit("/", 1)[1]
        with self._cv:
            if kind == "predictions":
                self.predictions.setdefault(str(d.get("id")), []).append(d)
            elif kind == "errors":
                self.errors.append(d)
            elif kind == "alarms":
                self.alarms.append(d)
            else:
                self.status.append(d)
            self._cv.notify_all()

    def publish(self, topic: str, obj, qos: int = 1):
        payload = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        return self.c.publish(f"{self.prefix}/{topic}", payload, qos=qos)

    def sample(self, sid: str, x, label=None, **extra):
        d = {"id": sid, "ts": time.time(), "features": np.asarray(x).tolist(), **extra}
        if label is not None:
            d["label"] = label
        return self.publish("samples", d)

    def label(self, sid: str, y):
        return self.publish("labels", {"id": sid, "label": y.item() if hasattr(y, "item") else y})

    def context(self, name: str):
        return self.publish("context", {"context": name})

    def wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.2))
        return True

    def wait_predictions(self, ids, timeout: float) -> bool:
        ids = list(ids)
        return self.wait_for(lambda: all(i in self.predictions for i in ids), timeout)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def play(line: LineClient, x: np.ndarray, y: np.ndarray, run_id: str, rate: float, label_delay: int,
         context: str | None = None) -> list[str]:
    """Publish samples (and delayed labels) paced at `rate`; returns the sample ids in order."""
    if context:
        line.context(context)
    ids = [f"{run_id}-{i}" for i in range(len(x))]
    t0 = time.monotonic()
    for i in range(len(x)):
        line.sample(ids[i], x[i])
        j = i - label_delay
        if j >= 0:
            line.label(ids[j], y[j])
        if rate > 0:
            lag = t0 + (i + 1) / rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
    for j in range(max(0, len(x) - label_delay), len(x)):
        line.label(ids[j], y[j])
    return ids


def _local_model(bundle_dir: str):
    from .model import Model, load_manifest

    return Model(bundle_dir, load_manifest(bundle_dir, None, allow_unsigned=True))


def _loss(out: np.ndarray, y) -> np.ndarray:
    """Squared error (regression output [M]) or 0/1 error (class probabilities [M, C])."""
    out = np.asarray(out)
    if out.ndim == 2:
        return (out.argmax(axis=1) != np.asarray(y)).astype(float)
    return (out.reshape(-1) - np.asarray(y, float)) ** 2


def score(ids, x, y, predictions: dict, label_delay: int, bundle=None, scratch=None, k=None) -> dict:
    """Per-sample errors (squared, or 0/1 for classification) and their means per bin of
    'labels available at prediction time'. Keys say mse; for classification read error rate."""
    n = len(ids)
    labels_before = np.maximum(0, np.arange(n) - label_delay)  # labels published before sample i
    agent = np.full(n, np.nan)
    adapted = np.zeros(n, bool)
    sources = [""] * n
    covered = np.full(n, np.nan)  # did the agent's interval hold the truth (nan: no interval)
    for i, sid in enumerate(ids):
        got = predictions.get(sid)
        if got:
            p = got[0]
            sources[i] = str(p.get("source", ""))
            iv = p.get("interval")
            if iv and None not in iv:
                covered[i] = float(iv[0] <= float(y[i]) <= iv[1])
            if "class_index" in p:
                agent[i] = float(p["class_index"] != int(y[i]))
            elif p.get("prediction") is not None:
                agent[i] = (float(p["prediction"]) - y[i]) ** 2
            adapted[i] = bool(p.get("adapted"))
    meta = scr = pop = None
    if bundle is not None:
        meta = _loss(bundle.predict(bundle.init_state, x), y)
        preds = predictors_of(bundle)
        if preds.has_population:
            pop = _loss(bundle.predict(preds.population_state, x), y)
    if scratch is not None:
        kk = k or scratch.recommended_k
        scr = np.full(n, np.nan)
        for i in range(n):
            m = labels_before[i]
            if m == 0:
                state = scratch.init_state
            else:
                lo = max(0, m - kk)
                state = scratch.adapt(x[lo:m], y[lo:m])
            scr[i] = _loss(scratch.predict(state, x[i:i + 1]), y[i:i + 1])[0]
    rows = []
    edges = BINS + [10 ** 9]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (labels_before >= lo) & (labels_before < hi)
        if not sel.any():
            continue
        rows.append({
            "labels": f"{lo}" if hi == lo + 1 else f"{lo}-{min(hi - 1, int(labels_before.max()))}",
            "n": int(sel.sum()),
            "agent_mse": _nanmean(agent[sel]),
            "adapted_frac": float(adapted[sel].mean()),
            "meta_init_mse": None if meta is None else _nanmean(meta[sel]),
            "population_mse": None if pop is None else _nanmean(pop[sel]),
            "scratch_mse": None if scr is None else _nanmean(scr[sel]),
            "source": _dominant([sources[i] for i in np.flatnonzero(sel)]),
            "interval_coverage": _nanmean(covered[sel]),
        })
    dups = sum(1 for sid in ids if len(predictions.get(sid, [])) > 1)
    return {
        "n_samples": n,
        "n_predicted": int(np.isfinite(agent).sum()),
        "missing": [sid for sid in ids if sid not in predictions][:20],
        "duplicates": dups,
        "mse_agent_meta_init": _nanmean(agent[~adapted]),  # the agent's own predictions before adapting
        "mse_agent_adapted": _nanmean(agent[adapted]),
        "mse_meta_init_reference": None if meta is None else _nanmean(meta[adapted]),
        "mse_scratch_reference": None if scr is None else _nanmean(scr[adapted]),
        # The summary compares like with like: the agent's adapted predictions and the bare meta-init
        # on the very same samples (comparing the agent's early, unadapted samples with its later
        # adapted ones mixed how hard the samples were with what adaptation did).
        "same_samples": {"n": int(adapted.sum()), "agent_adapted": _nanmean(agent[adapted]),
                         "meta_init": None if meta is None else _nanmean(meta[adapted])},
        "bins": rows,
    }


def _dominant(srcs: list[str]) -> str:
    """'adapted 4/population 1': which predictors answered in a window (the agent's `source`)."""
    counts: dict[str, int] = {}
    for v in srcs:
        if v:
            counts[v] = counts.get(v, 0) + 1
    return "/".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def _nanmean(a) -> float | None:
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if a.size else None


def table(report: dict) -> str:
    f = lambda v: "      -" if v is None else f"{v:7.4f}"  # noqa: E731
    cov = lambda v: "      -" if v is None else f"{100 * v:6.1f}%"  # noqa: E731
    lines = [f"{'labels':>10} {'n':>5} {'agent':>7} {'adapted':>7} {'meta':>7} {'pop':>7} {'scratch':>7} "
             f"{'cover':>7}  source"]
    for r in report["bins"]:
        lines.append(f"{r['labels']:>10} {r['n']:5d} {f(r['agent_mse'])} {r['adapted_frac']:7.2f} "
                     f"{f(r['meta_init_mse'])} {f(r.get('population_mse'))} {f(r['scratch_mse'])} "
                     f"{cov(r.get('interval_coverage'))}  {r.get('source', '-')}")
    same = report.get("same_samples") or {}
    lines.append(f"predicted {report['n_predicted']}/{report['n_samples']}, duplicates {report['duplicates']}; "
                 f"on the {same.get('n', 0)} samples the agent predicted adapted: MSE adapted "
                 f"{f(same.get('agent_adapted')).strip()}, bare meta-init {f(same.get('meta_init')).strip()} "
                 "(same samples)")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written (the table and report.json have the same numbers)")
        return False
    rows = report["bins"]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("agent_mse", "agent"), ("meta_init_mse", "meta-init"), ("population_mse", "population"),
                       ("scratch_mse", "scratch")):
        ys = [r.get(key) for r in rows]
        if any(v is not None for v in ys):
            ax.plot(xs, [np.nan if v is None else v for v in ys], marker="o", label=label)
    ax.set_xticks(list(xs), [r["labels"] for r in rows])
    ax.set_xlabel("labelled samples available")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_from_args(args) -> int:
    host, port, prefix = args.host, args.port, args.prefix
    auth = {}
    if args.config:
        from .config import load_config

        cfg = load_config(args.config)
        host, port, prefix = host or cfg.broker.host, port or cfg.broker.port, prefix or cfg.topic_prefix
        # Same broker, same credentials as the agent: for a bench setup. On a real line the simulator
        # would need its own account (the ACLs of deploy/mosquitto give each client its own topics).
        if cfg.broker.tls is not None:
            auth["tls_ca"] = cfg.broker.tls.ca
        if cfg.broker.username is not None:
            pw = cfg.broker.password
            if cfg.broker.password_file:
                pw = Path(cfg.broker.password_file).read_text(encoding="utf-8").rstrip("\r\n")
            auth.update(username=cfg.broker.username, password=pw)
    if not prefix:
        print("simulate: give --prefix or --config", file=sys.stderr)
        return 2
    if bool(args.task_file) == bool(args.task_dir):
        print("simulate: give --task-file or --task-dir", file=sys.stderr)
        return 2
    if args.task_dir:
        return _run_many(args, host, port, prefix, auth)
    data = np.load(args.task_file, allow_pickle=False)
    x, y = data["x"], data["y"]
    if args.n:
        x, y = x[: args.n], y[: args.n]
    line = LineClient(host or "localhost", port or 1883, prefix, **auth)
    try:
        ids = play(line, x, y, f"sim{uuid.uuid4().hex[:6]}", args.rate, args.label_delay, args.context)
        if not line.wait_predictions(ids, args.timeout):
            print(f"timed out: {sum(i in line.predictions for i in ids)}/{len(ids)} predictions", file=sys.stderr)
    finally:
        line.close()
    report = score(ids, x, y, line.predictions, args.label_delay,
                   _local_model(args.bundle) if args.bundle else None,
                   _local_model(args.scratch_bundle) if args.scratch_bundle else None, args.k)
    report["errors"] = line.errors[:20]
    print(table(report))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2))
        if plot(report, out / "error_vs_labels.png"):
            print(f"wrote {out / 'error_vs_labels.png'}")
    return 0 if not report["missing"] else 1


def _run_many(args, host, port, prefix, auth) -> int:
    from . import simulate_many as many

    if not args.bundle:
        print("simulate: --task-dir needs --bundle (the references are computed locally)", file=sys.stderr)
        return 2
    tasks = many.load_tasks(args.task_dir, args.n)
    line = LineClient(host or "localhost", port or 1883, prefix, **auth)
    try:
        ids = many.play_all(line, tasks, f"sim{uuid.uuid4().hex[:6]}", args.label_delay, args.timeout)
    finally:
        line.close()
    model = _local_model(args.bundle)
    k = args.k or model.recommended_k
    scored = [many.score_task(model, x, y, tid, line.predictions, args.label_delay, k)
              for (_, x, y), tid in zip(tasks, ids)]
    rows = many.summarise(scored)
    print(many.markdown(rows, f"{len(tasks)} tasks (support {k}): mean ± 95 % CI over tasks"))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report_many.json").write_text(json.dumps(rows, indent=2))
    missing = sum(int(np.isnan(s["agent"]).sum()) for s in scored)
    return 0 if not missing else 1
