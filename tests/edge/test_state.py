"""State persistence without a broker: journal replay, torn last line, compaction, the lock, bounds."""

import json

import numpy as np
import pytest

from edge_agent.errors import StateError
from edge_agent.state import SNAPSHOT, AgentState, Store


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
    assert restored.current == "A" and list(restored.outbox) == ["2"] and list(restored.pending) == ["2"]
    assert restored.recent == {"1": True, "2": False}
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
    assert "2" in st.pending and st.contexts["A"].n_labels == 0
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
    json.loads((tmp_path / SNAPSHOT).read_text())  # plain JSON, inspectable
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
    assert list(st.recent) == [str(i) for i in range(5, 10)]
    assert list(st.pending) == [str(i) for i in range(6, 10)]
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
