"""The compiled live-totals fold (``operators/_fastlive.c``) against the pure-Python one, batch for
batch: the same totals, changed totals (in the same order), dirty totals, latest event times,
quota alerts and snapshot bytes."""

import os
import random
import sys
from contextlib import contextmanager

import pytest
from hypothesis import given, settings, strategies as st

import operators.live_totals as live_module
import operators.usage_windows as usage_module
from operators.live_totals import (
    LiveTotals,
    LiveTotalsLogic,
    LiveTotalsParams,
    QuotaAlert,
    fold_deltas,
    month_start,
)
from operators.quotas import parse_quotas
from state.records import CountedUsage

COMPILED = live_module._compiled_fold

if COMPILED is None and os.environ.get("CI"):
    pytest.fail("operators/_fastlive.c was not built: `make install` builds it", pytrace=False)
compiled_only = pytest.mark.skipif(COMPILED is None, reason="the compiled live fold is not built (make install)")

DAY_MS = 86_400_000
RULES = parse_quotas('[[quota]]\ncode="api"\nperiod="day"\nmeasure="count"\nthreshold=2\n'
                     '[[quota]]\ncode="x:y"\nperiod="month"\nmeasure="value"\nthreshold="1.5"\n'
                     '[[quota]]\ncode="api"\nperiod="month"\nmeasure="value"\nthreshold="-3"\n')
IDS = st.one_of(st.sampled_from(["o", "ö", "a:b", "%x", "", "ß:%", "日本"]),
                st.text(st.characters(blacklist_categories=("Cs",)), max_size=4))
CODES = st.sampled_from(["api", "x:y", "ö%", "other"])  # the first two watched
DAYS = st.one_of(st.sampled_from([0, -DAY_MS, 1_769_731_200_000, 1_769_817_600_000, 1_769_904_000_000,
                                  253_402_214_400_000]),
                 st.integers(-(2**40), 2**45).map(lambda t: t - t % DAY_MS))
HUGE = st.sampled_from([2**63 - 1, 2**63, -(2**63), 2**64, -(2**64) - 1, 2**127, -(2**130), 10**40, 10**18])
VALUES = st.one_of(st.integers(-(10**24), 10**24), HUGE)
DELTA = st.tuples(st.tuples(IDS, IDS, CODES, DAYS),
                  st.tuples(st.one_of(st.integers(1, 5), HUGE), VALUES, st.integers(-(2**64), 2**64)))
USAGE = st.tuples(st.lists(DELTA, min_size=1, max_size=12), st.integers(-(2**63), 2**46), st.booleans())


@contextmanager
def pure_fold():
    """The pure-Python fold, as where the module is not built."""
    kept = live_module._compiled_fold, live_module._presized
    live_module._compiled_fold = live_module._presized = None
    try:
        yield
    finally:
        live_module._compiled_fold, live_module._presized = kept


def usage_of(drawn: tuple, shared: list) -> CountedUsage:
    """A CountedUsage; some keys repeat earlier batches' (``shared``), as a busy customer's do."""
    deltas, watermark, provisional = drawn
    entries = {}
    for key, sums in deltas:
        if shared and sums[0] % 2:
            key = shared[sums[0] % len(shared)]
        entries[key] = sums
        shared.append(key)
    return CountedUsage(entries, watermark, provisional and watermark % 3 == 0)


def outcome(out: list) -> list:
    """What a batch emitted, with each LiveTotals' totals in their order."""
    return [list(item.totals.items()) if isinstance(item, LiveTotals) else item for item in out]


@compiled_only
@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(USAGE, min_size=1, max_size=3), min_size=1, max_size=6), st.lists(st.booleans()))
def test_compiled_fold_equals_the_pure_one(batches, snapshots):
    params = LiveTotalsParams(shards=1, rules=RULES, day_horizon_ms=10 * DAY_MS)
    compiled, pure = LiveTotalsLogic(params), LiveTotalsLogic(params)
    shared: list = []
    for number, drawn in enumerate(batches):
        values = [usage_of(usage, shared) for usage in drawn]
        compiled_out = compiled.on_batch(values)
        with pure_fold():
            pure_out = pure.on_batch(values)
        assert outcome(compiled_out[0]) == outcome(pure_out[0])
        assert list(compiled.totals.items()) == list(pure.totals.items())
        assert list(compiled._dirty.items()) == list(pure._dirty.items())
        assert (compiled.alerted, compiled.watermark) == (pure.alerted, pure.watermark)
        if number < len(snapshots) and snapshots[number]:
            compiled_snapshot, pure_snapshot = compiled.snapshot(), pure.snapshot()
            assert compiled_snapshot == pure_snapshot  # the packed bytes, byte for byte
            compiled, pure = LiveTotalsLogic(params, compiled_snapshot), LiveTotalsLogic(params, pure_snapshot)
    assert compiled.snapshot() == pure.snapshot()


@compiled_only
@settings(max_examples=300, deadline=None)
@given(st.lists(DELTA, max_size=12), st.lists(DELTA, max_size=6), st.booleans())
def test_compiled_fold_of_one_batch_equals_the_pure_one(deltas, held, watched):
    held_totals = {(*key[:3], "day", key[3]): (sums[0], sums[1]) for key, sums in held}
    watched_codes = RULES.by_code if watched else {}
    results = []
    for fold in (lambda *dicts: COMPILED(*dicts[:5], month_start, dicts[5]) and None, fold_deltas):
        dicts = (dict(deltas), dict(held_totals), {("z", "z", "z", "day", 0): (1, 1)}, {}, {})
        assert fold(*dicts, watched_codes) is None
        results.append([list(d.items()) for d in dicts[1:]])
    assert results[0] == results[1]
    totals, changed, latest_of, months = results[0]
    for (org, customer, code, day), (count, total, latest) in dict(deltas).items():
        day_key = (org, customer, code, "day", day)
        had = held_totals.get(day_key, (0, 0))
        assert dict(changed)[day_key] == dict(totals)[day_key] == (had[0] + count, had[1] + total)
        assert (code in watched_codes and latest > -1) == (day_key in dict(latest_of))
        assert dict(months)[day] == month_start(day)


@compiled_only
def test_compiled_fold_adds_to_totals_of_any_indexable_kind_and_exact_big_ints():
    totals = {("o", "c", "x", "day", 0): [2**64, -(2**200)]}  # a list, as a hand-made state may hold
    changed = {}
    assert COMPILED({("o", "c", "x", 0): (1, 2**200 + 5, 7)}, totals, changed, {}, {}, month_start, {})
    assert totals == changed == {("o", "c", "x", "day", 0): (2**64 + 1, 5),
                                          ("o", "c", "x", "month", 0): (1, 2**200 + 5)}
    assert list(changed) == [("o", "c", "x", "day", 0), ("o", "c", "x", "month", 0)]


@compiled_only
def test_compiled_fold_declines_deltas_not_made_by_the_shard_and_changes_nothing():
    totals = {("o", "c", "x", "day", 0): (1, 1)}
    for deltas in ({("o", "c", "x", 0): [1, 2, 3]}, {("o", "c", "x"): (1, 2, 3)}, {"k": (1, 2, 3)}):
        dicts = ({"ok": 1}, {}, {}, {})
        assert COMPILED(dict(deltas), totals, *dicts[1:], month_start, {}) is False
        assert totals == {("o", "c", "x", "day", 0): (1, 1)} and dicts[1:] == ({}, {}, {})
    logic = LiveTotalsLogic(LiveTotalsParams(shards=1))  # the logic folds them the pure way
    out, _ = logic.on_batch([CountedUsage({("o", "c", "x", 0): [1, 2, 3]})])
    assert out[0].totals == {("o", "c", "x", "day", 0): (1, 2), ("o", "c", "x", "month", 0): (1, 2)}


@compiled_only
def test_compiled_fold_raises_what_the_pure_one_raises():
    for fold in (lambda *dicts: COMPILED(*dicts[:5], month_start, dicts[5]), fold_deltas):
        with pytest.raises(TypeError):
            fold({("o", "c", "x", 0): (1, "2", 3)}, {("o", "c", "x", "day", 0): (1, 1)}, {}, {}, {}, {})
    with pytest.raises(TypeError):
        COMPILED({}, [], {}, {}, {}, month_start, {})


@compiled_only
def test_compiled_alerts_are_the_pure_ones():
    values = [CountedUsage({("o", "c", "api", 0): (3, 5 * 10**18, 1_000), ("o", "c", "x:y", DAY_MS): (1, 2 * 10**18, 9)},
                           watermark=0)]
    compiled = LiveTotalsLogic(LiveTotalsParams(shards=1, rules=RULES)).on_batch(values)[0]
    with pure_fold():
        pure = LiveTotalsLogic(LiveTotalsParams(shards=1, rules=RULES)).on_batch(values)[0]
    alerts = [item for item in compiled if isinstance(item, QuotaAlert)]
    assert alerts == [item for item in pure if isinstance(item, QuotaAlert)]
    assert {(a.code, a.period_kind, a.event_timestamp_ms) for a in alerts} == {
        ("api", "day", 1_000), ("api", "month", 1_000), ("x:y", "month", 9)}


def big_fold(fold) -> list:
    """Totals big enough that the fold prefetches their slots (past 2**14 slots), some
    deleted (evicted), and three batches folded into them: what each batch left."""
    rnd = random.Random(7)
    customers = [f"cus_{n:05d}:é%" for n in range(12_000)]
    totals = {("o", c, code, "day", DAY_MS * day): (1, rnd.randrange(-(10**30), 10**30))
              for c in customers for code in ("x", "api") for day in (0, 1)}
    for key in rnd.sample(sorted(totals), 6_000):
        del totals[key]
    results = []
    for _ in range(3):
        deltas = {("o", rnd.choice(customers), rnd.choice(("x", "api", "new")), DAY_MS * rnd.randrange(3)):
                  (rnd.randrange(1, 9), rnd.randrange(-(10**25), 10**25), rnd.randrange(10**12))
                  for _ in range(5_000)}
        changed, latest_of, months = {}, {}, {}
        fold(deltas, totals, changed, latest_of, months, RULES.by_code)
        results.append((list(totals.items()), list(changed.items()), list(latest_of.items())))
    return results


@compiled_only
def test_compiled_fold_into_big_totals_equals_the_pure_one():
    compiled = big_fold(lambda *dicts: COMPILED(*dicts[:5], month_start, dicts[5]))
    assert compiled == big_fold(fold_deltas)
    if sys.implementation.name == "cpython" and sys.version_info[:2] in ((3, 11), (3, 12)):
        assert live_module._compiled_fold.__self__.PREFETCH == 1  # the layout read right


class CopyingLogic(LiveTotalsLogic):
    """Shows provisional totals on a copy of all the totals, as before ``_provisional_totals``."""

    def _provisional_totals(self, provisional: list) -> dict:
        return dict(self.totals)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(USAGE, min_size=1, max_size=3), min_size=1, max_size=6), st.lists(st.booleans()))
def test_provisional_totals_shown_on_the_changed_ones_equal_those_shown_on_a_copy(batches, resumes):
    """The provisional deltas folded into the totals they change, or into a copy of all: the
    same output, alerts and state, with or without a resync due (after a resume)."""
    params = LiveTotalsParams(shards=1, rules=RULES, day_horizon_ms=10 * DAY_MS)
    changed_only, copying = LiveTotalsLogic(params), CopyingLogic(params)
    shared: list = []
    for number, drawn in enumerate(batches):
        values = [usage_of(usage, shared) for usage in drawn]
        values += [CountedUsage(usage.deltas, usage.watermark, True) for usage in values[:1]]
        assert outcome(changed_only.on_batch(values)[0]) == outcome(copying.on_batch(values)[0])
        assert list(changed_only.totals.items()) == list(copying.totals.items())
        assert list(changed_only._dirty.items()) == list(copying._dirty.items())
        assert (changed_only.alerted, changed_only.watermark, changed_only._shown) == \
            (copying.alerted, copying.watermark, copying._shown)
        assert changed_only.evicted_through_day == copying.evicted_through_day
        assert changed_only.snapshot() == copying.snapshot()
        if number < len(resumes) and resumes[number]:  # a resync is due: every total is shown
            changed_only = LiveTotalsLogic(params, changed_only.snapshot())
            copying = CopyingLogic(params, copying.snapshot())


@compiled_only
def test_presized_dicts_are_empty_dicts_that_fill_like_any():
    presized = live_module._presized
    for room in (0, 1, 5, 10_000):
        made = presized(room)
        assert type(made) is dict and made == {}
        made.update((key, key) for key in range(room + 3))
        assert list(made) == list(range(room + 3))
    assert presized(-5) == {}
    with pytest.raises(TypeError):
        presized("5")


COMPILED_ADD_DAYS = usage_module._compiled_add_days
GROUP = st.tuples(st.tuples(IDS, IDS, CODES), DAYS, st.one_of(st.integers(1, 5), HUGE), VALUES,
                  st.integers(-(2**64), 2**64))


def add_days_both_ways(counted: dict, groups: list, lengths: tuple = ()) -> tuple[list, list]:
    """``_add_days`` compiled and pure on copies of ``counted``: each dict's items, in order."""
    columns = [list(column) for column in zip(*groups)] if groups else [[] for _ in range(5)]
    for column, length in zip(columns, lengths):
        del column[length:]
    keys, starts, counts, totals, latest = columns
    results = []
    for compiled in (COMPILED_ADD_DAYS, None):
        kept, usage_module._compiled_add_days = usage_module._compiled_add_days, compiled
        try:
            into = dict(counted)
            usage_module._add_days(into, usage_module._Groups(starts, keys, counts, totals, latest))
        finally:
            usage_module._compiled_add_days = kept
        results.append(list(into.items()))
    return results[0], results[1]


@pytest.mark.skipif(COMPILED_ADD_DAYS is None, reason="the compiled live fold is not built (make install)")
@settings(max_examples=400, deadline=None)
@given(st.lists(GROUP, max_size=12), st.lists(GROUP, max_size=6), st.booleans(),
       st.lists(st.integers(0, 12), max_size=5))
def test_compiled_add_days_equals_the_pure_one(groups, held, repeat, lengths):
    """Into an empty dict (stored as they are, a repeated group overwriting) and into one
    holding some of the same days (summed, the later time kept)."""
    if repeat and groups:
        groups += groups[: len(groups) // 2]
    held_counted = {(*key, start): (count, total, latest) for key, start, count, total, latest in held}
    held_counted.update({(*key, start): (1, 2, 3) for key, start, *_ in groups[:2]})
    for counted in ({}, held_counted):
        compiled, pure = add_days_both_ways(counted, groups)
        assert compiled == pure
        compiled, pure = add_days_both_ways(counted, groups, tuple(lengths))  # zip: the shortest
        assert compiled == pure


@pytest.mark.skipif(COMPILED_ADD_DAYS is None, reason="the compiled live fold is not built (make install)")
def test_compiled_add_days_declines_what_it_cannot_add_and_changes_nothing():
    counted = {("o", "c", "x", 0): (1, 1, 1)}
    assert COMPILED_ADD_DAYS(counted, [["o", "c", "x"]], [0], [1], [2], [3]) is False
    assert COMPILED_ADD_DAYS(counted, [("o", "c", "x")], (0,), [1], [2], [3]) is False
    assert counted == {("o", "c", "x", 0): (1, 1, 1)}
    assert COMPILED_ADD_DAYS(counted, [("o", "c", "x")], [0], [1], [2], [3]) is True
    assert counted == {("o", "c", "x", 0): (2, 3, 3)}
    with pytest.raises(TypeError):
        COMPILED_ADD_DAYS(counted, [("o", "c", "x")], [0], [1], ["2"], [3])
    with pytest.raises(TypeError):
        COMPILED_ADD_DAYS([], [], [], [], [], [])
