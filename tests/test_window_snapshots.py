"""Packed window snapshots: what a store snapshots is what it resumes, whatever the keys and sums,
from the packed form and from the dict form of earlier releases.

The expected contents are the store's inputs summed here by hand (a dict of Python ints), not
anything from the store itself.
"""

from __future__ import annotations

import pickle

from hypothesis import given, settings
from hypothesis import strategies as st

from state.window_kinds import TumblingWindows
from state.windows import WindowSnapshot, WindowStore, pack_window, unpack_window

MINUTE = 60_000
ids = st.text(max_size=8)  # any characters, NUL and emoji included
sums = st.one_of(st.integers(-(10**20), 10**20), st.integers(-(2**300), 2**300))
events = st.lists(st.tuples(st.integers(0, 5), st.tuples(ids, ids, ids), sums), max_size=60)


def expected(adds: list) -> dict:
    totals: dict = {}
    for minute, key, value in adds:
        count, total = totals.get((minute * MINUTE, key), (0, 0))
        totals[(minute * MINUTE, key)] = (count + 1, total + value)
    return totals


def contents(store: WindowStore) -> dict:
    rows = store.emit_closed(closing_ms=10**15, watermark_ms=-1)  # flush, forget nothing
    return {(r.window_start_ms, (r.organization_id, r.external_customer_id, r.code)):
            (r.event_count, r.total_scaled) for r in rows}


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.tuples(ids, ids, ids),
                       st.tuples(st.integers(0, 2**62), sums, st.integers(0, 2**62)), max_size=40))
def test_a_window_unpacks_to_exactly_what_was_packed(aggregates):
    keys = {key: list(aggregate) for key, aggregate in aggregates.items()}
    assert unpack_window(pack_window(keys)) == keys
    assert list(unpack_window(pack_window(keys))) == list(keys), "order kept"


@settings(max_examples=150, deadline=None)
@given(events, events)
def test_a_resumed_store_continues_exactly(before, after):
    store = WindowStore(TumblingWindows(MINUTE))
    for minute, key, value in before:
        store.add(minute * MINUTE, key, value)
    snapshot = pickle.loads(pickle.dumps(store.snapshot()))  # as Bytewax stores it
    resumed = WindowStore(TumblingWindows(MINUTE), snapshot)
    for minute, key, value in after:
        resumed.add(minute * MINUTE, key, value)
    assert contents(resumed) == expected(before + after)


def test_unchanged_windows_are_not_packed_again_and_forgotten_ones_leave():
    store = WindowStore(TumblingWindows(MINUTE))
    store.add(0, ("o", "c", "x"), 1)
    store.add(MINUTE, ("o", "c", "x"), 2)
    first = store.snapshot().windows
    store.add(MINUTE, ("o", "d", "x"), 3)
    second = store.snapshot().windows
    assert second[0] is first[0], "the untouched window keeps its packed bytes"
    assert second[MINUTE] is not first[MINUTE]
    store.emit_closed(closing_ms=MINUTE, watermark_ms=MINUTE)  # window 0 closes and is forgotten
    assert list(store.snapshot().windows) == [MINUTE]


def test_a_snapshot_from_before_packing_resumes():
    old = WindowSnapshot(TumblingWindows(MINUTE).fingerprint,
                         {0: {("o", "c", "x"): (2, 10**30, 0)}, MINUTE: {("o", "c", "y"): (1, -5, 1)}})
    store = WindowStore(TumblingWindows(MINUTE), old)
    store.add(0, ("o", "c", "x"), 1)
    packed = store.snapshot().windows
    assert all(isinstance(window, bytes) for window in packed.values())
    assert unpack_window(packed[MINUTE]) == {("o", "c", "y"): [1, -5, 1]}, "emitted count kept"
    assert contents(store) == {(0, ("o", "c", "x")): (3, 10**30 + 1)}  # y was already written
