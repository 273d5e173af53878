"""The worker: queue -> parse -> predict / join labels / adapt -> durable commit -> publish -> ack.

Threads: paho's network thread only puts messages on a bounded queue (transport.py). The main
thread runs `Agent.run`, which takes batches off the queue and processes them in arrival order.
A batch's effects are journaled with one fsync (state.py) before any prediction of that batch is
published and before any of its incoming messages is acknowledged; so after a crash either the
broker redelivers (dedupe by sample id makes that harmless) or the outbox re-sends.

Model swaps (bundle commands, rollback, SIGHUP reload, watch_dir) are in lifecycle.py, mixed in.
Per-sample policies live in their own modules, called from here: a known sample id (sample_ids.py),
labels that come before their sample (early_labels.py), the bound on contexts (contexts.py, via state.py).
"""

from __future__ import annotations

import collections
import gc
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import __version__, predictors
from .config import Config
from .errors import BrokerError, PayloadError
from .lifecycle import ModelLifecycle
from .model import Model
from .sdnotify import watchdog_interval
from .observer import Observer, Observers
from .prediction_extras import Extras
from .protocol import Sample, Schema, decode, label_value, parse_context, parse_label, parse_sample, peek_id
from .early_labels import expiry_records, hold_records
from .sample_ids import check_known, content, reused_report
from .state import AgentState, Derived, Store, id_key
from .transport import MqttTransport

log = logging.getLogger(__name__)

TICK_S = 0.5  # longest the worker sleeps: bounds shutdown latency and watchdog ping interval


_jstr = json.encoder.encode_basestring_ascii  # C: a str as a JSON string literal


def _jval(v) -> str:
    """A JSON scalar; non-finite floats become null (strict JSON has no NaN)."""
    t = type(v)
    if t is float:
        return repr(v) if math.isfinite(v) else "null"
    if t is str:
        return _jstr(v)
    if v is None:
        return "null"
    if t is int:
        return str(v)
    return json.dumps(v)


class _Item(NamedTuple):
    kind: str  # "samples" | "labels" | "context" | "commands" | "?"
    payload: bytes | None  # None when oversized (not kept in memory)
    size: int
    mid: int
    qos: int
    gen: int
    t_recv: float
    dup: bool = False  # MQTT DUP flag: the broker redelivers what it had sent us before


@dataclass(slots=True)
class _Pending:
    sample: Sample
    ctx: str
    t_recv: float
    y: float | int | None  # inline label, already validated


class Agent(ModelLifecycle):
    def __init__(self, cfg: Config, model: Model, observer: Observer | None = None, transport_cls=MqttTransport,
                 store: Store | None = None, bundles=None):
        self.cfg = cfg
        self.model = model
        self.bundles = bundles  # edge_agent.bundles.BundleStore; None: no hot reload (unit tests)
        self.obs = observer if observer is not None else Observers()
        self.schema = Schema(model.feature_names, model.input_shape, model.task_kind, model.class_names)
        self.k = min(cfg.adaptation.support_size or model.recommended_k, model.max_support)
        lim = cfg.limits
        self.state = AgentState(self.k, lim.recent_ids, lim.pending_samples, lim.max_contexts, lim.early_labels,
                                lim.early_label_ttl_s)
        self.store = store if store is not None else Store(cfg.state_dir)
        # A deque + Event rather than queue.Queue: half the cost per message, and the bound is ours.
        # Twice the Receive Maximum: room for one reconnect's redeliveries on top of a full queue.
        self.queue: collections.deque[_Item] = collections.deque()
        self._queue_max = 2 * lim.queue_size
        self._wake = threading.Event()
        self._topics = {cfg.topic(t): t for t in ("samples", "labels", "context", "commands")}
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._queue_hwm = 0  # the deepest the queue has been (logged at shutdown)
        self._outbox_hwm = 0  # the most unconfirmed predictions at once (logged at shutdown)
        self._space = threading.Event()  # set by the worker when the queue has room again
        self._worker: int | None = None  # thread id of the worker loop, once running
        self._sent: collections.OrderedDict[str, str] = collections.OrderedDict()  # confirmed predictions
        wd = watchdog_interval()
        # The loop must come round at least twice per watchdog interval (and every TICK_S anyway).
        self._tick_s = min(TICK_S, wd / 2) if wd else TICK_S
        self._status = None
        self._next_watch = 0.0  # when ModelLifecycle next polls bundle.watch_dir
        self._watch_seen: dict[str, str] = {}  # watch_dir entry -> signature seen at the last poll
        self._dropped = 0  # QoS 0 messages dropped on a full queue since the last batch
        self._overflow = 0  # QoS 1 messages queued beyond the bound since the last batch
        self._mids: dict[int, str] = {}  # prediction packet id -> sample id, until PUBACK
        # Committed predictions not yet handed to paho: (sample id, payload, re-sent). paho keeps ~1.5 KiB
        # per unconfirmed message (a Condition per message) until its PUBACK; a burst of 20k would add
        # ~30 MiB that the allocator keeps after the burst. Beyond limits.publish_window they wait here
        # (the payload string is shared with the outbox) and go out as PUBACKs come back.
        self._unsent: collections.deque[tuple[str, str, bool]] = collections.deque()
        self._dirty: set[str] = set()  # contexts with labels not yet adapted on
        self._err_budget = (0.0, 0)
        self.extras = Extras(cfg.predictions, lim.pending_samples)  # intervals (prediction_extras.py)
        self.transport = transport_cls(cfg, self._on_message, self._online_payload, self._offline_payload, self.obs)
        self.transport.on_published = self._on_published

    def _on_published(self) -> None:
        # Network thread, after a PUBACK: wake the worker only if predictions wait for the window.
        if self._unsent:
            self._wake.set()

    # -- network thread ------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes, mid: int, qos: int, gen: int, dup: bool = False) -> None:
        n = len(self.queue)
        if n >= self._queue_hwm:
            self._queue_hwm = n + 1
        if n >= self._queue_max:
            if qos == 0:
                self._dropped += 1  # reported on the errors topic by the worker
                return
            # Never drop QoS 1: unacknowledged, it would sit in the broker's in-flight window until
            # the next reconnect. The broker's flow control (our Receive Maximum) should keep us
            # below the bound, but mosquitto 2.0.11 ignores it: a burst arrives whole. Backpressure
            # instead: this (paho's network) thread waits for room, so paho stops reading the socket,
            # TCP pushes back and the broker keeps the rest (within its max_queued_messages). Never
            # on the thread that drains the queue (unit tests feed it from there).
            self._overflow += 1
            if self._worker is not None and threading.get_ident() != self._worker:
                while len(self.queue) >= self._queue_max and not self._stop.is_set():
                    self._space.clear()
                    if len(self.queue) < self._queue_max:
                        break
                    self._space.wait(0.2)
        size = len(payload)
        self.queue.append(_Item(self._topics.get(topic, "?"),
                                payload if size <= self.cfg.limits.max_payload_bytes else None,
                                size, mid, qos, gen, time.monotonic(), dup))
        # Event.set takes a lock and notifies even when already set (~1 us a message). Skipping it then
        # is safe: the worker clears the event before it re-checks the queue and waits (_take).
        if not self._wake.is_set():
            self._wake.set()

    def _online_payload(self) -> bytes:
        return json.dumps({"status": "online", "model_version": self.model.version, "context": self.state.current,
                           "agent": f"edge-agent {__version__}", "ts": time.time()}).encode()

    def _offline_payload(self) -> bytes:
        return json.dumps({"status": "offline", "model_version": self.model.version}).encode()

    # -- lifecycle -----------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._space.set()

    def request_reload(self) -> None:
        """SIGHUP: re-read the config (and its bundle) from the main loop."""
        self._reload.set()
        self._wake.set()

    def run(self) -> int:
        t0 = time.monotonic()
        self._worker = threading.get_ident()
        self._restore()
        self.transport.start()
        deadline = t0 + self.cfg.broker.connect_timeout
        while not self.transport.connected.wait(0.1):
            if self._stop.is_set() or time.monotonic() > deadline:
                self.transport.stop()
                self.store.close()
                if self._stop.is_set():
                    log.info("stopped before the broker was reached")
                    return 0
                raise BrokerError(f"no connection to {self.cfg.broker.host}:{self.cfg.broker.port} "
                                  f"within {self.cfg.broker.connect_timeout:g}s")
        self._resend_outbox()
        self._report_startup_refusal()
        log.info("online in %.2fs: model %s, context %r, %d context(s), %d pending, %d in outbox",
                 time.monotonic() - t0, self.model.version, self.state.current, len(self.state.contexts),
                 len(self.state.pending), len(self.state.outbox))
        self.obs.on_start(self.model.version)
        self._update_status()
        # The import-time heap (numpy, onnxruntime, paho: ~10^5 objects) never becomes garbage;
        # frozen, it is no longer rescanned by full collections, which otherwise stall the worker
        # for tens of milliseconds (a p99 latency spike) every few tens of thousands of messages.
        gc.freeze()
        try:
            while not self._stop.is_set():
                batch = self._take(self._tick_s)
                if (batch or self.transport.published or self._dropped or self._overflow
                        or self.state.early.due(time.time())):
                    self._process(batch)
                if self._reload.is_set():
                    self._reload.clear()
                    self._reload_config()
                if self.cfg.bundle.watch_dir and time.monotonic() >= self._next_watch:
                    self._poll_watch_dir()
                self._update_status()
                self.obs.on_tick()
        except BaseException:
            # Nothing of the failed batch was acknowledged: the broker redelivers it to the next run.
            log.critical("worker failed; going offline without processing anything further", exc_info=True)
            self.transport.stop()
            self.store.close()
            raise
        self._shutdown()
        return 0

    def _restore(self) -> None:
        n = self.store.load(self.state)
        self._rederive_states()
        if self.state.model_version not in (None, self.model.version):
            # Adapted states belong to the old graph's parameter layout; the support sets do not.
            log.warning("model changed %s -> %s: re-adapting from the stored support sets",
                        self.state.model_version, self.model.version)
            for name, c in self.state.contexts.items():
                c.state, c.adapted_on = None, 0
                if c.support:
                    c.since_adapt = max(c.since_adapt, self.cfg.adaptation.adapt_every)
                    self._dirty.add(name)
        # A crash can leave labels that were below the cadence; keep counting from there.
        self._dirty.update(name for name, c in self.state.contexts.items() if c.since_adapt > 0)
        self._adapt_dirty([])  # applied to the state now, persisted by the compaction below
        self.state.model_version = self.model.version
        self.store.compact(self.state)  # start every run from a snapshot and a fresh journal
        if n:
            log.info("restored state: %d journal records replayed", n)

    def _rederive_states(self) -> None:
        """Adapted states that the journal holds only as "adapted on this support set" (state.Derived)."""
        for name, c in self.state.contexts.items():
            if c.replay_support is None:
                continue
            support, c.replay_support = c.replay_support, None
            if self.state.model_version not in (None, self.model.version):
                continue  # another model: all states are re-adapted below anyway
            try:
                c.state = self.model.adapt(*c.support_arrays(support))
            except Exception as e:  # noqa: BLE001 - serve with the meta-initialisation, re-adapt on new labels
                log.error("re-deriving the adapted state of context %r failed (%s); meta-initialisation", name, e)
                c.state, c.adapted_on = None, 0

    def _resend_outbox(self) -> None:
        # Predictions that were committed but never confirmed by the broker before we went down.
        self._unsent.extend((sid, payload, True) for sid, payload in self.state.outbox.items())
        self._publish_unsent()
        if self.state.outbox:
            log.info("re-sent %d unconfirmed prediction(s) from the outbox", len(self.state.outbox))

    def _shutdown(self) -> None:
        log.info("stopping: finishing queued work")
        self.obs.on_stopping()
        # Finish what was already received; anything arriving from now on stays unacknowledged and
        # is redelivered by the broker on our next connection. Bounded, so that a busy line cannot
        # keep us from stopping.
        left = len(self.queue)
        while left > 0:
            batch = self._take(0, left)
            if not batch:
                break
            left -= len(batch)
            self._process(batch)
        deadline = time.monotonic() + 3.0
        while (self._mids or self._unsent) and self.transport.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
            self._process([])
        self._process([])
        self.store.compact(self.state)
        self.transport.stop()
        self.store.close()
        log.info("stopped cleanly (%d prediction(s) left in the outbox)", len(self.state.outbox))
        log.info("high-water marks: queue %d (limits.queue_size %d), unconfirmed predictions %d",
                 self._queue_hwm, self.cfg.limits.queue_size, self._outbox_hwm)

    # -- worker ----------------------------------------------------------------------------------
    def _output_full(self) -> bool:
        # A full publish window and as many predictions again waiting for it: the broker confirms
        # slower than we predict. Leave the samples in the queue (then, as it fills, in the broker:
        # TCP backpressure on the inbound connection) rather than as predictions in our memory. No
        # deadlock: the PUBACKs we wait for come on the outbound connection (transport.py).
        return len(self._unsent) >= self.cfg.limits.publish_window

    def _take(self, timeout: float, limit: int | None = None) -> list[_Item]:
        q = self.queue
        if timeout and (not q or self._output_full()):
            self._wake.clear()
            # Re-checked after clear(): a wake in between set it again. PUBACKs that arrived before the
            # clear() will not wake us again: handle them now (they may be what frees the window).
            if (not q or self._output_full()) and not self.transport.published:
                self._wake.wait(timeout)
            if self._output_full():
                return []
        n = min(len(q), self.cfg.limits.batch_size, limit or self.cfg.limits.batch_size)
        batch = [q.popleft() for _ in range(n)]
        if n and len(q) < self._queue_max:
            self._space.set()
        return batch

    def _process(self, batch: list[_Item]) -> None:
        # A command (bundle load, rollback) runs between two durable commits: what came before it is
        # committed first (and predicted by the old model), what comes after by the new one.
        for i, it in enumerate(batch):
            if it.kind == "commands":
                if i:
                    self._process_batch(batch[:i])
                self._command(it)
                self._process(batch[i + 1:])
                return
        self._process_batch(batch)

    def _process_batch(self, batch: list[_Item]) -> None:
        records: list[dict] = []
        out: list[tuple[str, str, float, bool, int]] = []  # (sid, payload, t_recv, adapted, n_support)
        errors: list[tuple[str, PayloadError]] = []
        resend: list[str] = []
        group: list[_Pending] = []
        group_ids: set[str] = set()

        def flush():
            if group:
                self._predict(group, records, out)
                group.clear()
                group_ids.clear()

        if self.state.early.due(time.time()):
            self._journal_all(expiry_records(self.state.early, time.time()), records, errors)
        for it in batch:
            try:
                if it.payload is None:
                    raise PayloadError("oversized", f"payload of {it.size} bytes exceeds limits.max_payload_bytes "
                                                    f"({self.cfg.limits.max_payload_bytes})")
                if it.kind == "samples":
                    s = parse_sample(decode(it.payload), self.schema)
                    if s.id in group_ids:
                        flush()  # its first copy is in the state now, to compare with
                    known = self.state.recent.get(id_key(s.id))
                    if known is not None:
                        verdict = self._known_id(s, known, it.dup, records)
                        if verdict != "new":
                            self.obs.on_duplicate()
                            # Not a broker redelivery (DUP flag) but the line publishing the sample again,
                            # e.g. after a broker crash lost our prediction: send the same prediction again.
                            if verdict == "resend" and s.id not in self.state.outbox:
                                p = self._sent.get(s.id)
                                if p is not None:
                                    resend.append(p)
                            continue
                        errors.append((it.kind, reused_report(s, known, time.time())))
                    y = None
                    if s.has_label:
                        try:
                            y = label_value(s.label, self.schema, s.id)
                        except PayloadError as e:  # still predict the sample; only its label is bad
                            errors.append((it.kind, e))
                    elif self.state.early:
                        y = self.state.early.get(id_key(s.id))  # its label came first (early_labels.py)
                    ctx = s.context or self.state.current
                    if group and group[0].ctx != ctx:
                        flush()
                    group.append(_Pending(s, ctx, it.t_recv, y))
                    group_ids.add(s.id)
                    self.obs.on_sample(ctx)
                    if y is not None:
                        flush()  # its label must not reach its own prediction, nor earlier ones
                        self._join(s.id, ctx, s.x, y, records)
                elif it.kind == "labels":
                    flush()
                    lab = parse_label(decode(it.payload), self.schema)
                    p = self.state.unlabelled(lab.id)
                    if p is None:
                        if self.state.labelled(lab.id):
                            continue  # redelivered label, already joined
                        if self.state.seen(lab.id):
                            raise PayloadError("unknown_sample_id", f"sample {lab.id!r} is no longer held "
                                               "(limits.pending_samples)", lab.id)
                        # before its sample: held until it comes (early_labels.py)
                        self._journal_all(hold_records(self.state.early, id_key(lab.id), lab.id, lab.y, time.time()),
                                          records, errors)
                        continue
                    self._join(lab.id, p[0], p[1], lab.y, records)
                elif it.kind == "context":
                    flush()
                    name = parse_context(decode(it.payload))
                    if name != self.state.current:
                        self._record({"t": "c", "c": name}, records)
                        log.info("context -> %r", name)
                        self.obs.on_context(name)
            except PayloadError as e:
                if e.sample_id is None and it.payload is not None:
                    e.sample_id = peek_id(it.payload)
                errors.append((it.kind, e))
            except Exception as e:  # noqa: BLE001 - one odd payload must not become a crash loop
                # (unacknowledged, it would be redelivered to every restart). Parsing happens before
                # any state record, so nothing of this message was applied.
                log.exception("unexpected failure on a %s message; rejected", it.kind)
                errors.append((it.kind, PayloadError("internal_error", f"{type(e).__name__}: {e}",
                                                     peek_id(it.payload) if it.payload else None)))
        flush()
        self._adapt_dirty(records)
        while self.transport.published:
            mid, ok = self.transport.published.popleft()
            sid = self._mids.pop(mid, None)
            if sid is not None:
                if not ok:
                    log.error("broker rejected prediction for %s; dropped from the outbox", sid)
                elif self.cfg.limits.resend_predictions:
                    p = self.state.outbox.get(sid)
                    if p is not None:
                        sent = self._sent
                        sent[sid] = p
                        if len(sent) > self.cfg.limits.resend_predictions:
                            sent.popitem(last=False)
                self._record({"t": "k", "id": sid}, records)
        if self._dropped:
            n, self._dropped = self._dropped, 0
            errors.append(("?", PayloadError("queue_full", f"{n} QoS 0 message(s) dropped: queue full")))
        if self._overflow:
            n, self._overflow = self._overflow, 0
            log.debug("broker sent %d QoS 1 message(s) beyond our Receive Maximum; held back", n)

        # Durable from here on. Only PUBACK records ("k": prediction confirmed) need no fsync of their
        # own: lost in a crash, their predictions are re-sent from the outbox (marked resent; consumers
        # dedupe by id). Otherwise every PUBACK that wakes an idle worker would cost an fsync.
        self.store.append(records, sync=bool(batch) or any(r["t"] != "k" for r in records))
        now = time.monotonic()
        for sid, payload, t_recv, adapted, n_support in out:
            self._unsent.append((sid, payload, False))
            self.obs.on_prediction(now - t_recv, adapted, n_support)
        self._publish_unsent()
        for payload in self.extras.take_alarms():  # after the commit, like the predictions they concern
            self.transport.publish(self.cfg.topic("alarms"), payload, qos=1)
        for payload in resend:
            self.transport.publish(self.cfg.topic("predictions"), payload, qos=1, resent=True)
        for topic_kind, e in errors:
            self._report(topic_kind, e)
        for it in batch:
            self.transport.ack(it.mid, it.qos, it.gen)
        if self.store.needs_compaction:
            self.store.compact(self.state)
        self.obs.on_queue(len(self.queue), len(self.state.outbox))
        if len(self.state.outbox) > self._outbox_hwm:
            self._outbox_hwm = len(self.state.outbox)

    def _publish_unsent(self) -> None:
        """Hand committed predictions to paho, keeping at most limits.publish_window unconfirmed."""
        window, unsent, mids = self.cfg.limits.publish_window, self._unsent, self._mids
        if not unsent or len(mids) >= window:
            return
        topic, publish, outbox = self.cfg.topic("predictions"), self.transport.publish, self.state.outbox
        while unsent and len(mids) < window:
            sid, payload, resent = unsent.popleft()
            if sid in outbox:  # else confirmed meanwhile (a copy paho re-sent itself)
                mids[publish(topic, payload, qos=1, resent=resent)] = sid

    def _known_id(self, s: Sample, known: int, dup: bool, records: list[dict]) -> str:
        try:
            return check_known(s, known, dup, self.cfg.limits.dedupe_window_s, time.time())
        except PayloadError:
            self._record({"t": "d", "id": s.id}, records)  # a later label could be for either part
            raise

    def _journal_all(self, recs_errs: tuple[list[dict], list[PayloadError]], records: list[dict],
                     errors: list) -> None:
        recs, errs = recs_errs
        for r in recs:
            self._record(r, records)
        errors.extend(("labels", e) for e in errs)

    def _record(self, r: dict, records: list[dict]) -> None:
        self.state.apply(r)
        records.append(r)

    def _join(self, sid: str, ctx: str, x: np.ndarray, y, records: list[dict]) -> None:
        self._record({"t": "l", "id": sid, "c": ctx, "x": x, "y": y}, records)
        self.extras.observe(sid, y)  # an honest residual: its prediction was made before this label
        self._dirty.add(ctx)
        self.obs.on_label(ctx)

    def _adapt_dirty(self, records: list[dict]) -> None:
        for ctx in sorted(self._dirty):
            self._maybe_adapt(ctx, records)

    def _maybe_adapt(self, ctx: str, records: list[dict]) -> None:
        if ctx not in self._dirty:
            return
        c = self.state.contexts.get(ctx)
        if c is None:  # evicted since its label (limits.max_contexts)
            self._dirty.discard(ctx)
            return
        pol = self.cfg.adaptation
        if c.n_labels < pol.min_labels or c.since_adapt < pol.adapt_every or not c.support:
            return
        self._dirty.discard(ctx)
        n = len(c.support)
        xs, ys = c.support_arrays(y_dtype=getattr(self.model, "y_dtype", None))  # a test stub has none
        t0 = time.perf_counter()
        try:
            new = self.model.adapt(xs, ys)
        except Exception as e:  # noqa: BLE001 - keep serving with the previous state
            log.error("adaptation failed in context %r (%s); keeping the previous state", ctx, e)
            self._report("labels", PayloadError("adapt_failed", f"adaptation failed: {e}"))
            return
        dt = time.perf_counter() - t0
        self._record({"t": "a", "c": ctx, "s": Derived(new), "n": n}, records)
        log.debug("adapted context %r on %d labelled samples in %.1f ms", ctx, n, dt * 1e3)
        self.obs.on_adapt(dt, n, ctx)

    def _predict(self, group: list[_Pending], records: list[dict], out: list) -> None:
        ctx = group[0].ctx
        self._maybe_adapt(ctx, records)
        c = self.state.contexts.get(ctx)  # a context without labels yet need not exist
        adapted = c is not None and c.state is not None
        n_support = c.adapted_on if adapted else 0
        source, state = predictors.of(self.model).choose(c.state if adapted else None, n_support, self.model.init_state)
        try:
            # A labelled sample is a group of one (its label must not reach its own prediction).
            x = group[0].sample.x[None] if len(group) == 1 else np.array([p.sample.x for p in group])
            y = self.model.predict(state, x)
            y = self.extras.calibrate(self.model, source, n_support, y)  # classification: temperature per K
        except Exception as e:  # noqa: BLE001 - a model failure is reported per sample, not fatal
            log.exception("prediction failed")
            for p in group:
                self._report("samples", PayloadError("model_error", f"prediction failed: {e}", p.sample.id))
            return
        t_done = time.monotonic()
        # Assembled by hand: json.dumps per prediction was the largest single cost at high rates.
        tail = (f',"model_version":{_jstr(self.model.version)},"context":{_jstr(ctx)},'
                f'"adapted":{"true" if adapted else "false"},"n_support":{n_support},"source":"{source}","latency_ms":')
        now = time.time()
        for p, yi in zip(group, y):
            s = p.sample
            payload = (f'{{"id":{_jval(s.id)},"ts":{_jval(s.ts)},{self._format_prediction(yi)}'
                       f'{self.extras.fields(self.model, ctx, s.id, source, n_support, yi)}'
                       f'{tail}{round((t_done - p.t_recv) * 1e3, 3)}}}')
            r = {"t": "s", "id": s.id, "c": ctx, "o": payload, "f": content(s, now)}
            if p.y is None:
                r["x"] = s.x  # kept for a label that may arrive later
            self._record(r, records)
            out.append((s.id, payload, p.t_recv, adapted, n_support))

    def _format_prediction(self, y: np.ndarray) -> str:
        """The prediction fields as a JSON fragment (no braces)."""
        if self.model.task_kind == "regression":
            return f'"prediction":{_jval(float(y))}'
        i = int(np.argmax(y))
        names = self.model.class_names
        probs = {n: float(v) if math.isfinite(v) else None for n, v in zip(names, y)}
        return f'"prediction":{_jstr(names[i])},"class_index":{i},"probabilities":{json.dumps(probs)}'

    def _report(self, topic_kind: str, e: PayloadError) -> None:
        self.obs.on_error(e.reason)
        body = {"reason": e.reason, "message": str(e), "topic": topic_kind, "id": e.sample_id, "ts": time.time()}
        self.transport.publish(self.cfg.topic("errors"), json.dumps(body), qos=1)
        # Rate-limited: a misconfigured producer must not flood the journal with one line per message.
        now = time.monotonic()
        t, n = self._err_budget
        if now - t > 1.0:
            t, n = now, 0
        if n < 10:
            log.warning("%s %s message%s: %s: %s", "reported" if e.reason == "id_reused" else "rejected", topic_kind,
                        f" {e.sample_id}" if e.sample_id is not None else "", e.reason, e)
        elif n == 10:
            log.warning("more rejected messages this second; not logging each")
        self._err_budget = (t, n + 1)

    # -- status --------------------------------------------------------------------------------
    def _update_status(self) -> None:
        if self.transport.connected.is_set():
            text = f"online, model {self.model.version}, {len(self.state.contexts)} contexts"
        else:
            text = "reconnecting"
        if text != self._status:
            self._status = text
            self.obs.on_status(text)
