"""The shard's batch sums (``_Sums``: per window, rolled up per hour and day, or per grain
afresh) against a plain Python reference: a dict per (period start, key), filled event by event."""

import numpy as np
from hypothesis import given, settings, strategies as st

from operators.usage_windows import _grain_groups, _runs, _Sums
from state.held import VALUE_UNIT, Ready

KEYS = [("o1", "c1", "x"), ("o1", "c2", "x"), ("o2", "c1", "y"), ("o3", "c9", "z")]
VALUES = st.one_of(st.integers(-10**21, 10**21), st.integers(-(10**37), 10**37),
                   st.sampled_from([0, 1, -1, VALUE_UNIT - 1, 2**63 * VALUE_UNIT, -(2**63) * VALUE_UNIT - 1,
                                    (2**63 - 1) * VALUE_UNIT, -(2**63 - 1) * VALUE_UNIT]))
EVENT = st.tuples(st.integers(0, 4 * 3_600_000), st.integers(0, len(KEYS) - 1), VALUES, st.booleans())


def ready_of(events: list[tuple]) -> Ready:
    """Events ``(time, key id, value, counted)`` held as ``HeldEvents`` holds them, in time order."""
    events = sorted(events, key=lambda e: e[0])
    wholes, fractions, wide = [], [], {}
    for position, (_t, _k, value, _c) in enumerate(events):
        whole, fraction = divmod(value, VALUE_UNIT)
        if -(2**63 - 1) <= whole <= 2**63 - 1:
            wholes.append(whole)
            fractions.append(fraction)
        else:
            wholes.append(0)
            fractions.append(0)
            wide[position] = value
    zeros = np.zeros(len(events), dtype=np.int64)
    return Ready(np.array([e[0] for e in events], dtype=np.int64), zeros, zeros, zeros,
                 np.array(wholes, dtype=np.int64), np.array(fractions, dtype=np.int64),
                 np.array([e[1] for e in events], dtype=np.int32), KEYS, wide, {})


def reference(events: list[tuple], unit_ms: int) -> list[tuple]:
    """(start, key, count, total, latest) per (period, key) of the counted events, first seen first."""
    groups: dict[tuple, list] = {}
    for timestamp, key_id, value, counted in sorted(events, key=lambda e: e[0]):
        if counted:
            group = groups.setdefault((timestamp - timestamp % unit_ms, KEYS[key_id]), [0, 0, timestamp])
            group[0] += 1
            group[1] += value
            group[2] = max(group[2], timestamp)
    return [(start, key, *group) for (start, key), group in groups.items()]


def listed(groups) -> list[tuple]:
    return list(zip(groups.starts, groups.keys, groups.counts, groups.totals, groups.latest))


@settings(max_examples=400, deadline=None)
@given(st.lists(EVENT, min_size=1, max_size=60), st.sampled_from([60_000, 420_000, 3_600_000]))
def test_window_hour_and_day_sums_equal_the_reference(events, size_ms):
    ready = ready_of(events)
    fresh = np.array([i for i, e in enumerate(sorted(events, key=lambda e: e[0])) if e[3]], dtype=np.int64)
    if not len(fresh):
        return
    windows = _Sums.of(ready, fresh, ready.times[fresh], ready.key_ids[fresh], size_ms)
    window_groups = windows.groups(ready.keys)
    assert listed(window_groups) == reference(events, size_ms)
    for unit_ms in (3_600_000, 86_400_000):
        assert listed(_grain_groups(ready, fresh, windows, window_groups, unit_ms, size_ms)) == reference(events, unit_ms)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 59_999), st.integers(0, len(KEYS) - 1), VALUES, st.booleans()),
                min_size=1, max_size=60), st.integers(0, 3 * 24 * 60))
def test_a_batch_of_one_window_gives_its_groups_to_the_hour_and_the_day(events, window):
    """Most batches decide one window: its groups are taken as the hour's and the day's."""
    events = [(window * 60_000 + time, key_id, value, counted) for time, key_id, value, counted in events]
    ready = ready_of(events)
    fresh = np.array([i for i, e in enumerate(sorted(events, key=lambda e: e[0])) if e[3]], dtype=np.int64)
    if not len(fresh):
        return
    windows = _Sums.of(ready, fresh, ready.times[fresh], ready.key_ids[fresh], 60_000)
    window_groups = windows.groups(ready.keys)
    assert listed(window_groups) == reference(events, 60_000)
    for unit_ms in (3_600_000, 86_400_000):
        assert listed(_grain_groups(ready, fresh, windows, window_groups, unit_ms, 60_000)) == \
            reference(events, unit_ms)


def test_sums_near_64_bits_of_whole_units_stay_exact():
    """Whole parts near 2**63 each: their sums pass 64 bits and are added as Python integers."""
    big = (2**63 - 2) * VALUE_UNIT + VALUE_UNIT - 1
    events = [(1_000 * i, 0, big, True) for i in range(5)] + [(500, 1, -big, True), (501, 1, -big, True)]
    ready = ready_of(events)
    fresh = np.arange(len(events))
    windows = _Sums.of(ready, fresh, ready.times, ready.key_ids, 60_000)
    window_groups = windows.groups(ready.keys)
    assert listed(window_groups) == reference(events, 60_000)
    assert listed(_grain_groups(ready, fresh, windows, window_groups, 3_600_000, 60_000)) == \
        reference(events, 3_600_000)


def test_window_sums_in_pure_python_equal_the_reference(monkeypatch):
    """The window, hour and day sums again, with the held values made Python integers without
    the compiled path."""
    import state.held
    monkeypatch.setattr(state.held, "_fast_scaled", None)
    test_window_hour_and_day_sums_equal_the_reference()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0, 60_000, 120_000, 7 * 60_000]), st.integers(0, 5)), min_size=1, max_size=80),
       st.booleans(), st.sampled_from([6, 2**60]))
def test_runs_order_by_period_and_key_stably(items, one_period, n_keys):
    """``_runs`` (one sort of the (period, key) code packed with the position, or a stable sort
    where that passes 63 bits) against lexsort, for one period or several."""
    if one_period or n_keys > 6:  # several periods with 2**60 keys would pass 64 bits in the code itself
        items = [(0, key) for _start, key in items]
    starts = np.array([start for start, _ in items], dtype=np.int64)
    key_ids = np.array([key for _, key in items], dtype=np.int32)
    order, heads = _runs(starts, key_ids, n_keys)
    expected = np.lexsort((key_ids, starts))
    assert order.tolist() == expected.tolist()
    pairs = list(zip(starts[expected].tolist(), key_ids[expected].tolist()))
    assert heads.tolist() == [i for i in range(len(pairs)) if i == 0 or pairs[i] != pairs[i - 1]]
