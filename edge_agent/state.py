"""Everything the agent must not forget, and how it survives SIGKILL and power loss.

The state is event-sourced: the worker turns each message into small records ("s" sample accepted,
"l" label joined, "a" adapted, "c" context switched, "k" prediction acknowledged), applies them to the
in-memory `AgentState`, and appends them to a journal as one JSON line per batch with one fsync
(group commit: one fsync per message would cap us at a few thousand messages a second). Only after that fsync are the
predictions published and the incoming messages acknowledged to the broker. Start-up and every
`compact_records` records, the whole state is written as one snapshot (temp file, fsync, rename,
fsync dir) and the old journal files are deleted. Replay uses the same `apply` as live operation.

Only JSON is written (never pickle): a state directory can be inspected with `jq`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import StateError

log = logging.getLogger(__name__)

SNAPSHOT = "snapshot.json"
FORMAT = 1
DEFAULT_CONTEXT = "default"


@dataclass
class ContextState:
    k: int
    support: deque = field(default_factory=deque)  # (sample id, x float32[F], y), newest last
    state: np.ndarray | None = None  # adapted state; None -> meta-initialisation
    adapted_on: int = 0  # support size the current state was adapted on
    since_adapt: int = 0  # labels joined since the last adaptation
    n_labels: int = 0

    def __post_init__(self):
        self.support = deque(self.support, maxlen=self.k)


class AgentState:
    def __init__(self, k: int, recent_limit: int, pending_limit: int):
        self.k = k
        self.recent_limit = recent_limit
        self.pending_limit = pending_limit
        self.contexts: dict[str, ContextState] = {}
        self.current = DEFAULT_CONTEXT
        self.model_version: str | None = None
        self.recent: OrderedDict[str, bool] = OrderedDict()  # sample id -> labelled yet
        self.pending: OrderedDict[str, tuple[str, np.ndarray]] = OrderedDict()  # id -> (context, x)
        self.outbox: OrderedDict[str, str] = OrderedDict()  # sample id -> prediction payload (JSON text)

    def context(self, name: str) -> ContextState:
        c = self.contexts.get(name)
        if c is None:
            c = self.contexts[name] = ContextState(self.k)
        return c

    # -- the only mutators: live operation and journal replay both go through here --------------
    def apply(self, r: dict) -> None:
        t = r["t"]
        if t == "s":
            self._remember(r["id"], False)
            if "x" in r:
                x = r["x"]
                self.pending[r["id"]] = (r["c"], x if isinstance(x, np.ndarray) else np.asarray(x, np.float32))
                while len(self.pending) > self.pending_limit:
                    self.pending.popitem(last=False)
            self.outbox[r["id"]] = r["o"]
        elif t == "l":
            self.pending.pop(r["id"], None)
            self._remember(r["id"], True)
            c = self.context(r["c"])
            x = r["x"]
            c.support.append((r["id"], x if isinstance(x, np.ndarray) else np.asarray(x, np.float32), r["y"]))
            c.since_adapt += 1
            c.n_labels += 1
        elif t == "a":
            c = self.context(r["c"])
            s = r["s"]
            c.state = s if isinstance(s, np.ndarray) else np.asarray(s, np.float32)
            c.adapted_on = r["n"]
            c.since_adapt = 0
        elif t == "c":
            self.current = r["c"]
            self.context(r["c"])
        elif t == "k":
            self.outbox.pop(r["id"], None)
        else:
            raise ValueError(f"unknown state record type {t!r}")

    def _remember(self, sid: str, labelled: bool) -> None:
        self.recent[sid] = labelled
        self.recent.move_to_end(sid)
        while len(self.recent) > self.recent_limit:
            self.recent.popitem(last=False)

    # -- snapshot ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "model_version": self.model_version,
            "current": self.current,
            "contexts": {
                name: {
                    "support": [[sid, x.tolist(), y] for sid, x, y in c.support],
                    "state": None if c.state is None else c.state.tolist(),
                    "adapted_on": c.adapted_on,
                    "since_adapt": c.since_adapt,
                    "n_labels": c.n_labels,
                }
                for name, c in self.contexts.items()
            },
            "recent": [[sid, lab] for sid, lab in self.recent.items()],
            "pending": [[sid, ctx, x.tolist()] for sid, (ctx, x) in self.pending.items()],
            "outbox": [[sid, p] for sid, p in self.outbox.items()],
        }

    def load_json(self, d: dict) -> None:
        if d.get("format") != FORMAT:
            raise StateError(f"snapshot format {d.get('format')!r} is not {FORMAT}")
        self.model_version = d.get("model_version")
        self.current = d["current"]
        for name, c in d["contexts"].items():
            cs = self.context(name)
            # A smaller K in the new config keeps the newest samples (deque maxlen drops the oldest).
            cs.support.extend((sid, np.asarray(x, np.float32), y) for sid, x, y in c["support"])
            cs.state = None if c["state"] is None else np.asarray(c["state"], np.float32)
            cs.adapted_on, cs.since_adapt, cs.n_labels = c["adapted_on"], c["since_adapt"], c["n_labels"]
        for sid, lab in d["recent"]:
            self._remember(sid, lab)
        for sid, ctx, x in d["pending"][-self.pending_limit:]:
            self.pending[sid] = (ctx, np.asarray(x, np.float32))
        self.outbox.update((sid, p) for sid, p in d["outbox"])


def _default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
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


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Store:
    """The state directory: snapshot.json + journal-<seq>.jsonl, guarded by an exclusive lock."""

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
        snap = self.dir / SNAPSHOT
        seq = 0
        if snap.exists():
            try:
                d = json.loads(snap.read_bytes())
                seq = int(d["journal_seq"])
                state.load_json(d["state"])
            except (ValueError, KeyError, TypeError, StateError) as e:
                # The rename makes a half-written snapshot impossible; this is disk corruption or a
                # hand edit. Keep the evidence and carry on fresh rather than leave the line blind.
                aside = snap.with_name(f"{SNAPSHOT}.corrupt-{int(time.time())}")
                os.replace(snap, aside)
                log.error("state snapshot unreadable (%s); moved to %s, starting with empty state", e, aside.name)
                state.__init__(state.k, state.recent_limit, state.pending_limit)
                seq = 0
        replayed = 0
        for s, path in self._journals():
            if s < seq:
                continue  # already folded into the snapshot; removed at the next compaction
            lines = path.read_bytes().split(b"\n")
            for i, line in enumerate(lines):
                if not line:
                    continue
                try:
                    batch = json.loads(line)
                except ValueError:
                    # Only the last line can be torn by a crash mid-write; that batch was never
                    # fsynced, so nothing of it was acknowledged and the broker will redeliver it.
                    if i < len(lines) - 1:
                        log.error("%s: unreadable batch at line %d skipped", path.name, i + 1)
                    continue
                for r in batch:
                    state.apply(r)
                replayed += len(batch)
            self._seq = max(self._seq, s)
        self._seq = max(self._seq, seq)
        return replayed

    def append(self, records: list[dict]) -> None:
        """Durably append records: when this returns, they survive a crash."""
        if not records:
            return
        try:
            if self._journal is None:
                self._open_journal()
            # One line per batch: a batch is replayed whole or (torn by a crash) not at all.
            self._journal.write(_ENCODER.encode(records).encode() + b"\n")
            self._journal.flush()
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
        doc = {"journal_seq": next_seq, "written": time.time(), "state": state.to_json()}
        atomic_write(self.dir / SNAPSHOT, json.dumps(doc, separators=(",", ":")).encode())
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
