"""Packed window snapshots: what a store snapshots is what it resumes, whatever the keys and sums,
from the packed form and from the dict form of earlier releases.

The expected contents are the store's inputs summed here by hand (a dict of Python ints), not
anything from the store itself.
"""

from __future__ import annotations

import pickle
from functools import partial

from hypothesis import given, settings
from hypothesis import strategies as st

from state.packing import COMPRESSED, pack_entries
from state.window_kinds import TumblingWindows
from state.windows import OWED, WindowSnapshot, WindowStore, pack_window, unpack_window
from support.packing_format_1 import format_1

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
@given(st.lists(events, min_size=1, max_size=6), events)
def test_a_resumed_store_continues_exactly(epochs, after):
    """Snapshots at the end of every epoch (incremental segments), resume from the last."""
    store = WindowStore(TumblingWindows(MINUTE))
    for epoch in epochs:
        for minute, key, value in epoch:
            store.add(minute * MINUTE, key, value)
        snapshot = store.snapshot()
    snapshot = pickle.loads(pickle.dumps(snapshot))  # as Bytewax stores it
    resumed = WindowStore(TumblingWindows(MINUTE), snapshot)
    for minute, key, value in after:
        resumed.add(minute * MINUTE, key, value)
    before = [event for epoch in epochs for event in epoch]
    assert contents(resumed) == expected(before + after)


def test_segments_stay_bounded_by_twice_the_live_aggregates():
    store = WindowStore(TumblingWindows(MINUTE))
    keys = [("o", f"c{i}", "x") for i in range(100)]
    for round_ in range(50):
        for key in keys[:30]:
            store.add(0, key, round_)
        store.add(0, keys[30 + round_], 1)
        segments = store.snapshot().windows[0]
        packed = sum(len(unpack_window(segment)) for segment in segments)
        assert packed <= 2 * (31 + round_)
    merged: dict = {}
    for segment in segments:
        merged.update(unpack_window(segment))
    assert merged[keys[0]] == [50, sum(range(50)), 0] and len(merged) == 80


def test_unchanged_windows_are_not_packed_again_and_forgotten_ones_leave():
    store = WindowStore(TumblingWindows(MINUTE))
    store.add(0, ("o", "c", "x"), 1)
    store.add(MINUTE, ("o", "c", "x"), 2)
    first = store.snapshot().windows
    store.add(MINUTE, ("o", "d", "x"), 3)
    second = store.snapshot().windows
    assert second[0] == first[0] and second[0][0] is first[0][0], "untouched: not packed again"
    assert second[MINUTE][0] is first[MINUTE][0] and len(second[MINUTE]) == 2, "only the change"
    assert unpack_window(second[MINUTE][1]) == {("o", "d", "x"): [1, 3, 0]}
    store.emit_closed(closing_ms=MINUTE, watermark_ms=MINUTE)  # window 0 closes and is forgotten
    assert list(store.snapshot().windows) == [MINUTE]


def test_a_snapshot_of_one_packed_window_resumes():
    packed = pack_window({("o", "c", "x"): [2, 7, 0]})
    store = WindowStore(TumblingWindows(MINUTE), WindowSnapshot(TumblingWindows(MINUTE).fingerprint, {0: packed}))
    store.add(0, ("o", "c", "x"), 1)
    assert contents(store) == {(0, ("o", "c", "x")): (3, 8)}


def test_a_snapshot_from_before_packing_resumes():
    old = WindowSnapshot(TumblingWindows(MINUTE).fingerprint,
                         {0: {("o", "c", "x"): (2, 10**30, 0)}, MINUTE: {("o", "c", "y"): (1, -5, 1)}})
    store = WindowStore(TumblingWindows(MINUTE), old)
    store.add(0, ("o", "c", "x"), 1)
    packed = store.snapshot().windows
    assert all(isinstance(segment, bytes) for segments in packed.values() for segment in segments)
    assert unpack_window(packed[MINUTE][0]) == {("o", "c", "y"): [1, -5, 1]}, "emitted count kept"
    assert contents(store) == {(0, ("o", "c", "x")): (3, 10**30 + 1)}  # y was already written


# A store and its twin, resumed from the store's last snapshot, must be one state: the same
# aggregates in the same order (rows come out in that order), whatever happened in between.
steps = st.one_of(
    st.tuples(st.just("add"), st.integers(0, 4), st.tuples(ids, ids, ids), sums),
    st.tuples(st.just("group"), st.integers(0, 4), st.tuples(ids, ids, ids),
              st.integers(1, 3), sums),
    st.tuples(st.just("emit"), st.integers(0, 6), st.booleans()),
    st.tuples(st.just("snapshot")),
    st.tuples(st.just("copy")),
)


def live_state(store: WindowStore) -> list:
    return [(start, list(window.aggregates().items())) for start, window in store._open.items()]


def resumed(store: WindowStore, lateness: int) -> WindowStore:
    snapshot = pickle.loads(pickle.dumps(store.snapshot()))
    return WindowStore(TumblingWindows(MINUTE), snapshot, allowed_lateness_ms=lateness)


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=40), st.sampled_from([0, MINUTE, 3 * MINUTE]))
def test_a_resumed_twin_is_the_same_state_after_any_steps(script, lateness):
    store = WindowStore(TumblingWindows(MINUTE), allowed_lateness_ms=lateness)
    twin = WindowStore(TumblingWindows(MINUTE), allowed_lateness_ms=lateness)
    for step in script:
        for one in (store, twin):
            if step[0] == "add":
                one.add(step[1] * MINUTE, step[2], step[3])
            elif step[0] == "group":
                one.add_group(step[1] * MINUTE, step[2], step[3], step[4])
        if step[0] == "emit":
            watermark = step[1] * MINUTE
            rows = store.emit_closed(watermark + MINUTE, watermark, provisional=step[2])
            assert twin.emit_closed(watermark + MINUTE, watermark, provisional=step[2]) == rows
            if step[2]:
                store.owe(rows, watermark)
                twin.owe(rows, watermark)
        elif step[0] == "copy":  # a copy snapshots on where its original was
            twin = twin.copy()
        elif step[0] == "snapshot":  # the twin resumes from its own (incremental) snapshots
            from_store, twin = resumed(store, lateness), resumed(twin, lateness)
            assert live_state(from_store) == live_state(twin) == live_state(store)
            assert from_store.owed_after == twin.owed_after == store.owed_after
    assert live_state(resumed(store, lateness)) == live_state(store)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.integers(0, 3), st.dictionaries(
    st.tuples(ids, ids, ids), st.tuples(st.integers(0, 2**62), sums, st.integers(-1, 2**62)),
    max_size=20), max_size=4), st.integers(1, 3), events, st.sampled_from(["format 1", "format 2"]))
def test_a_snapshot_of_earlier_format_segments_resumes_and_packs_on(windows, segments, after, old_format):
    """Segments as releases before packing format 2 (format 1), or before format 3 (format 2),
    wrote them; the resumed store's own snapshots then resume to the same state."""
    encode = format_1 if old_format == "format 1" else partial(pack_entries, key_width=3, big=1)
    packed, expected = {}, []
    for minute, keys in windows.items():
        parts = [dict(list(keys.items())[i::segments]) for i in range(segments)]
        packed[minute * MINUTE] = tuple(map(encode, parts))
        merged: dict = {}
        for part in parts:
            merged.update((key, list(aggregate)) for key, aggregate in part.items())
        expected.append((minute * MINUTE, list(merged.items())))
    store = WindowStore(TumblingWindows(MINUTE),
                        WindowSnapshot(TumblingWindows(MINUTE).fingerprint, packed))
    assert live_state(store) == expected
    for minute, key, value in after:
        store.add(minute * MINUTE, key, value)
    assert live_state(resumed(store, 0)) == live_state(store)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 60_000, 120_000]), st.lists(
    st.tuples(st.integers(0, 6), st.integers(1, 3), st.integers(-10**30, 10**30)), max_size=8)),
    max_size=8), st.booleans())
def test_add_groups_equals_add_group_one_by_one(batches, snapshot_between):
    """``WindowStore.add_groups`` (new keys in bulk) leaves what ``add_group`` in order leaves:
    the same aggregates in the same order, and the same snapshots."""
    bulk, single = (WindowStore(TumblingWindows(60_000)) for _ in range(2))
    for start, groups in batches:
        groups = list({("o", f"c{k}", "x"): (count, total) for k, count, total in groups}.items())
        bulk.add_groups(start, [key for key, _ in groups], [c for _, (c, _t) in groups],
                        [t for _, (_c, t) in groups])
        for key, (count, total) in groups:
            single.add_group(start, key, count, total)
        assert list(bulk._open) == list(single._open)
        assert all(bulk._open[s] == single._open[s] for s in single._open)
        if snapshot_between:
            assert bulk.snapshot() == single.snapshot()
    assert bulk.snapshot() == single.snapshot()
    scratch = bulk.copy()
    scratch.add_groups(0, [("o", "c1", "x"), ("o", "new", "x")], [1, 1], [5, 5])
    assert bulk._open == single._open  # a copy changes none of its original's aggregates


def test_large_segments_are_compressed_and_resume():
    """Segments past ``state.packing.COMPRESS_FROM`` are compressed; a store resumes from them
    (a whole window, then an increment and an owed mark) to the same aggregates."""
    store = WindowStore(TumblingWindows(MINUTE), allowed_lateness_ms=MINUTE)
    keys = [("org_001", f"cus_001_{i:04d}", "api_calls") for i in range(3_000)]
    store.add_groups(0, keys[:2_000], [1] * 2_000, [10**18 + i for i in range(2_000)])
    store.snapshot()
    store.add_groups(0, keys[1_000:], [2] * 2_000, [-(10**30)] * 2_000)
    scratch = store.copy()
    store.owe(scratch.emit_closed(MINUTE, 0, provisional=True, blocks=True), 0)
    segments = store.snapshot().windows[0]
    assert [segment if segment.__class__ is int else segment[0] for segment in segments] == \
        [COMPRESSED, OWED, COMPRESSED]  # the mark, then what changed after it
    assert live_state(resumed(store, MINUTE)) == live_state(store)
    assert live_state(store)[0][1][1_500] == (keys[1_500], [3, 10**18 + 1_500 - 10**30, OWED])
