"""Running totals per customer, code and period (UTC day and month), and quota crossings.

The keyed step after the shard's dedup and windows. It consumes ``CountedUsage`` (what a shard
counted in one batch: deduped, on time, summed per customer, code and day), keeps the ABSOLUTE
totals of every live (customer, code, period) in Bytewax state, and emits:

* ``LiveTotals``: every total that changed in the batch, absolute, for the Redis sink. Writing
  an absolute value is idempotent, so a replay after a crash converges on the exact totals;
* ``QuotaAlert`` the first time a total exceeds a quota threshold. "Already alerted" is part of
  the snapshotted state, so a committed epoch never alerts twice; the alert sink fences the
  uncommitted epoch that a replay repeats (``sinks.alerts``).

Memory stays bounded: a day period is dropped once the watermark has passed its end by the
horizon (2 days, or more with long windows: no event for it can be counted any more), a month
once the watermark is three calendar months on (the current month and the two before stay).
A logic resumed from a snapshot re-emits all its totals once, so Redis is rewritten after a
restart even for totals that never change again::

    >>> from operators.quotas import parse_quotas
    >>> from state.records import CountedUsage
    >>> rules = parse_quotas('[[quota]]\\ncode="api"\\nperiod="day"\\nmeasure="count"\\nthreshold=2\\n')
    >>> logic = LiveTotalsLogic(LiveTotalsParams(shards=1, rules=rules))
    >>> usage = CountedUsage({("org", "cus", "api", 0): (3, 5 * 10**18, 1_000)}, watermark=0)
    >>> out, _ = logic.on_batch([usage])
    >>> [(t[4], t[5], t[6]) for t in out[0].labelled()]
    [('1970-01-01', 3, 5000000000000000000), ('1970-01', 3, 5000000000000000000)]
    >>> [(a.period, a.threshold, a.observed) for a in out if isinstance(a, QuotaAlert)]
    [('1970-01-01', '2', '3')]
    >>> again, _ = logic.on_batch([usage])
    >>> [a for a in again if isinstance(a, QuotaAlert)]   # alerted once per period
    []
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache
from typing import Iterable

import bytewax.operators as op
import msgspec
from bytewax.operators import KeyedStream, StatefulBatchLogic

from operators.quotas import QuotaRules, plain_decimal
from state.compiled import compiled_function
from state.packing import pack_columns, pack_entries, unpack_entries
from state.utc_calendar import date_text, month_start_ms, next_month_start_ms
from state.utc_calendar import month_of as civil_month_of
from state.watermark import NO_WATERMARK

DAY_MS = 86_400_000
DEFAULT_DAY_HORIZON_MS = 2 * DAY_MS
MONTHS_KEPT = 2  # whole months kept before the watermark's month
STATE_VERSION = 1
_ASAP = datetime(1970, 1, 1, tzinfo=timezone.utc)  # a notify time that has always passed
_INTERFACE = 3  # the version of operators/_fastlive.c's functions this module calls
_compiled_fold = compiled_function("operators._fastlive", _INTERFACE, "fold")  # None: not built
_presized = compiled_function("operators._fastlive", _INTERFACE, "presized")

PeriodKey = tuple  # (organization_id, external_customer_id, code, period_kind, period_start_ms)


class LiveTotals(msgspec.Struct, frozen=True, gc=False):
    """Absolute running totals that changed, ``{PeriodKey: (count, total_scaled)}``.

    One item per batch, not one per total: the sink coalesces them per key anyway, and each
    item crossing a Bytewax step costs far more than a dict entry.
    """

    totals: dict

    def labelled(self):
        """``(org, customer, code, period_kind, period label, count, total_scaled)`` per total."""
        for (org, customer, code, kind, start), (count, total) in self.totals.items():
            yield org, customer, code, kind, period_label(kind, start), count, total


class QuotaAlert(msgspec.Struct, frozen=True, gc=False):
    """A running total that first exceeded a quota threshold in a period."""

    organization_id: str
    external_customer_id: str
    code: str
    period_kind: str
    period: str
    measure: str  # "count" | "value"
    threshold: str  # exact decimal text
    observed: str  # exact decimal text of the total when the crossing was seen
    event_timestamp_ms: int  # latest event time among the counted events that crossed it

    @property
    def identity(self) -> tuple:
        """What makes an alert unique: at most one per (customer, code, period, threshold)."""
        return (self.organization_id, self.external_customer_id, self.code, self.period,
                self.measure, self.threshold)


@dataclass(frozen=True)
class LiveTotalsParams:
    """What the state depends on; ``day_horizon_ms`` must cover the longest window."""

    shards: int
    rules: QuotaRules = field(default_factory=QuotaRules)
    day_horizon_ms: int = DEFAULT_DAY_HORIZON_MS


@dataclass(frozen=True)
class LiveTotalsSnapshot:
    """One shard's running totals; ``alerted`` holds the identities of fired alerts.

    ``totals`` is a tuple of packed segments (``state.packing``; a later segment's total
    replaces an earlier one's): a shard holds two totals per customer, code and day, and each
    epoch packs only those changed since the last snapshot (see ``LiveTotalsLogic.snapshot``).
    Earlier snapshots hold one packed ``bytes``, or the dict ``{PeriodKey: (count, total)}``;
    all resume. ``total_entries()`` reads any of them.
    """

    version: int
    shards: int
    watermark: int
    totals: tuple | bytes | dict
    alerted: frozenset
    evicted_through_day: int

    def total_entries(self) -> dict:
        """``{PeriodKey: (count, total_scaled)}``."""
        if isinstance(self.totals, dict):
            return dict(self.totals)
        segments = (self.totals,) if isinstance(self.totals, bytes) else self.totals
        entries: dict = {}
        for segment in segments:
            entries.update(unpack_entries(segment, key_width=5, factory=tuple))
        return entries


@lru_cache(maxsize=4096)
def day_label(day_start_ms: int) -> str:
    """``2026-01-31`` for a UTC day start (integer calendar: any time, even past year 9999)."""
    return date_text(day_start_ms)


@lru_cache(maxsize=4096)
def month_of(timestamp_ms: int) -> tuple[int, str, int]:
    """(month start ms, ``2026-01``, month index ``year * 12 + month - 1``) for a UTC time.

    Integer calendar arithmetic (``state.utc_calendar``), so December 9999 has a next month::

    >>> month_of(1_769_904_000_000 - 1)   # the last millisecond of January 2026
    (1767225600000, '2026-01', 24312)
    >>> month_of(253_402_300_799_999)[1:], month_of(253_402_300_800_000)[1:]
    (('9999-12', 119999), ('10000-01', 120000))
    """
    year, month = civil_month_of(timestamp_ms)
    return month_start_ms(timestamp_ms), f"{year:04d}-{month:02d}", year * 12 + month - 1


@lru_cache(maxsize=4096)
def month_start(timestamp_ms: int) -> int:
    """The start of the UTC month holding ``timestamp_ms``."""
    return month_of(timestamp_ms)[0]


def period_label(kind: str, start_ms: int) -> str:
    """``2026-01-31`` for a day, ``2026-01`` for a month."""
    return day_label(start_ms) if kind == "day" else month_of(start_ms)[1]


def fold_deltas(deltas: dict, totals: dict, changed: dict, latest_of: dict, months: dict,
                watched: dict) -> None:
    """Add ``deltas`` (``{(org, customer, code, day): (count, total_scaled, latest_ms)}``) to
    the ``totals`` of their day and month, storing each new total in ``totals`` and
    ``changed`` (day then month, in the deltas' order); for a code in ``watched``,
    ``latest_of[key]`` becomes the latest event time of its changed total. ``months`` caches
    the month start of each day. ``operators/_fastlive.c`` does the same, compiled::

        >>> totals, changed, latest = {("o", "c", "x", "day", 0): (1, 5)}, {}, {}
        >>> fold_deltas({("o", "c", "x", 0): (2, -7, 9)}, totals, changed, latest, {}, {"x": {}})
        >>> changed == totals == {("o", "c", "x", "day", 0): (3, -2), ("o", "c", "x", "month", 0): (2, -7)}
        True
        >>> latest
        {('o', 'c', 'x', 'day', 0): 9, ('o', 'c', 'x', 'month', 0): 9}
    """
    get = totals.get
    for (org, customer, code, day), (count, total, latest) in deltas.items():
        month = months.get(day)
        if month is None:
            month = months[day] = month_start(day)
        day_key = (org, customer, code, "day", day)
        month_key = (org, customer, code, "month", month)
        had = get(day_key)
        changed[day_key] = totals[day_key] = (
            (count, total) if had is None else (had[0] + count, had[1] + total))
        had = get(month_key)
        changed[month_key] = totals[month_key] = (
            (count, total) if had is None else (had[0] + count, had[1] + total))
        if code in watched:
            for key in (day_key, month_key):
                if latest_of.get(key, -1) < latest:
                    latest_of[key] = latest


def _changed_totals(values: list) -> dict:
    """An empty dict for the totals ``values`` change: with room for two a delta where the
    compiled module is built (grown from empty, a 5000-entry dict is rebuilt ten times)."""
    if _presized is None:
        return {}
    return _presized(2 * sum(len(usage.deltas) for usage in values))


class LiveTotalsLogic(StatefulBatchLogic):
    """Absolute running totals of one shard; emits the changed ones and first crossings."""

    def __init__(self, params: LiveTotalsParams, resume: LiveTotalsSnapshot | None = None) -> None:
        self.params = params
        if resume is not None and resume.version != STATE_VERSION:
            raise ValueError(f"live totals state version {resume.version} is not {STATE_VERSION}; "
                             "start a new recovery store")
        if resume is not None and resume.shards != params.shards:
            raise ValueError(
                f"live totals state was written with {resume.shards} shards, the flow now has "
                f"{params.shards}; keep TALLYFLOW_SHARDS or start a new recovery store")
        self.watermark = resume.watermark if resume else NO_WATERMARK
        self.totals: dict = resume.total_entries() if resume else {}
        self.alerted: set = set(resume.alerted) if resume else set()
        self.evicted_through_day = resume.evicted_through_day if resume else NO_WATERMARK
        self._resync = resume is not None and bool(self.totals)
        # Incremental snapshots: packed segments, and the totals changed since the last one
        # (a resumed state has no segments yet: its first snapshot packs every total afresh).
        self._segments: list[bytes] = []
        self._segment_entries = 0
        self._dirty: dict = {}
        self._shown: set = set()  # keys last written with provisional totals

    def on_batch(self, values: list) -> tuple[Iterable, bool]:
        provisional = [usage for usage in values if usage.provisional]
        if provisional:
            values = [usage for usage in values if not usage.provisional]
        out, keep = self._on_counted(values)
        if self._shown:  # totals a provisional flush showed: the real ones replace them
            out.append(LiveTotals({key: self.totals.get(key, (0, 0)) for key in self._shown}))
            self._shown = set()
        if provisional:
            out += self._show_provisional(provisional)
        return out, keep

    def _show_provisional(self, provisional: list) -> list:
        """The end of input flushed undecided events: show state + them, keep only the state.

        Alerts for crossings they make are sent (and remembered) like any other.
        """
        kept = (self.totals, self.evicted_through_day, self._segments, self._segment_entries,
                self._dirty)
        self.totals, self._dirty = self._provisional_totals(provisional), {}
        try:
            out, _ = self._on_counted(provisional)
            self._shown = {key for item in out if isinstance(item, LiveTotals) for key in item.totals}
        finally:
            (self.totals, self.evicted_through_day, self._segments, self._segment_entries,
             self._dirty) = kept
        return out

    def _provisional_totals(self, provisional: list) -> dict:
        """The totals to fold the provisional deltas into, then drop: the ones they change
        (all that the fold reads, and the alerts), not a copy of all (~30 ns a total, at each
        batch of the end of input). All while a resync is due: it emits every total.

            >>> logic = LiveTotalsLogic(LiveTotalsParams(shards=1))
            >>> from state.records import CountedUsage
            >>> _ = logic.on_batch([CountedUsage({("o", c, "x", 0): (1, 1, 0) for c in "ab"})])
            >>> logic._provisional_totals([CountedUsage({("o", "a", "x", 0): (1, 1, 0)})])
            {('o', 'a', 'x', 'day', 0): (1, 1), ('o', 'a', 'x', 'month', 0): (1, 1)}
        """
        totals = self.totals
        if self._resync:
            return dict(totals)
        changed: dict = {}
        for usage in provisional:
            for org, customer, code, day in usage.deltas:
                for key in ((org, customer, code, "day", day),
                            (org, customer, code, "month", month_start(day))):
                    had = totals.get(key)
                    if had is not None:
                        changed[key] = had
        return changed

    def _on_counted(self, values: list) -> tuple[list, bool]:
        changed = _changed_totals(values)
        latest_of, months = {}, {}  # latest_of: latest event time, watched codes only
        for usage in values:
            self._fold(usage.deltas, changed, latest_of, months)
            if usage.watermark > self.watermark:
                self.watermark = usage.watermark
        self._dirty.update(changed)
        out: list = [self._resync_all() if self._resync else LiveTotals(changed)]
        if latest_of:
            out.extend(self._crossings(latest_of))
        self._evict()
        return out, StatefulBatchLogic.RETAIN

    def _fold(self, deltas: dict, changed: dict, latest_of: dict, months: dict) -> None:
        """Add one batch's deltas to the totals (``fold_deltas``), compiled where built."""
        watched = self.params.rules.by_code
        if _compiled_fold is None or not _compiled_fold(
                deltas, self.totals, changed, latest_of, months, month_start, watched):
            fold_deltas(deltas, self.totals, changed, latest_of, months, watched)

    def _crossings(self, latest_of: dict[PeriodKey, int]) -> list[QuotaAlert]:
        """First crossings among the changed totals of watched codes (``latest_of``: key ->
        latest event time in this batch)."""
        alerts = []
        watched = self.params.rules.by_code
        for key, latest in latest_of.items():
            rules = watched[key[2]].get(key[3])
            if not rules:
                continue
            org, customer, code, kind, start = key
            count, total = self.totals[key]
            for rule in rules:
                if rule.observed(count, total) <= rule.threshold_scaled:
                    continue
                identity = (org, customer, code, kind, start, rule.measure, rule.threshold_scaled)
                if identity in self.alerted:
                    continue
                self.alerted.add(identity)
                observed = str(count) if rule.measure == "count" else plain_decimal(total)
                alerts.append(QuotaAlert(org, customer, code, kind, period_label(kind, start),
                                         rule.measure, rule.threshold_text, observed, latest))
        return alerts

    def _evict(self) -> None:
        """Drop periods no event can reach any more (see the module docstring)."""
        if self.watermark == NO_WATERMARK:
            return
        horizon_day = (self.watermark - self.params.day_horizon_ms) // DAY_MS * DAY_MS
        if horizon_day <= self.evicted_through_day:
            return
        self.evicted_through_day = horizon_day
        oldest_month = month_of(self.watermark)[2] - MONTHS_KEPT

        def expired(kind: str, start: int) -> bool:
            if kind == "day":
                return start + DAY_MS <= horizon_day
            # A month also waits for the horizon, in case DEDUP_HORIZON is longer than months.
            next_month = next_month_start_ms(start)
            return month_of(start)[2] < oldest_month and next_month <= horizon_day

        gone = [k for k in self.totals if expired(k[3], k[4])]
        for key in gone:
            del self.totals[key]
        if gone:  # segments cannot say "deleted": the next snapshot packs afresh
            self._segments = []
        self.alerted = {a for a in self.alerted if not expired(a[3], a[4])}

    def _resync_all(self) -> LiveTotals:
        self._resync = False
        return LiveTotals(dict(self.totals))

    def on_notify(self) -> tuple[Iterable, bool]:
        return ([self._resync_all()] if self._resync else []), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable, bool]:
        return ([self._resync_all()] if self._resync else []), StatefulBatchLogic.RETAIN

    def notify_at(self) -> datetime | None:
        return _ASAP if self._resync else None

    def snapshot(self) -> LiveTotalsSnapshot:
        """The totals as packed segments: only those changed since the last snapshot are
        packed, as a new segment; once the segments hold more than twice the live totals
        (superseded ones, or evicted periods) they are packed afresh as one. So the work per
        epoch follows the changes (amortised), not the number of live totals. An eviction
        empties the segments, so every changed total packed as a segment is still live.

            >>> logic = LiveTotalsLogic(LiveTotalsParams(shards=1))
            >>> from state.records import CountedUsage
            >>> _ = logic.on_batch([CountedUsage({("o", c, "x", 0): (1, 1, 0) for c in "abc"})])
            >>> _ = logic.snapshot()
            >>> _ = logic.on_batch([CountedUsage({("o", "a", "x", 0): (1, 1, 0)})])
            >>> snapshot = logic.snapshot()
            >>> len(snapshot.totals), snapshot.total_entries()[("o", "a", "x", "day", 0)]
            (2, (2, 2))
        """
        dirty, totals = self._dirty, self.totals
        if dirty or not self._segments:
            entries = self._segment_entries + len(dirty)
            if not self._segments or entries > 2 * len(totals):
                self._segments = [pack_entries(totals, key_width=5, big=1)]
                entries = len(totals)
            else:
                self._segments.append(pack_columns(dirty, list(dirty.values()),
                                                   key_width=5, big=1))
            self._segment_entries = entries
            self._dirty = {}
        return LiveTotalsSnapshot(STATE_VERSION, self.params.shards, self.watermark,
                                  tuple(self._segments), frozenset(self.alerted),
                                  self.evicted_through_day)


@dataclass(frozen=True)
class LiveTotalsOut:
    """The live-totals step's streams, one per type, keyed by shard."""

    totals: KeyedStream[LiveTotals]
    """Changed running totals per customer, code and UTC day/month (for Redis)."""
    alerts: KeyedStream[QuotaAlert]
    """First crossings of a quota threshold."""


def live_totals(step_id: str, up: KeyedStream, params: LiveTotalsParams) -> LiveTotalsOut:
    """The keyed live-totals step on ``up`` (the shard step's counted usage) and its typed
    output streams, built here only. ``step_id`` names the stateful step (its recovery state)."""
    out = op.stateful_batch(step_id, up, lambda resume: LiveTotalsLogic(params, resume))
    return LiveTotalsOut(
        totals=op.filter_value(f"{step_id}_totals", out, lambda item: type(item) is LiveTotals),
        alerts=op.filter_value(f"{step_id}_alerts", out, lambda item: type(item) is QuotaAlert),
    )
