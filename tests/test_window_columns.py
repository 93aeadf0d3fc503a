"""The window store keeps each window's aggregates as columns (``state.windows._Window``).
Against the store as it was before, a dict of ``[count, total, emitted]`` lists per window
(``support.dict_window_store``), any sequence of adds, emissions (blocks or rows, real or
provisional and owed), copies, snapshots and resumes writes the same rows, packs the same
snapshot segments (each as format 3 now, format 2 then) and holds the same aggregates in the
same order.

``TALLYFLOW_PROPERTY_EXAMPLES`` sets the number of examples (default 200).
"""

from __future__ import annotations

import os
import pickle

from hypothesis import HealthCheck, given, settings, strategies as st

from state.window_kinds import TumblingWindows
from state.windows import WindowStore, unpack_window
from support.dict_window_store import DictWindowStore

EXAMPLES = int(os.environ.get("TALLYFLOW_PROPERTY_EXAMPLES", "200"))
MINUTE = 60_000
KEYS = [("o", c, x) for c in "abcde" for x in "xy"]
sums = st.integers(-(10**20), 10**20) | st.integers(-(2**70), 2**70)
steps = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 1), st.sampled_from(KEYS), sums),
    st.tuples(st.just("group"), st.integers(0, 1), st.sampled_from(KEYS), st.integers(1, 3), sums),
    st.tuples(st.just("groups"), st.integers(0, 1),
              st.lists(st.tuples(st.sampled_from(KEYS), st.integers(1, 3), sums), max_size=8,
                       unique_by=lambda group: group[0])),
    st.tuples(st.just("emit"), st.integers(0, 5), st.booleans(), st.booleans()),
    st.tuples(st.just("flush"), st.integers(0, 5), st.booleans(),
              st.lists(st.tuples(st.integers(0, 1), st.sampled_from(KEYS), sums), max_size=4)),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("copy")),
    st.tuples(st.just("resume")),
)


def aggregates(store) -> list:
    """Every window's aggregates in order, whichever way the store holds them."""
    return [(start, list((window if isinstance(window, dict) else window.aggregates()).items()))
            for start, window in store._open.items()]


def segments(snapshot) -> tuple:
    """What a snapshot holds, segment by segment (the new store packs format 3, the old one 2)."""
    return snapshot.owed_after, {start: [segment if segment.__class__ is int else list(unpack_window(segment).items())
                                         for segment in packed] for start, packed in snapshot.windows.items()}


def flushed(store, scratch, watermark: int, blocks: bool, adds: list) -> list:
    """A provisional flush: ``scratch`` (a copy of ``store``) takes ``adds`` and emits, ``store`` owes."""
    for minute, key, value in adds:
        scratch.add(minute * MINUTE, key, value)
    rows = scratch.emit_closed(watermark + MINUTE, watermark, provisional=True, blocks=blocks)
    store.owe(rows, watermark)
    return rows


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(steps, max_size=40), st.sampled_from([0, MINUTE, 3 * MINUTE]))
def test_columns_do_what_the_dict_of_lists_did(script, lateness):
    new = WindowStore(TumblingWindows(MINUTE), allowed_lateness_ms=lateness, grain="hour")
    old = DictWindowStore(TumblingWindows(MINUTE), allowed_lateness_ms=lateness, grain="hour")
    for step in script:
        kind, args = step[0], step[1:]
        if kind in ("add", "group"):
            for store in (new, old):
                getattr(store, "add" if kind == "add" else "add_group")(args[0] * MINUTE, *args[1:])
        elif kind == "groups":
            groups = args[1]
            for store in (new, old):
                store.add_groups(args[0] * MINUTE, [g[0] for g in groups], [g[1] for g in groups],
                                 [g[2] for g in groups])
        elif kind == "emit":
            minute, provisional, blocks = args
            assert new.emit_closed((minute + 1) * MINUTE, minute * MINUTE, provisional, blocks) == \
                old.emit_closed((minute + 1) * MINUTE, minute * MINUTE, provisional, blocks)
        elif kind == "flush":
            minute, blocks, adds = args
            assert flushed(new, new.copy(), minute * MINUTE, blocks, adds) == \
                flushed(old, old.borrowed(), minute * MINUTE, blocks, adds)
        elif kind == "snapshot":
            assert segments(new.snapshot()) == segments(old.snapshot())
        elif kind == "copy":
            new, old = new.copy(), old.copy()
        else:
            new_snapshot, old_snapshot = new.snapshot(), old.snapshot()
            assert segments(new_snapshot) == segments(old_snapshot)
            new = WindowStore(TumblingWindows(MINUTE), pickle.loads(pickle.dumps(new_snapshot)),
                              lateness, "hour")
            old = DictWindowStore(TumblingWindows(MINUTE), pickle.loads(pickle.dumps(old_snapshot)),
                                  lateness, "hour")
        assert aggregates(new) == aggregates(old)
        assert new.owed_after == old.owed_after
    assert segments(new.snapshot()) == segments(old.snapshot())


def test_the_comparison_sees_rows_blocks_and_owed_windows():
    # The property above compares; this checks that what it compares is not empty.
    new = WindowStore(TumblingWindows(MINUTE), allowed_lateness_ms=MINUTE)
    new.add_groups(0, KEYS[:3], [1, 2, 3], [4, 5, 6])
    new.snapshot()
    rows = flushed(new, new.copy(), 0, True, [(0, KEYS[4], 7)])
    assert [len(block) for block in rows] == [4]
    assert [segment for segment in new.snapshot().windows[0] if segment.__class__ is int] == [-1]
    assert [(r.event_count, r.is_deleted) for r in new.emit_closed(MINUTE, MINUTE)] == \
        [(1, False), (2, False), (3, False), (0, True)]
