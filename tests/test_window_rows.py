"""``WindowStore._rows`` on a window's columns (bulk paths for a first emission and for a window with nothing new)
against the rule written out one aggregate at a time."""

import copy

from hypothesis import given, settings, strategies as st

from state.records import WindowRow
from state.windows import OWED, WindowStore, _Window

AGGREGATE = st.tuples(st.integers(0, 3), st.integers(-10**30, 10**30), st.sampled_from([0, 0, 1, 2, OWED]))


def reference(start, end, keys, grain, version, owed_now, record):
    rows, emitted_keys = [], []
    for key, aggregate in keys.items():
        count, total, emitted = aggregate
        if count != emitted and (emitted != OWED or owed_now):
            rows.append(WindowRow(*key, start, end, count, total, version, count == 0, grain))
            emitted_keys.append(key)
            if record:
                aggregate[2] = count
    return rows, emitted_keys


@settings(max_examples=400, deadline=None)
@given(st.lists(AGGREGATE, max_size=8), st.booleans(), st.booleans(), st.booleans(), st.booleans())
def test_rows_equal_the_rule_one_aggregate_at_a_time(aggregates, first, same, owed_now, record):
    if first:  # a window never emitted
        aggregates = [(max(count, 1), total, 0) for count, total, _ in aggregates]
    if same:  # a window emitted and unchanged since
        aggregates = [(count, total, count) for count, total, _ in aggregates]
    keys = {("o", f"c{i}", "x"): list(aggregate) for i, aggregate in enumerate(aggregates)}
    window, expected_keys = _Window.of(keys), copy.deepcopy(keys)
    rows, positions = WindowStore._rows(0, 60_000, window, "hour", 9, owed_now, record)
    assert (rows, [window.keys[p] for p in positions]) == \
        reference(0, 60_000, expected_keys, "hour", 9, owed_now, record)
    assert window.aggregates() == expected_keys
