"""State persistence without a broker: journal replay, torn last line, compaction, the lock, bounds."""

import json

import numpy as np
import pytest

from edge_agent.errors import StateError
from edge_agent.state import FORMAT, LEGACY_SNAPSHOT, SNAPSHOT, SNAPSHOT_CHUNK, AgentState, Store


def _fresh():
    return AgentState(k=3, recent_limit=5, pending_limit=4)


def _records():
    x = np.arange(4, dtype=np.float32)
    return [
        {"t": "c", "c": "A"},
        {"t": "s", "id": "1", "c": "A", "x": x, "o": '{"id":"1"}'},
        {"t": "s", "id": "2", "c": "A", "x": x + 1, "o": '{"id":"2"}'},
        {"t": "l", "id": "1", "c": "A", "x": x, "y": 0.5},
        {"t": "a", "c": "A", "s": np.ones(5, np.float32), "n": 1},
        {"t": "k", "id": "1"},
    ]


def _apply_all(state, records):
    for r in records:
        state.apply(r)


def test_journal_replay_equals_live_state(tmp_path):
    live = _fresh()
    store = Store(tmp_path)
    store.load(live)
    _apply_all(live, _records())
    store.append(_records())
    store.close()  # no compaction: a crash right after the fsync

    restored = _fresh()
    s2 = Store(tmp_path)
    assert s2.load(restored) == 6
    assert restored.to_json() == live.to_json()
    assert restored.current == "A" and list(restored.outbox) == ["2"]
    assert restored.unlabelled("1") is None and restored.unlabelled("2")[0] == "A"
    np.testing.assert_array_equal(restored.unlabelled("2")[1], np.arange(4, dtype=np.float32) + 1)
    assert restored.labelled("1") and restored.seen("2") and not restored.labelled("2") and not restored.seen("3")
    np.testing.assert_array_equal(restored.contexts["A"].state, np.ones(5, np.float32))
    s2.close()


def test_torn_last_line_is_ignored(tmp_path):
    store = Store(tmp_path)
    store.load(_fresh())
    store.append(_records()[:3])
    journal = next(tmp_path.glob("journal-*.jsonl"))
    store.close()
    with open(journal, "ab") as f:
        f.write(b'[{"t":"l","id":"2","c":"A","x":[0,1')  # the crash hit mid-write (never fsynced, never acked)
    st = _fresh()
    s2 = Store(tmp_path)
    assert s2.load(st) == 3
    assert st.unlabelled("2") is not None and st.contexts["A"].n_labels == 0
    s2.close()


def test_compaction_folds_journal_into_snapshot(tmp_path):
    st = _fresh()
    store = Store(tmp_path)
    store.load(st)
    _apply_all(st, _records())
    store.append(_records())
    store.compact(st)
    assert (tmp_path / SNAPSHOT).exists() and not list(tmp_path.glob("journal-*.jsonl"))
    assert not list(tmp_path.glob("*.tmp"))
    store.append([{"t": "c", "c": "B"}])
    st.apply({"t": "c", "c": "B"})
    store.close()
    again = _fresh()
    s2 = Store(tmp_path)
    assert s2.load(again) == 1
    assert again.to_json() == st.to_json()
    for line in (tmp_path / SNAPSHOT).read_text().splitlines():
        json.loads(line)  # plain JSON lines, inspectable
    s2.close()


def test_second_agent_on_same_state_dir_is_refused(tmp_path):
    s1 = Store(tmp_path)
    with pytest.raises(StateError, match="in use"):
        Store(tmp_path)
    s1.close()
    Store(tmp_path).close()


def test_bounds_keep_the_newest(tmp_path):
    st = _fresh()
    for i in range(10):
        st.apply({"t": "s", "id": str(i), "c": "A", "x": np.zeros(2, np.float32), "o": "{}"})
    assert [st.seen(str(i)) for i in range(10)] == [False] * 5 + [True] * 5
    assert [st.unlabelled(str(i)) is not None for i in range(10)] == [False] * 6 + [True] * 4
    for i in range(6, 10):
        st.apply({"t": "l", "id": str(i), "c": "A", "x": np.zeros(2, np.float32), "y": float(i)})
    assert [sid for sid, _, _ in st.contexts["A"].support] == ["7", "8", "9"]  # K = 3


def test_corrupt_snapshot_is_moved_aside(tmp_path):
    (tmp_path / SNAPSHOT).write_text("{broken")
    st = _fresh()
    s = Store(tmp_path)
    s.load(st)
    assert st.contexts == {} and list(tmp_path.glob(f"{SNAPSHOT}.corrupt-*"))
    s.close()


def test_snapshot_of_format_1_is_still_read(tmp_path):
    """Snapshots written before ids were stored as digests (format 1: the id strings) load unchanged."""
    old = {"format": 1, "model_version": "m1", "current": "A",
           "contexts": {"A": {"support": [["1", [0.0, 1.0], 0.5]], "state": None, "adapted_on": 0,
                              "since_adapt": 1, "n_labels": 1}},
           "recent": [["1", True], ["2", False]], "pending": [["2", "A", [2.0, 3.0]]],
           "outbox": [["2", '{"id":"2"}']]}
    (tmp_path / LEGACY_SNAPSHOT).write_text(json.dumps({"journal_seq": 1, "written": 0, "state": old}))
    st = _fresh()
    s = Store(tmp_path)
    s.load(st)
    assert st.labelled("1") and st.seen("2") and not st.labelled("2")
    assert st.unlabelled("2")[0] == "A" and st.unlabelled("2")[1].tolist() == [2.0, 3.0]
    assert list(st.outbox) == ["2"] and st.contexts["A"].n_labels == 1
    s.compact(st)
    assert json.loads((tmp_path / SNAPSHOT).read_text().splitlines()[0])["state"]["format"] == FORMAT
    assert not (tmp_path / LEGACY_SNAPSHOT).exists()
    s.close()
    again = _fresh()
    s = Store(tmp_path)
    s.load(again)
    assert again.to_json() == st.to_json()
    s.close()


def test_snapshot_is_written_and_read_in_chunks(tmp_path):
    """Full caches round-trip through a snapshot of many lines, order and bounds kept."""
    n = 3 * SNAPSHOT_CHUNK + 7
    st = AgentState(k=3, recent_limit=n, pending_limit=2 * SNAPSHOT_CHUNK)
    for i in range(n):
        st.apply({"t": "s", "id": f"c{i}", "c": "A", "x": np.full(3, i, np.float32), "o": f'{{"id":"c{i}"}}'})
    for i in range(0, n, 2):
        st.apply({"t": "k", "id": f"c{i}"})
    store = Store(tmp_path)
    store.compact(st)
    store.close()
    lines = (tmp_path / SNAPSHOT).read_text().splitlines()
    assert len(lines) == 1 + 4 + 2 + 2  # header, recent, pending, outbox (n // 2 entries)
    again = AgentState(k=3, recent_limit=n, pending_limit=2 * SNAPSHOT_CHUNK)
    s2 = Store(tmp_path)
    s2.load(again)
    assert again.to_json() == st.to_json()
    assert again.unlabelled(f"c{n - 1}")[1].tolist() == [n - 1] * 3 and again.unlabelled("c0") is None
    s2.close()


def test_ids_are_told_apart_by_digest():
    st = AgentState(k=3, recent_limit=50_000, pending_limit=10)
    ids = [f"line-{i}" for i in range(40_000)] + ["", "é", "\ud800", "x" * 10_000]
    for sid in ids:
        st.apply({"t": "s", "id": sid, "c": "A", "o": "{}"})
    assert len(st.recent) == len(ids) and all(st.seen(sid) for sid in ids)
    assert not st.seen("line-40000") and not st.seen("Line-1")


def test_contexts_bounded_lru_and_replay_agrees(tmp_path):
    """Issue 12 item 2: at most max_contexts contexts; the least recently used (by state records, never
    the current one) is forgotten, in memory and in the snapshot; replaying the journal gives the same set."""
    x = np.zeros(4, np.float32)

    def records():
        out = [{"t": "c", "c": "home"}]
        for i in range(50):
            out.append({"t": "l", "id": f"l{i}", "c": f"ctx-{i}", "x": x, "y": float(i)})
            out.append({"t": "s", "id": f"s{i}", "c": "ctx-0", "x": x, "o": "{}"})  # in use: it stays
        return out

    live = AgentState(k=3, recent_limit=100, pending_limit=100, max_contexts=4)
    store = Store(tmp_path)
    store.load(live)
    _apply_all(live, records())
    store.append(records())
    store.close()
    assert sorted(live.contexts) == ["ctx-0", "ctx-48", "ctx-49", "home"]
    assert live.current == "home" and live.contexts.evicted == 47

    replayed = AgentState(k=3, recent_limit=100, pending_limit=100, max_contexts=4)
    s2 = Store(tmp_path)
    s2.load(replayed)
    assert replayed.to_json() == live.to_json()
    s2.compact(replayed)
    s2.close()
    snap = [json.loads(line) for line in (tmp_path / SNAPSHOT).read_text().splitlines()]
    assert sorted(snap[0]["state"]["contexts"]) == ["ctx-0", "ctx-48", "ctx-49", "home"]
    # a smaller bound after a reload applies at once; the current context survives it
    replayed.set_limits(100, 100, 1, 10, 60.0)
    assert list(replayed.contexts) == ["home"]
