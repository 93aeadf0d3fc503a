"""The compiled held columns (``state/_fastheld.c``) against the pure-Python ones, batch for batch:
the same columns, the same values held aside, the same key numbers and key tables."""

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import state.held as held_module
from state.held import VALUE_UNIT, _columns, _compiled_columns, _KeyTable, scaled_values, time_range
from state.records import ShardEvent
from test_held import test_held_events_come_out_when_due_in_decision_order_with_exact_values

COMPILED = held_module._compiled("columns")

if COMPILED is None and os.environ.get("CI"):
    pytest.fail("state/_fastheld.c was not built: `make install` builds it", pytrace=False)
compiled_only = pytest.mark.skipif(COMPILED is None, reason="the compiled held path is not built (make install)")

INT64 = st.integers(-(2**63), 2**63 - 1)
EDGES = [0, 1, -1, VALUE_UNIT - 1, VALUE_UNIT, -VALUE_UNIT, -VALUE_UNIT - 1, 2**63 - 1, -(2**63), 2**64,
         (2**63 - 1) * VALUE_UNIT, (2**63 - 1) * VALUE_UNIT + VALUE_UNIT - 1, (2**63) * VALUE_UNIT,
         -(2**63 - 1) * VALUE_UNIT, -(2**63 - 1) * VALUE_UNIT - 1, -(2**63) * VALUE_UNIT,
         2**127 - 1, -(2**127), 2**127, -(2**127) - 1, 10**40, -(10**40)]
VALUES = st.one_of(st.integers(-10**24, 10**24), INT64, st.integers(-(2**130), 2**130), st.sampled_from(EDGES))
EVENT = st.tuples(INT64, st.sampled_from(["o1", "o2", "ö"]), st.sampled_from(["c1", "c2", "", "\ud800"]),
                  st.sampled_from(["x", "y"]), INT64, VALUES, INT64, st.booleans())


def events_of(drawn: list[tuple]) -> list[ShardEvent]:
    """Events whose org and code strings are new objects each (as decoding makes them)."""
    return [ShardEvent(digest, "".join(org), customer, "".join(code), timestamp, value, -1, offset, "t",
                       [(0, (), 1)] if metrics else None)
            for digest, org, customer, code, timestamp, value, offset, metrics in drawn]


@compiled_only
@settings(max_examples=500, deadline=None)
@given(st.lists(st.lists(EVENT, min_size=1, max_size=20), min_size=1, max_size=4))
def test_compiled_columns_equal_the_pure_ones(batches):
    pure_table, compiled_table = _KeyTable(), _KeyTable()
    for drawn in batches:
        events = events_of(drawn)
        pure, pure_span, pure_wide, pure_metrics = _columns(events, pure_table)
        compiled, compiled_span, compiled_wide, compiled_metrics = _compiled_columns(events, compiled_table)
        assert {name: column.tolist() for name, column in compiled.items()} == \
            {name: column.tolist() for name, column in pure.items()}
        assert {name: column.dtype for name, column in compiled.items()} == \
            {name: column.dtype for name, column in pure.items()}
        assert (compiled_span, compiled_wide, compiled_metrics) == (pure_span, pure_wide, pure_metrics)
        assert compiled_span == (min(e.timestamp_ms for e in events), max(e.timestamp_ms for e in events))
        for position, event in enumerate(events):  # each value exact, in a column or aside
            if position not in compiled_wide:
                assert int(compiled["wholes"][position]) * VALUE_UNIT + int(compiled["fractions"][position]) \
                    == event.value_scaled
                assert 0 <= int(compiled["fractions"][position]) < VALUE_UNIT
    assert compiled_table.keys == pure_table.keys and compiled_table.ids == pure_table.ids
    assert compiled_table.strings == pure_table.strings
    for key in compiled_table.keys:  # org and code shared through the table's strings
        assert key[0] is compiled_table.strings[key[0]] and key[2] is compiled_table.strings[key[2]]


@compiled_only
@settings(max_examples=200, deadline=None)
@given(st.lists(EVENT, min_size=1, max_size=20))
def test_compiled_time_range_equals_the_pure_one(drawn):
    events = events_of(drawn)
    times = [event.timestamp_ms for event in events]
    assert time_range(events) == (min(times), max(times))


@compiled_only
@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(INT64, st.integers(0, VALUE_UNIT - 1)), max_size=30))
def test_compiled_scaled_values_equal_the_pure_ones(pairs):
    wholes = np.array([whole for whole, _ in pairs], dtype=np.int64)
    fractions = np.array([fraction for _, fraction in pairs], dtype=np.int64)
    assert scaled_values(wholes, fractions) == [whole * VALUE_UNIT + fraction for whole, fraction in pairs]
    assert scaled_values(wholes[::-1], fractions[::-1]) == \
        [whole * VALUE_UNIT + fraction for whole, fraction in pairs[::-1]]  # not contiguous


@compiled_only
def test_compiled_columns_refuse_what_they_cannot_read():
    table = _KeyTable()
    with pytest.raises(TypeError):
        _compiled_columns([("not", "an", "event")], table)
    with pytest.raises(OverflowError):
        _compiled_columns(events_of([(0, "o1", "c1", "x", 2**63, 0, 0, False)]), table)
    with pytest.raises(OverflowError):
        time_range(events_of([(0, "o1", "c1", "x", 2**63, 0, 0, False)]))
    with pytest.raises(TypeError):
        time_range([])


def test_the_held_events_property_in_pure_python(monkeypatch):
    """The held events' model test again, on the pure-Python path."""
    monkeypatch.setattr(held_module, "_fast_columns", None)
    monkeypatch.setattr(held_module, "_fast_time_range", None)
    monkeypatch.setattr(held_module, "_fast_scaled", None)
    test_held_events_come_out_when_due_in_decision_order_with_exact_values()


@compiled_only
def test_a_build_of_another_version_is_not_used(monkeypatch):
    """A stale build (``make install`` not run since ``state/_fastheld.c`` changed) is left aside:
    its functions may take or give other things."""
    from state import _fastheld
    monkeypatch.setattr(_fastheld, "INTERFACE", held_module._INTERFACE - 1)
    assert held_module._compiled("columns") is None
