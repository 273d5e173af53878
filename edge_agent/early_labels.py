"""Labels that arrive before their sample: held, bounded, for a while, and joined when it comes.

`labels` and `samples` are separate topics; a line (or a broker after a reconnect) may deliver a
part's label first. Rejecting it (`unknown_sample_id`) lost the label for good. Held here instead, at
most `limits.early_labels` of them for `limits.early_label_ttl_s` seconds (wall clock: the hold
survives restarts through the journal). When the sample arrives it is predicted first, then joined
with the held label, exactly as if the label had come with it. A label that waited its full time,
or the oldest one pushed out by a full buffer, is reported on `errors` as `unknown_sample_id`.

Only `AgentState.apply` changes this buffer (records "e": held, "E": given up; a join "l" takes it),
so journal replay rebuilds it exactly; the agent decides what to give up and journals it.
"""

from __future__ import annotations

from collections import OrderedDict

from .errors import PayloadError


class EarlyLabels:
    def __init__(self, limit: int, ttl_s: float):
        self.limit = limit
        self.ttl_s = ttl_s
        self._held: OrderedDict[int, tuple[str | int, float | int, float]] = OrderedDict()  # key -> (id, y, t)

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, key: int, sid, y, t: float) -> None:
        if key in self._held:
            return  # a redelivered label: the first copy keeps its place and its time
        self._held[key] = (sid, y, t)
        while len(self._held) > self.limit:  # the agent gives up the oldest first, with a report;
            self._held.popitem(last=False)  # this only guards a journal written under a larger limit

    def take(self, key: int) -> None:
        self._held.pop(key, None)

    def get(self, key: int) -> float | int | None:
        h = self._held.get(key)
        return None if h is None else h[1]

    def __contains__(self, key: int) -> bool:
        return key in self._held

    def full(self) -> bool:
        return len(self._held) >= self.limit

    def oldest(self) -> tuple[str | int, float]:
        """(id, time held since) of the label held longest."""
        sid, _y, t = next(iter(self._held.values()))
        return sid, t

    def due(self, now: float) -> bool:
        """Whether the oldest held label has waited its time (the worker then gives it up)."""
        return bool(self._held) and now - next(iter(self._held.values()))[2] >= self.ttl_s

    def expired(self, now: float) -> list[tuple[str | int, float]]:
        """(id, seconds waited) of every label past its time, oldest first (not removed: see module doc)."""
        out = []
        for sid, _y, t in self._held.values():
            if now - t < self.ttl_s:
                break  # held in arrival order
            out.append((sid, now - t))
        return out

    def items(self):
        """[id, y, time held since], oldest first (the snapshot)."""
        return ([sid, y, t] for sid, y, t in self._held.values())


def hold_records(early: EarlyLabels, key: int, sid, y, now: float) -> tuple[list[dict], list[PayloadError]]:
    """The state records that hold this label (giving up the oldest if the buffer is full), and what to
    report. PayloadError("unknown_sample_id") when holding is off (limits.early_labels: 0)."""
    if early.limit == 0:
        raise PayloadError("unknown_sample_id", f"no recent unlabelled sample with id {sid!r}", sid)
    records, errors = [], []
    if key not in early and early.full():
        old, t = early.oldest()
        records.append({"t": "E", "id": old})
        errors.append(PayloadError("unknown_sample_id", f"label held {now - t:.1f} s for a sample that has not "
                                   f"come; given up: limits.early_labels ({early.limit}) full", old))
    records.append({"t": "e", "id": sid, "y": y, "w": now})
    return records, errors


def expiry_records(early: EarlyLabels, now: float) -> tuple[list[dict], list[PayloadError]]:
    """Records and reports giving up every held label past limits.early_label_ttl_s."""
    records, errors = [], []
    for sid, waited in early.expired(now):
        records.append({"t": "E", "id": sid})
        errors.append(PayloadError("unknown_sample_id", f"label held {waited:.1f} s for a sample that has not come; "
                                   f"given up (limits.early_label_ttl_s: {early.ttl_s:g})", sid))
    return records, errors
