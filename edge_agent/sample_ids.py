"""A sample id seen before: a redelivery, the line re-publishing the same part, or a re-used id.

PLC part counters reset (power cycle, new shift, overflow), so an id can come back for a different
part. The agent tells the cases apart by the sample's content: each accepted id is remembered with a
30-bit fingerprint of its features and `ts`, and the wall-clock time (0.1 s) it was accepted (state.py,
RecentIds). For a known id:

- MQTT DUP flag (the broker redelivers what it sent before): dropped silently, as always;
- same content: the line re-published the part (e.g. a broker crash lost our prediction): the kept
  prediction is re-sent, never recomputed;
- other content: a re-used id. What happens is the integrator's choice, `limits.dedupe_window_s`:
  - null (default): ids are unique; the sample is refused (`duplicate_id` on `errors`) and the id's
    unlabelled features are dropped, since a later label could belong to either part (it is then
    reported as `unknown_sample_id`);
  - a number of seconds: an id last accepted at least that long ago is a new part: predicted, its
    label joins it, and `id_reused` is reported on `errors` (information, the sample is not refused);
    within the window it is refused as above.

Integer ids are type-tagged (state.id_key): 12 and "12" are different ids, and each is echoed back
with its own JSON type.
"""

from __future__ import annotations

import hashlib

from .errors import PayloadError
from .protocol import Sample

FP_BITS = 30
_FP_MASK = (1 << FP_BITS) - 1


def content(s: Sample, now: float) -> int:
    """What the "s" record keeps of a sample for later comparison: (0.1 s accepted << 30) | fingerprint.
    The fingerprint is never 0 (0: unknown, written by older agents)."""
    h = hashlib.blake2b(s.x.tobytes(), digest_size=8)
    h.update(repr(s.ts).encode())  # None, a finite number or a short string (protocol.py)
    fp = int.from_bytes(h.digest(), "little") % _FP_MASK + 1
    return (int(now * 10) << FP_BITS) | fp


def check_known(s: Sample, packed: int, dup: bool, window_s: float | None, now: float) -> str:
    """For a sample whose id is known (`packed`: RecentIds.get): "drop" (redelivery), "resend" (same
    part again) or "new" (a re-used id, accepted: report `id_reused`, see reused_report); PayloadError
    ("duplicate_id") when the id is re-used and the policy refuses it."""
    if dup:
        return "drop"
    old = packed >> 1
    old_fp, then = old & _FP_MASK, old >> FP_BITS
    if old_fp == 0 or old_fp == content(s, 0):
        return "resend"
    age = now - then / 10
    if window_s is not None and age >= window_s:
        return "new"
    hint = (f"within limits.dedupe_window_s ({window_s:g} s)" if window_s is not None else
            "ids are unique unless limits.dedupe_window_s is set (PLC counter reset)")
    raise PayloadError("duplicate_id", f"sample id {s.id!r} was used {age:.0f} s ago by a sample with other "
                                       f"features or ts; not predicted, and a later label for this id is not used "
                                       f"({hint})", s.id)


def reused_report(s: Sample, packed: int, now: float) -> PayloadError:
    age = now - (packed >> (1 + FP_BITS)) / 10
    return PayloadError("id_reused", f"sample id {s.id!r} was last used {age:.0f} s ago by another sample; "
                                     "predicted as a new part (limits.dedupe_window_s)", s.id)
