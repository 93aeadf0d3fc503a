"""The compiled group adding (``state/_fastwindows.c``) against the pure-Python one, batch for
batch: the same columns, key index, changed positions (in order) and snapshot bytes."""

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import state.windows as windows_module
from state.window_kinds import TumblingWindows
from state.windows import WindowStore
from test_window_columns import test_columns_do_what_the_dict_of_lists_did

COMPILED = windows_module._compiled("add_known")

if COMPILED is None and os.environ.get("CI"):
    pytest.fail("state/_fastwindows.c was not built: `make install` builds it", pytrace=False)
compiled_only = pytest.mark.skipif(COMPILED is None, reason="the compiled group adding is not built (make install)")

MINUTE = 60_000
KEYS = [(org, customer, code) for org in ("o1", "ö") for customer in ("c1", "c2", "", "é") for code in "xy"]
TOTALS = st.one_of(st.integers(-10**24, 10**24), st.integers(-(2**130), 2**130),
                   st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**64, 10**40]))
BATCH = st.tuples(st.integers(0, 2), st.lists(st.tuples(st.sampled_from(KEYS), st.integers(1, 5), TOTALS),
                                              max_size=12, unique_by=lambda group: group[0]))
STEP = st.one_of(BATCH, st.just("snapshot"))


def state(store: WindowStore) -> tuple:
    """Everything adding groups touches."""
    return ([(start, window.keys, window.counts, window.totals, window.emitted, window._positions)
             for start, window in store._open.items()],
            {start: list(changed) for start, changed in store._changed.items()})


def fresh_keys(groups: list) -> list[tuple]:
    """The groups' keys as new tuple objects (as each batch makes them)."""
    return [tuple(list(key)) for key, _count, _total in groups]


@compiled_only
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(STEP, max_size=25))
def test_compiled_adding_does_what_the_pure_path_does(script):
    compiled, pure = WindowStore(TumblingWindows(MINUTE)), WindowStore(TumblingWindows(MINUTE))
    for step in script:
        if step == "snapshot":
            assert compiled.snapshot() == pure.snapshot()
            continue
        minute, groups = step
        counts, totals = [g[1] for g in groups], [g[2] for g in groups]
        compiled.add_groups(minute * MINUTE, fresh_keys(groups), counts, totals)
        windows_module._fast_add_known, fast = None, windows_module._fast_add_known
        try:
            pure.add_groups(minute * MINUTE, fresh_keys(groups), counts, totals)
        finally:
            windows_module._fast_add_known = fast
        assert state(compiled) == state(pure)
    assert compiled.snapshot() == pure.snapshot()


@compiled_only
def test_the_window_takes_new_keys_after_the_known_ones_are_added():
    """Known keys add up in place and are noted changed in the groups' order; new ones come
    back, in order, and are appended."""
    store = WindowStore(TumblingWindows(MINUTE))
    store.add_groups(0, [("o", "a", "x"), ("o", "b", "x")], [1, 1], [5, 2**70])
    store.snapshot()
    store.add_groups(0, [("o", "c", "x"), ("o", "b", "x"), ("o", "d", "x"), ("o", "a", "x")],
                     [2, 3, 4, 5], [-1, 2**70, 7, -5])
    window = store._open[0]
    assert window.keys == [("o", "a", "x"), ("o", "b", "x"), ("o", "c", "x"), ("o", "d", "x")]
    assert (window.counts, window.totals) == ([6, 4, 2, 4], [0, 2**71, -1, 7])
    assert list(store._changed[0]) == [1, 0]
    assert window.positions == {key: i for i, key in enumerate(window.keys)}


@compiled_only
def test_a_position_outside_the_window_is_an_error_not_a_write():
    with pytest.raises(IndexError):
        COMPILED({("o", "a", "x"): 3}, [("o", "a", "x")], [1], [1], [0], [0], None)
    with pytest.raises(ValueError):
        COMPILED({}, [("o", "a", "x")], [1, 2], [1], [0], [0], None)


def test_the_window_columns_property_in_pure_python(monkeypatch):
    """The window columns' model test again, on the pure-Python path."""
    monkeypatch.setattr(windows_module, "_fast_add_known", None)
    test_columns_do_what_the_dict_of_lists_did()


@compiled_only
def test_a_build_of_another_version_is_not_used(monkeypatch):
    """A stale build (``make install`` not run since ``state/_fastwindows.c`` changed) is left
    aside: its functions may take or give other things."""
    from state import _fastwindows
    monkeypatch.setattr(_fastwindows, "INTERFACE", windows_module._INTERFACE - 1)
    assert windows_module._compiled("add_known") is None
