"""Everything the agent must not forget, and how it survives SIGKILL and power loss.

The state is event-sourced: the worker turns each message into small records ("s" sample accepted,
"l" label joined, "a" adapted, "c" context switched, "k" prediction acknowledged), applies them to the
in-memory `AgentState`, and appends them to a journal as one JSON line per batch with one fsync
(group commit: one fsync per message would cap us at a few thousand messages a second). Only after that fsync are the
predictions published and the incoming messages acknowledged to the broker. Start-up and every
`compact_records` records, the whole state is written as one snapshot (temp file, fsync, rename,
fsync dir) and the old journal files are deleted. Replay uses the same `apply` as live operation.

Only JSON is written (never pickle): a state directory can be inspected with `jq` (float32 vectors
are base64 strings of their little-endian bytes: `np.frombuffer(base64.b64decode(s), "<f4")`).
"""

from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import itertools
import json
import logging
import os
import time
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np

from .contexts import ContextState, Contexts  # noqa: F401 - ContextState: re-exported for callers
from .early_labels import EarlyLabels
from .errors import StateError

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot.jsonl"  # a header line, then the long lists in chunks of SNAPSHOT_CHUNK items
LEGACY_SNAPSHOT = "snapshot.json"  # one JSON document (agents before 0.2); read once, then replaced
SNAPSHOT_CHUNK = 1000
FORMAT = 3  # 3: float32 vectors as base64; 2: recent and pending ids as id_key() digests (1: id strings). All read.
DEFAULT_CONTEXT = "default"


@functools.lru_cache(maxsize=256)  # a sample's id is keyed again by its label, usually soon after
def id_key(sid: str | int) -> int:
    """A sample id as a 60-bit BLAKE2b digest: what the dedupe record and the pending samples are keyed by.

    An int of this size is a 32-byte object; the id string it replaces is ~60 bytes plus a second
    dict node. Two distinct ids inside a 20,000-id window collide with probability ~n^2/2^61 (2e-10).
    Integer ids are type-tagged (a 0xff byte, which no UTF-8 string contains): 12 and "12" are two ids.
    """
    b = b"\xff" + str(sid).encode() if type(sid) is int else sid.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little") >> 4


class RecentIds:
    """The last `limit` sample ids seen (oldest forgotten first), each with a packed int: bit 0 labelled
    yet; then (sample_ids.py) the 30-bit fingerprint of the sample's content and the wall-clock time it
    was accepted. One int per id (an older snapshot's booleans read as "labelled, content unknown")."""

    def __init__(self, limit: int):
        self.limit = limit
        self._info: dict[int, int] = {}  # id_key -> packed
        self._order: deque[int] = deque()  # id_keys in order of first sight

    def __len__(self) -> int:
        return len(self._info)

    def __contains__(self, key: int) -> bool:
        return key in self._info

    def get(self, key: int) -> int | None:
        return self._info.get(key)

    def labelled(self, key: int) -> bool:
        return bool(self._info.get(key, 0) & 1)

    def remember(self, key: int, packed: int) -> None:
        """A sample accepted (a re-used id keeps its place in the order: it is forgotten a little early)."""
        if key not in self._info:
            self._order.append(key)
        self._info[key] = int(packed)
        self._trim()

    def mark_labelled(self, key: int) -> None:
        known = self._info.get(key)
        if known is None:
            self._order.append(key)
        self._info[key] = (known or 0) | 1
        self._trim()

    def _trim(self) -> None:
        while len(self._info) > self.limit:
            self._info.pop(self._order.popleft(), None)

    def items(self):
        """(id_key, packed) oldest first."""
        return ((k, self._info[k]) for k in self._order)


class AgentState:
    def __init__(self, k: int, recent_limit: int, pending_limit: int, max_contexts: int = 1000,
                 early_labels: int = 1000, early_label_ttl_s: float = 60.0):
        self.k = k
        self.recent_limit = recent_limit
        self.pending_limit = pending_limit
        self.contexts = Contexts(max_contexts)  # LRU-bounded (contexts.py)
        self.current = DEFAULT_CONTEXT
        self.model_version: str | None = None
        self.recent = RecentIds(recent_limit)  # read through seen() / labelled()
        self._key = int  # how a snapshot being read spells ids (load_header)
        # id_key -> (context, x as raw float32 bytes): a few small objects per sample instead of two
        # ndarrays and the id string (~4.5 -> ~2 MiB at the default 10,000). Read through unlabelled().
        self.pending: OrderedDict[int, tuple[str, bytes]] = OrderedDict()
        self.outbox: OrderedDict[str, str] = OrderedDict()  # sample id -> prediction payload (JSON text)
        self.early = EarlyLabels(early_labels, early_label_ttl_s)  # labels waiting for their sample

    def context(self, name: str) -> ContextState:
        """The context, created if new; counts as its use (least recently used ones are evicted)."""
        c = self.contexts.use(name)
        if c is None:
            c = self.contexts.create(name, self.k, self.current)
        return c

    # -- the only mutators: live operation and journal replay both go through here --------------
    def apply(self, r: dict) -> None:
        t = r["t"]
        if t == "s":
            key = id_key(r["id"])
            self.recent.remember(key, r.get("f", 0) << 1)
            if "x" in r:
                self.pending[key] = (r["c"], _f32_bytes(r["x"]))
                while len(self.pending) > self.pending_limit:
                    self.pending.popitem(last=False)
            self.outbox[r["id"]] = r["o"]
            self.contexts.use(r["c"])
        elif t == "l":
            key = id_key(r["id"])
            self.pending.pop(key, None)
            if self.early:
                self.early.take(key)
            self.recent.mark_labelled(key)
            c = self.context(r["c"])
            x = r["x"]
            c.support.append((r["id"], x if isinstance(x, np.ndarray) else _f32(x), r["y"]))
            c.since_adapt += 1
            c.n_labels += 1
        elif t == "a":
            c = self.context(r["c"])
            s = r["s"]
            c.replay_support = None
            if type(s) is Derived:
                c.state = s.value
            elif s is None:  # journaled without it: re-derived from this support set before serving
                c.state, c.replay_support = None, list(c.support)
            else:
                c.state = s if isinstance(s, np.ndarray) else _f32(s).copy()
            c.adapted_on = r["n"]
            c.since_adapt = 0
        elif t == "c":
            self.context(r["c"])
            self.current = r["c"]
        elif t == "k":
            self.outbox.pop(r["id"], None)
        elif t == "d":  # the id was re-used by another sample: a later label cannot tell which part it is for
            self.pending.pop(id_key(r["id"]), None)
        elif t == "e":
            self.early.hold(id_key(r["id"]), r["id"], r["y"], r["w"])
        elif t == "E":
            self.early.take(id_key(r["id"]))
        else:
            raise ValueError(f"unknown state record type {t!r}")

    def seen(self, sid: str) -> bool:
        """Whether a sample with this id was accepted recently (within limits.recent_ids)."""
        return id_key(sid) in self.recent

    def labelled(self, sid: str) -> bool:
        return self.recent.labelled(id_key(sid))

    def unlabelled(self, sid: str) -> tuple[str, np.ndarray] | None:
        """(context, features) of a pending sample, or None."""
        p = self.pending.get(id_key(sid))
        return None if p is None else (p[0], np.frombuffer(p[1], np.float32))

    def set_limits(self, recent_limit: int, pending_limit: int, max_contexts: int, early_labels: int,
                   early_label_ttl_s: float) -> None:
        """New bounds (config reload); the oldest ids and early labels beyond them go at the next
        insertion (early labels past their time at the next batch), contexts now."""
        self.recent_limit = self.recent.limit = recent_limit
        self.pending_limit = pending_limit
        self.early.limit, self.early.ttl_s = early_labels, early_label_ttl_s
        self.contexts.limit = max_contexts
        self.contexts.evict(self.current)

    # -- snapshot ------------------------------------------------------------------------------
    # -- snapshot ------------------------------------------------------------------------------
    # Written and read a chunk at a time: built whole, a snapshot of full caches (20,000 ids, 10,000
    # pending samples) was a ~11 MiB transient on the heap at every compaction and at every start.
    def header(self) -> dict:
        return {
            "format": FORMAT,
            "model_version": self.model_version,
            "current": self.current,
            "contexts": {
                name: {
                    "support": [[sid, _b64(x), y] for sid, x, y in c.support],
                    "state": None if c.state is None else _b64(c.state),
                    "adapted_on": c.adapted_on,
                    "since_adapt": c.since_adapt,
                    "n_labels": c.n_labels,
                }
                for name, c in self.contexts.items()
            },
        }

    def sections(self):
        """("recent" | "pending" | "outbox", list of at most SNAPSHOT_CHUNK entries), oldest first."""
        yield from _chunks("recent", ([key, lab] for key, lab in self.recent.items()))
        yield from _chunks("pending", ([key, ctx, base64.b64encode(x).decode("ascii")]
                                       for key, (ctx, x) in self.pending.items()))
        yield from _chunks("outbox", ([sid, p] for sid, p in self.outbox.items()))
        yield from _chunks("early", self.early.items())

    def to_json(self) -> dict:
        """The whole state as one dict (tests, inspection); the snapshot file holds the same in lines."""
        d = {**self.header(), "recent": [], "pending": [], "outbox": [], "early": []}
        for name, items in self.sections():
            d[name].extend(items)
        return d

    def load_header(self, d: dict) -> None:
        fmt = d.get("format")
        if fmt not in (1, 2, FORMAT):
            raise StateError(f"snapshot format {fmt!r} is not {FORMAT}")
        self._key = id_key if fmt == 1 else int  # format 1 stored the id strings themselves
        self.model_version = d.get("model_version")
        self.current = d["current"]
        for name, c in d["contexts"].items():
            cs = self.context(name)
            # A smaller K in the new config keeps the newest samples (deque maxlen drops the oldest).
            cs.support.extend((sid, _f32(x), y) for sid, x, y in c["support"])
            cs.state = None if c["state"] is None else _f32(c["state"]).copy()
            cs.adapted_on, cs.since_adapt, cs.n_labels = c["adapted_on"], c["since_adapt"], c["n_labels"]

    def load_section(self, name: str, items: list) -> None:
        key = self._key
        if name == "recent":
            for sid, lab in items:
                self.recent.remember(key(sid), lab)  # lab: packed (format 2: a bool, "labelled")
        elif name == "pending":
            for sid, ctx, x in items:
                self.pending[key(sid)] = (ctx, _f32_bytes(x))
                if len(self.pending) > self.pending_limit:
                    self.pending.popitem(last=False)
        elif name == "outbox":
            self.outbox.update((sid, p) for sid, p in items)
        elif name == "early":
            for sid, y, t in items:
                self.early.hold(id_key(sid), sid, y, t)
        else:
            raise StateError(f"unknown snapshot section {name!r}")

    def load_json(self, d: dict) -> None:
        """A whole-state dict (to_json(), or a legacy snapshot.json's "state")."""
        self.load_header(d)
        for name in ("recent", "pending", "outbox", "early"):
            self.load_section(name, d.get(name, []))


def _chunks(name: str, items):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == SNAPSHOT_CHUNK:
            yield name, chunk
            chunk = []
    if chunk:
        yield name, chunk


# Float32 vectors (features, adapted states) are journaled as base64 of their little-endian bytes:
# exact, and ~40x cheaper to encode than a JSON list of float reprs, which was most of the cost of a
# label (an adapted state of a few hundred floats per adaptation). Lists of numbers (older agents)
# are still read.
def _b64(x: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(x, "<f4").tobytes()).decode("ascii")


def _f32(v) -> np.ndarray:
    if isinstance(v, str):
        return np.frombuffer(base64.b64decode(v), "<f4")
    return np.asarray(v, np.float32)


def _f32_bytes(v) -> bytes:
    return base64.b64decode(v) if isinstance(v, str) else np.asarray(v, "<f4").tobytes()


class Derived:
    """An adapted state in a live "a" record: applied as is, journaled as null. Replay re-derives it from
    the support set (journaled anyway; the graph is deterministic): a state is up to 10^5 floats, which
    every label would otherwise write to the journal and fsync."""

    __slots__ = ("value",)

    def __init__(self, value: np.ndarray):
        self.value = value


def _default(o):
    if type(o) is Derived:
        return None
    if isinstance(o, np.ndarray):
        return _b64(o) if o.dtype == np.float32 else o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot journal {type(o).__name__}")


# One encoder call per batch (the C encoder; numpy values via `default`) is what keeps the journal
# cheap at thousands of messages per second.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_default)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data) -> None:
    """`data` (bytes, or an iterable of bytes written one by one) becomes `path`, whole or not at all."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        if isinstance(data, (bytes, bytearray)):
            f.write(data)
        else:
            f.writelines(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Store:
    """The state directory: snapshot.jsonl + journal-<seq>.jsonl, guarded by an exclusive lock."""

    def __init__(self, state_dir: str, compact_records: int = 50_000):
        self.dir = Path(state_dir)
        self.compact_records = compact_records
        self._journal = None
        self._seq = 0
        self.records_since_compact = 0
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.dir / "lock", "a")
        except OSError as e:
            raise StateError(f"state_dir {self.dir}: {e.strerror}") from e
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StateError(f"state_dir {self.dir} is in use by another edge-agent") from None

    def _journals(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.dir.glob("journal-*.jsonl"):
            try:
                out.append((int(p.stem.split("-", 1)[1]), p))
            except ValueError:
                continue
        return sorted(out)

    def load(self, state: AgentState) -> int:
        """Fill `state` from snapshot + journal; returns the number of journal records replayed."""
        seq = 0
        snap = self.dir / SNAPSHOT
        if not snap.exists() and (self.dir / LEGACY_SNAPSHOT).exists():
            snap = self.dir / LEGACY_SNAPSHOT
        if snap.exists():
            try:
                seq = self._read_snapshot(snap, state)
            except (ValueError, KeyError, TypeError, StateError) as e:
                # The rename makes a half-written snapshot impossible; this is disk corruption or a
                # hand edit. Keep the evidence and carry on fresh rather than leave the line blind.
                aside = snap.with_name(f"{snap.name}.corrupt-{int(time.time())}")
                os.replace(snap, aside)
                log.error("state snapshot unreadable (%s); moved to %s, starting with empty state", e, aside.name)
                state.__init__(state.k, state.recent_limit, state.pending_limit, state.contexts.limit, state.early.limit,
                               state.early.ttl_s)
                seq = 0
        replayed = 0
        for s, path in self._journals():
            if s < seq:
                continue  # already folded into the snapshot; removed at the next compaction
            torn = None  # line number of an unreadable line, reported only if another line follows it
            with open(path, "rb") as f:  # a line at a time: a journal can hold 50,000 records
                for i, line in enumerate(f, 1):
                    if torn is not None:
                        log.error("%s: unreadable batch at line %d skipped", path.name, torn)
                        torn = None
                    if not line.strip():
                        continue
                    try:
                        batch = json.loads(line)
                    except ValueError:
                        # Only the last line can be torn by a crash mid-write; that batch was never
                        # fsynced, so nothing of it was acknowledged and the broker will redeliver it.
                        torn = i
                        continue
                    for r in batch:
                        state.apply(r)
                    replayed += len(batch)
            self._seq = max(self._seq, s)
        self._seq = max(self._seq, seq)
        return replayed

    @staticmethod
    def _read_snapshot(path: Path, state: AgentState) -> int:
        """Fill `state` from a snapshot; returns its journal sequence number."""
        if path.name == LEGACY_SNAPSHOT:
            d = json.loads(path.read_bytes())
            state.load_json(d["state"])
            return int(d["journal_seq"])
        with open(path, "rb") as f:
            head = json.loads(f.readline())
            state.load_header(head["state"])
            for line in f:
                ((name, items),) = json.loads(line).items()
                state.load_section(name, items)
        return int(head["journal_seq"])

    def append(self, records: list[dict], sync: bool = True) -> None:
        """Append records; with `sync` (fsync) they survive a crash when this returns. Without, they
        become durable with the next synced append (or are lost with a crash before it)."""
        if not records:
            return
        try:
            if self._journal is None:
                self._open_journal()
            # One line per batch: a batch is replayed whole or (torn by a crash) not at all.
            self._journal.write(_ENCODER.encode(records).encode() + b"\n")
            self._journal.flush()
            if sync:
                os.fsync(self._journal.fileno())
        except OSError as e:
            # Disk full or gone: carrying on would acknowledge messages whose effect is not durable.
            raise StateError(f"cannot write the journal in {self.dir}: {e.strerror or e}") from e
        self.records_since_compact += len(records)

    def _open_journal(self) -> None:
        path = self.dir / f"journal-{self._seq}.jsonl"
        self._journal = open(path, "ab")
        _fsync_dir(self.dir)

    def compact(self, state: AgentState) -> None:
        """Fold everything into a new snapshot and start an empty journal."""
        next_seq = self._seq + 1
        head = {"journal_seq": next_seq, "written": time.time(), "state": state.header()}
        objects = itertools.chain([head], ({name: items} for name, items in state.sections()))
        lines = (_ENCODER.encode(obj).encode() + b"\n" for obj in objects)
        atomic_write(self.dir / SNAPSHOT, lines)
        (self.dir / LEGACY_SNAPSHOT).unlink(missing_ok=True)
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._seq = next_seq
        for s, path in self._journals():
            if s < next_seq:
                path.unlink(missing_ok=True)
        self.records_since_compact = 0

    @property
    def needs_compaction(self) -> bool:
        return self.records_since_compact >= self.compact_records

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        self._lock.close()
