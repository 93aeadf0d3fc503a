"""The keyed half of the flow: dedup, window and aggregate the events of one shard.

A shard owns the organizations that hash to it (see ``operators.intake.shard_of``).
It hears from every Kafka partition, so it can take the minimum of their
watermarks and close windows the way a single-partition stream would::

    >>> from state.records import ShardBatch, ShardEvent
    >>> from state.window_kinds import TumblingWindows
    >>> logic = UsageWindowLogic(UsageWindowParams(TumblingWindows(60_000), 86_400_000, 1))
    >>> event = ShardEvent(1, "org", "cust", "api_calls", 30_000, 2 * 10**18, 0, 7, "t1", None)
    >>> rows, _ = logic.on_batch([ShardBatch(0, 1, 65_000, False, [event, event])])
    >>> [(r.window_start_ms, r.event_count, r.total_scaled) for r in rows], logic.duplicates
    ([(0, 1, 2000000000000000000)], 1)

Every window store decides with the event's ``watermark_before`` (its own
partition's watermark just before it), so what counts where is the same on
every replay. Windows are emitted when the flow's watermark passes their end,
corrected while within the allowed lateness, then forgotten.
"""

from __future__ import annotations

import copy
import heapq
import json
import time
from dataclasses import dataclass, field
from itertools import compress, groupby, repeat
from operator import add, attrgetter, mul, not_
from typing import Iterable

import bytewax.operators as op
import numpy as np
from bytewax.operators import KeyedStream, StatefulBatchLogic

from operators.telemetry import metrics, tracing
from operators.telemetry.tracing import SinkTrace
from operators.catalog import Catalog, MetricDefinition
from state.aggregations import Sum
from state.compiled import compiled_function
from state.counted import CountedCopies, CountedSnapshot
from state.held import VALUE_UNIT, HeldEvents, HeldSnapshot, Ready, scaled_values, time_range
from state.records import (CountedUsage, LateRecord, MetricRow, ShardBatch, ShardEvent, WindowRow, WindowRowBlock,
                           WindowRows, expanded, row_count)
from state.sessions import SessionStore
from state.watermark import END_OF_STREAM, NO_WATERMARK, FlowWatermark
from state.window_kinds import SessionWindows, SlidingWindows, TumblingWindows, WindowKind
from state.windows import AggregateWindowStore, WindowStore

ROLLUP_SIZES_MS = {"hour": 3_600_000, "day": 86_400_000}
_DAY_MS = 86_400_000
_TIMESTAMP = attrgetter("timestamp_ms")
_HALF_UNIT = 10**9  # as in state.held: a fraction of VALUE_UNIT as two parts below 10**9
_FASTLIVE_INTERFACE = 3  # the version of operators/_fastlive.c's add_days() called here
_compiled_add_days = compiled_function("operators._fastlive", _FASTLIVE_INTERFACE, "add_days")  # None: not built
_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class UsageWindowParams:
    """Parameters a shard's state depends on; a resume with others fails loudly."""

    windows: WindowKind
    dedup_horizon_ms: int
    shards: int
    allowed_lateness_ms: int = 0
    rollups: tuple[str, ...] = ()
    catalog: Catalog = field(default_factory=Catalog)
    emit_counted_usage: bool = False


@dataclass(frozen=True)
class UsageShardSnapshot:
    """Everything one shard needs to resume exactly where its snapshot was taken."""

    shards: int
    watermark: FlowWatermark
    decided_through: int
    counted: CountedSnapshot  # digest -> event time of its counted copy
    reported_late: dict  # digest -> event time of its late copy in usage_late_events
    pending: HeldSnapshot  # the on-time events waiting for their decision, by due point
    usage: object
    rollups: dict
    metrics: dict
    pending_late: dict  # decision point -> [(event time, partition, offset, digest, LateRecord)]
    duplicates: int
    metric_fingerprints: dict | None = None  # {metric name: MetricDefinition.fingerprint}; None: older state
    topic: str = ""


class UsageWindowLogic(StatefulBatchLogic[ShardBatch, object, UsageShardSnapshot]):
    """Dedup by transaction, then aggregate per (org, customer, code, window).

    On-time events wait until every partition's watermark has passed the end of
    their last window (+ lateness): by then every on-time copy of their
    transaction that could come before them has arrived, so they are decided in
    (event time, partition, offset) order and the outcome depends only on the
    input (the README's rule). Windows close at that same watermark, so rows are
    not delayed. Late copies wait one dedup horizon more, for every counted copy
    within the horizon after them.

    Emits ``WindowRow`` (usage windows and rollups), ``MetricRow`` (catalog
    metrics), ``LateRecord`` (late events that are not copies of a counted
    transaction) and, when enabled, one ``CountedUsage`` per batch.
    """

    row_blocks = False
    """Whether a window's first emission leaves as one ``WindowRowBlock`` (the flow's
    :class:`RowBatchingLogic`) rather than a ``WindowRow`` per key."""

    def __init__(self, params: UsageWindowParams, resume: UsageShardSnapshot | None = None) -> None:
        self.params = params
        if resume is not None and resume.shards != params.shards:
            raise ValueError(
                f"recovery state was written with {resume.shards} shards, the flow now has "
                f"{params.shards}; keep TALLYFLOW_SHARDS or start a new recovery store"
            )
        if resume is not None:
            _check_same_outputs(params, resume)
            if not hasattr(resume, "decided_through"):
                raise ValueError(
                    "recovery state written by a tallyflow that deduplicated in arrival order (before "
                    "the dedup rule of the README); its state cannot be carried over. Let that version "
                    "finish, or start a new recovery store")
        lateness = params.allowed_lateness_ms
        step, end_offset = params.windows.last_end_steps()
        self._due_step, self._due_offset = step, end_offset + lateness
        delay = _longest_window(params.windows)
        self.watermark = resume.watermark.resumed() if resume else FlowWatermark()
        self.decided_through = resume.decided_through if resume else NO_WATERMARK
        self.counted = CountedCopies(params.dedup_horizon_ms, resume.counted if resume else None)
        self.reported_late: dict = dict(resume.reported_late) if resume else {}
        self.held = _held(params.windows, self._due_step, self._due_offset,
                          resume.pending if resume else None)
        self.pending_late: dict[int, list] = (
            {at: list(entries) for at, entries in resume.pending_late.items()} if resume else {})
        self._late_points = list(self.pending_late)
        heapq.heapify(self._late_points)
        self._pruned_at = NO_WATERMARK
        self.topic = resume.topic if resume else ""
        self.usage = _store(params.windows, Sum(), lateness, resume.usage if resume else None,
                            fast_usage=True, keep_ms=_settle_extra(params.windows),
                            decided_after=delay + lateness)
        # Rollups count exactly what the usage windows count: they stay open long
        # enough for any event the usage windows can still accept.
        rollup_lateness = lateness + delay
        self.rollups = {
            grain: WindowStore(TumblingWindows(ROLLUP_SIZES_MS[grain]),
                               resume.rollups.get(grain) if resume else None, rollup_lateness, grain)
            for grain in params.rollups
        }
        # Events reach the metric stores when the usage windows decide them.
        self.metric_stores = [
            _store(m.windows, m.aggregation, lateness, resume.metrics.get(m.name) if resume else None,
                   recurring=m.recurring, keep_ms=delay, decided_after=delay + lateness)
            for m in params.catalog.metrics
        ]
        self.duplicates = resume.duplicates if resume else 0
        self.window_tracing = tracing.WindowTracing()  # sampled events' spans; not snapshotted

    # -- input ---------------------------------------------------------------

    def on_batch(self, values: list[ShardBatch]) -> tuple[Iterable[object], bool]:
        out: list = []
        counted: dict | None = {} if self.params.emit_counted_usage else None
        duplicates_before = self.duplicates
        for batch in values:
            self._accept(batch, out)
            self.watermark.report(batch.partition, batch.n_partitions, batch.watermark,
                                  batch.at_end, batch.idle)
            if batch.traces:
                self.window_tracing.add(batch.traces)
        decided = max(self.decided_through, self.watermark.current)
        self._decide(decided, out, counted)
        self.decided_through = decided
        closed = self._emit(decided, decided)
        if self.watermark.closing == END_OF_STREAM and (self.held or self.pending_late):
            closed += self._provisional_flush(decided, out)
        out.extend(closed)
        if self.window_tracing.pending:
            out.extend(self.window_tracing.closed(expanded(closed)))
        if counted:
            out.append(CountedUsage(counted, self.decided_through))
        metrics.record_duplicates(self.duplicates - duplicates_before)
        metrics.record_windows_closed(row_count(closed))
        return out, StatefulBatchLogic.RETAIN

    def _accept(self, batch: ShardBatch, out: list) -> None:
        """Put the batch's on-time events and late copies where they wait for their decision."""
        if batch.topic:
            self.topic = batch.topic
        self._hold(batch.partition, batch.events, out)
        for _due, digest, record in batch.late:
            point = self._late_point(record.timestamp_ms)
            if record.watermark_ms >= point:
                out.append(record)  # more than the horizon late: reported, never deduplicated
                continue
            entries = self.pending_late.get(point)
            if entries is None:
                entries = self.pending_late[point] = []
                heapq.heappush(self._late_points, point)
            entries.append((record.timestamp_ms, record.source_partition, record.source_offset,
                            digest, record))

    def _hold(self, partition: int, events: list[ShardEvent], out: list) -> None:
        """Hold ``events`` in their buckets, a bucket's in their order; an event already due
        (only after IDLE_TIMEOUT let the watermark run ahead of a partition) is written late.
        Most batches fall in one bucket whole: due points grow with the time."""
        if not events:
            return
        step, offset, granule, decided = self._due_step, self._due_offset, self.held.granule, self.decided_through
        first, last = time_range(events)
        first_due, last_due = first - first % step + offset, last - last % step + offset
        first_key, last_key = first_due // granule, last_due // granule
        if first_due > decided and last_key - first_key <= 1:
            self._hold_in(first_key, last_key, partition, events)
            return
        times = np.fromiter(map(_TIMESTAMP, events), np.int64, len(events))
        dues = times - times % step + offset
        buckets, late = dues // granule, dues <= decided
        for position in np.flatnonzero(late).tolist():
            out.append(self._late_at_shard(partition, events[position], "window_closed_idle_partition", decided))
            metrics.record_late(1)
        on_time = np.flatnonzero(~late)
        keys, firsts = np.unique(buckets[on_time], return_index=True)
        for key in keys[np.argsort(firsts)].tolist():  # in the order first met
            positions = on_time[buckets[on_time] == key]
            self.held.add(key, partition, list(map(events.__getitem__, positions.tolist())))

    def _hold_in(self, first_key: int, last_key: int, partition: int, events: list[ShardEvent]) -> None:
        """Hold ``events`` of the bucket ``first_key`` or the next, ``last_key``: split at the
        first time due in the next (due points grow with the time), in the order first met."""
        if first_key == last_key:
            self.held.add(first_key, partition, events)
            return
        step = self._due_step
        threshold = -((self._due_offset - last_key * self.held.granule) // step) * step
        earlier = list(map(threshold.__gt__, map(_TIMESTAMP, events)))
        parts = {first_key: list(compress(events, earlier)), last_key: list(compress(events, map(not_, earlier)))}
        for key in (first_key, last_key) if earlier[0] else (last_key, first_key):
            self.held.add(key, partition, parts[key])

    def _late_point(self, timestamp: int) -> int:
        """When a late copy at ``timestamp`` is decided: every on-time copy within the
        horizon after it has been decided by then."""
        later = timestamp + self.params.dedup_horizon_ms
        return later - later % self._due_step + self._due_offset

    # -- decisions -----------------------------------------------------------

    def _decide(self, watermark: int, out: list, counted: dict | None) -> None:
        """Decide, in (event time, partition, offset) order, every copy the watermark settled."""
        ready = self.held.take_through(watermark)
        if ready is not None:  # in (event time, partition, offset) order
            fresh = self._first_copies(ready)
            if isinstance(self.params.windows, TumblingWindows):
                self._count_tumbling(ready, fresh, counted, out)
            else:
                for partition, event in zip(ready.partitions[fresh].tolist(), ready.rebuilt(fresh)):
                    self._count_one(partition, event, out, counted)
        points, late = self._late_points, []
        while points and points[0] <= watermark:
            late += self.pending_late.pop(heapq.heappop(points))
        if late:
            late.sort()
            out.extend(self._new_late(late))
        self._prune(watermark)

    def _first_copies(self, ready: Ready) -> np.ndarray:
        """The positions of the copies that count: no counted copy of their id within the
        horizon before them."""
        fresh = np.flatnonzero(self.counted.count(ready.digests, ready.times))
        self.duplicates += len(ready) - len(fresh)
        return fresh

    def _new_late(self, late: list) -> list[LateRecord]:
        """Late copies with no counted copy within the horizon (either side) and no reported
        late copy within the horizon before them."""
        horizon, released = self.params.dedup_horizon_ms, []
        for timestamp, _p, _o, digest, record in late:
            reported = self.reported_late.get(digest)
            if self.counted.near(digest, timestamp) or (
                    reported is not None and timestamp - reported < horizon):
                self.duplicates += 1
                continue
            self.reported_late[digest] = timestamp
            released.append(record)
        return released

    def _prune(self, watermark: int) -> None:
        """Forget ids no decision can need any more (exact: decisions compare event times)."""
        horizon = self.params.dedup_horizon_ms
        if watermark == NO_WATERMARK or watermark - self._pruned_at < max(horizon // 16, 1):
            return
        self._pruned_at = watermark
        # Undecided copies are later than watermark - the longest wait; late ones compare
        # both ways within the horizon.
        cutoff = watermark - 2 * horizon - _longest_window(self.params.windows) \
            - self.params.allowed_lateness_ms
        self.counted.forget_through(cutoff)
        for digest, timestamp in list(self.reported_late.items()):
            if timestamp <= cutoff:
                del self.reported_late[digest]

    def _count_tumbling(self, ready: Ready, fresh: np.ndarray, counted: dict | None,
                        out: list) -> None:
        """The hot path: sum the decided copies per (window, key) first, then touch the stores
        once per group.

        Rollups and the counted days are bucketed by the event's own time, not by its
        window's start (a 1-day window's events spread over 24 hourly rows; with 7-minute
        windows an event at 00:01 belongs to its own day). Where a grain is a multiple of
        the window size the window groups nest in the grain's groups (epoch-aligned windows
        nest in hours and days), and are summed up to it; otherwise the events are summed
        per (grain, key) afresh.

        Intake already sent aside events too late for their window, and rollups stay
        open longer than the usage windows, so no per-event check is needed.
        """
        if not len(fresh):
            return
        times, key_ids = ready.times[fresh], ready.key_ids[fresh]
        if ready.events:  # events with catalog metric values, in decision order
            counts = np.zeros(len(ready), dtype=bool)
            counts[fresh] = True
            partitions = ready.partitions
            for position, event in ready.events.items():
                if counts[position]:
                    self._add_metrics(int(partitions[position]), event, event.watermark_before, out)
        size = self.params.windows.size_ms
        windows = _Sums.of(ready, fresh, times, key_ids, size)
        window_groups = windows.groups(ready.keys)
        _add_groups(self.usage, window_groups)
        days = None
        for grain, store in self.rollups.items():
            groups = _grain_groups(ready, fresh, windows, window_groups, ROLLUP_SIZES_MS[grain], size)
            _add_groups(store, groups)
            if grain == "day":
                days = groups
        if counted is not None:
            if days is None:
                days = _grain_groups(ready, fresh, windows, window_groups, _DAY_MS, size)
            _add_days(counted, days)

    def _count_one(self, partition: int, event: ShardEvent, out: list, counted: dict | None) -> None:
        timestamp, value, seen = event.timestamp_ms, event.value_scaled, event.watermark_before
        key = (event.organization_id, event.external_customer_id, event.code)
        if not self._add_usage(key, timestamp, value, seen):
            out.append(self._late_at_shard(partition, event, "window_closed_idle_partition", seen))
            metrics.record_late(1)  # intake counted it on time; rollup or metric misses are not late events
            return
        for grain, store in self.rollups.items():
            start = timestamp - timestamp % ROLLUP_SIZES_MS[grain]
            if store.accepts(start, seen):
                store.add(start, key, value)
            else:
                out.append(self._late_at_shard(partition, event, f"window_closed:{grain}", seen))
        if event.metric_values:
            self._add_metrics(partition, event, seen, out)
        if counted is not None:
            day_key = (*key, timestamp - timestamp % _DAY_MS)
            count, total, latest = counted.get(day_key, (0, 0, timestamp))
            counted[day_key] = (count + 1, total + value, max(latest, timestamp))

    def _add_usage(self, key: tuple, timestamp: int, value: int, seen: int) -> bool:
        usage = self.usage
        if isinstance(usage, SessionStore):
            return usage.add(key, timestamp, value, seen)
        added = False
        for start in self.params.windows.starts_for(timestamp):
            if usage.accepts(start, seen):
                usage.add(start, key, value)
                added = True
        return added

    def _add_metrics(self, partition: int, event: ShardEvent, seen: int, out: list) -> None:
        org, customer, timestamp = event.organization_id, event.external_customer_id, event.timestamp_ms
        for index, group, value in event.metric_values:
            if not self.metric_stores[index].add((org, customer, group), timestamp, value, seen):
                name = self.params.catalog.metrics[index].name
                out.append(self._late_at_shard(partition, event, f"window_closed:metric:{name}", seen))

    def _late_at_shard(self, partition: int, event: ShardEvent, reason: str, seen: int) -> LateRecord:
        org, customer, code = event.organization_id, event.external_customer_id, event.code
        timestamp, value, offset, txn = event.timestamp_ms, event.value_scaled, event.offset, event.transaction_id
        raw = json.dumps({"transaction_id": txn, "organization_id": org,
                          "external_customer_id": customer, "code": code,
                          "timestamp": timestamp}).encode()
        return LateRecord(org, customer, code, txn, timestamp, value, reason, seen,
                          self.topic, partition, offset, raw)

    # -- output --------------------------------------------------------------

    def _emit(self, closing: int, watermark: int, provisional: bool = False) -> list:
        return [row for metric, rows in self._emitted(closing, watermark, provisional)
                for row in _as_rows(metric, rows)]

    def _emitted(self, closing: int, watermark: int, provisional: bool) -> list[tuple]:
        """``(metric or None, the store's rows)`` for every store, in :meth:`_stores` order."""
        emitted = []
        if isinstance(self.usage, SessionStore):
            emitted.append((None, self.usage.emit(closing, watermark, provisional)))
        else:
            emitted.append((None, self.usage.emit_closed(closing, watermark, provisional,
                                                         self.row_blocks)))
        for store in self.rollups.values():
            emitted.append((None, store.emit_closed(closing, watermark, provisional, self.row_blocks)))
        for metric, store in zip(self.params.catalog.metrics, self.metric_stores):
            emitted.append((metric, store.emit(closing, watermark, provisional)))
        return emitted

    def _stores(self) -> list:
        return [self.usage, *self.rollups.values(), *self.metric_stores]

    def _provisional_flush(self, watermark: int, out: list) -> list:
        """The end of input (``KAFKA_STOP_AT_END``) with copies still undecided: write rows as
        if the input ended here, without deciding anything.

        A copy of the state decides every waiting copy and emits provisional rows (they
        outrank real rows of this watermark and lose to any later one); the state itself
        keeps waiting, so a later run with more input decides by the rule, and writes again
        (or deletes) every row written here. Late copies decided here go out for good.
        """
        scratch = self._scratch()
        counted: dict | None = {} if self.params.emit_counted_usage else None
        scratch._decide(END_OF_STREAM, out, counted)
        emitted = scratch._emitted(END_OF_STREAM, watermark, provisional=True)
        rows = []
        for real, (metric, store_rows) in zip(self._stores(), emitted):
            real.owe(store_rows, watermark)
            rows += _as_rows(metric, store_rows)
        if counted:
            out.append(CountedUsage(counted, self.decided_through, provisional=True))
        return rows

    def _scratch(self) -> UsageWindowLogic:
        """A copy of the shard to decide and emit on, then drop: what
        ``UsageWindowLogic(self.params, self._snapshot())`` resumes, without packing every
        store to bytes and back (a tenth of the cost at one row per event)."""
        scratch = copy.copy(self)  # the parameters and counters; what changes is copied below
        scratch.watermark = self.watermark.resumed()
        scratch.counted = self.counted.copy()
        scratch.reported_late = dict(self.reported_late)
        scratch.held = self.held.copy()
        scratch.pending_late = {at: list(entries) for at, entries in self.pending_late.items()}
        scratch._late_points = list(self._late_points)
        scratch._pruned_at = NO_WATERMARK
        scratch.usage = self.usage.copy()
        scratch.rollups = {grain: store.copy() for grain, store in self.rollups.items()}
        scratch.metric_stores = [store.copy() for store in self.metric_stores]
        scratch.window_tracing = tracing.WindowTracing()
        return scratch

    def snapshot(self) -> UsageShardSnapshot:
        started = time.perf_counter()
        snapshot = self._snapshot()
        metrics.record_snapshot(time.perf_counter() - started)
        return snapshot

    def _snapshot(self) -> UsageShardSnapshot:
        return UsageShardSnapshot(
            self.params.shards,
            self.watermark.copy(),
            self.decided_through,
            self.counted.snapshot(),
            dict(self.reported_late),
            self.held.snapshot(),
            self.usage.snapshot(),
            {grain: store.snapshot() for grain, store in self.rollups.items()},
            {m.name: s.snapshot() for m, s in zip(self.params.catalog.metrics, self.metric_stores)},
            {at: tuple(entries) for at, entries in self.pending_late.items()},
            self.duplicates,
            {m.name: m.fingerprint for m in self.params.catalog.metrics},
            self.topic,
        )


class RowBatchingLogic(UsageWindowLogic):
    """The shard logic of the flow: its rows leave as one ``WindowRows`` per table and batch,
    and a window's first emission as one ``WindowRowBlock`` (columns).

    The state and every decision are :class:`UsageWindowLogic`'s; only the shape of the
    output differs, so the engine moves a few items per batch instead of one per row.
    """

    row_blocks = True

    def on_batch(self, values: list[ShardBatch]) -> tuple[Iterable[object], bool]:
        out, retain = super().on_batch(values)
        return rows_batched(out), retain


def rows_batched(out: list) -> list:
    """``out`` with its ``WindowRow`` s gathered into one ``WindowRows`` per grain (table), in
    their order; the other items as they were.

        >>> rows = [WindowRow("o", "c", "x", 0, 60_000, 1, 5, 1), WindowRow("o", "c", "x", 0, 3_600_000, 1, 5, 1, grain="hour"),
        ...         WindowRow("o", "d", "x", 0, 60_000, 1, 5, 1)]
        >>> [(b.grain, len(b.rows)) for b in rows_batched(rows)]
        [('', 2), ('hour', 1)]
    """
    by_grain: dict[str, list[WindowRow]] = {}
    rest = []
    for item in out:
        if item.__class__ is WindowRow:
            rows = by_grain.get(item.grain)
            if rows is None:
                rows = by_grain[item.grain] = []
            rows.append(item)
        else:
            rest.append(item)
    rest.extend(WindowRows(grain, rows) for grain, rows in by_grain.items())
    return rest


@dataclass(frozen=True)
class UsageWindowsOut:
    """What the shard step emits, one stream per type, each keyed by shard (like Bytewax's
    ``WindowOut``): no step downstream sorts items by type."""

    rows: KeyedStream[WindowRows | WindowRowBlock]
    """``usage_aggregates`` rows and their hourly and daily rollups, a batch per table (``grain``)."""
    metric_rows: KeyedStream[MetricRow]
    """Rows of the catalog's metrics (``metric_aggregates``)."""
    late: KeyedStream[LateRecord]
    """Events too late for a window they belong to."""
    counted: KeyedStream[CountedUsage]
    """Per batch, what was counted per customer, code and UTC day (for the live totals)."""
    traces: KeyedStream[SinkTrace]
    """Sampled events' trace carriers, for the sink's insert spans (tracing on only)."""


_ROW_ITEMS = (WindowRows, WindowRowBlock)
_RARER_STREAMS = {MetricRow: "metric_rows", LateRecord: "late", CountedUsage: "counted",
                  SinkTrace: "traces"}


def usage_windows(step_id: str, up: KeyedStream[ShardBatch], params: UsageWindowParams) -> UsageWindowsOut:
    """The keyed windowing step on ``up`` and its typed output streams, built here only.

    ``step_id`` names the stateful step (its recovery state); the split steps are stateless.
    Rows, most of the output, leave in batches (``WindowRows``) after one step; the rarer
    kinds are split among the rest (each extra step costs every item passing it about 0.4 µs).
    """
    out = op.stateful_batch(step_id, up, lambda resume: RowBatchingLogic(params, resume))
    rows_or_rest = op.branch(f"{step_id}_rows", out, lambda key_item: type(key_item[1]) in _ROW_ITEMS)
    streams = {
        name: op.filter_value(f"{step_id}_{name}", rows_or_rest.falses, lambda item, kind=kind: type(item) is kind)
        for kind, name in _RARER_STREAMS.items()
    }
    return UsageWindowsOut(rows=rows_or_rest.trues, **streams)


def _check_same_outputs(params: UsageWindowParams, resume: UsageShardSnapshot) -> None:
    """Refuse a resume whose rollup grains or catalog metrics differ from the snapshot's.

    A grain or metric switched on (or changed) mid-stream would start from nothing in the
    middle of its windows and write a row that looks complete (a day read 1 instead of 9);
    one switched off drops its state, so switching it back on later does the same. Only a
    new recovery store can change them.
    """
    had, has = tuple(sorted(resume.rollups)), tuple(sorted(params.rollups))
    if had != has:
        raise ValueError(
            f"ROLLUPS: the recovery state carries rollups {_listed(had)}, the flow now has "
            f"{_listed(has)}; a grain switched on or off mid-stream would restart its totals "
            "inside open windows. Set ROLLUPS back, or start a new recovery store")
    had_metrics = resume.metric_fingerprints
    if had_metrics is None:
        had_metrics = {name: None for name in resume.metrics}
    now = {m.name: m.fingerprint for m in params.catalog.metrics}
    changed = sorted(name for name in set(had_metrics) | set(now)
                     if name not in had_metrics or name not in now
                     or had_metrics[name] not in (None, now[name]))
    if changed:
        details = "; ".join(f"{name}: {_described(had_metrics, name)} -> {_described(now, name)}"
                            for name in changed)
        raise ValueError(
            f"METRICS_FILE: the catalog differs from the one the recovery state was built with "
            f"({details}); a metric added, removed or changed mid-stream would restart its totals "
            "inside open windows. Restore the file, or start a new recovery store")


def _described(fingerprints: dict, name: str) -> str:
    if name not in fingerprints:
        return "absent"
    return fingerprints[name] or "defined"


def _listed(grains: tuple[str, ...]) -> str:
    return ", ".join(grains) if grains else "off"


@dataclass(frozen=True)
class _Groups:
    """Counted events summed per (period start, key), as parallel lists in the order of each
    group's first event (the order the stores first see them)."""

    starts: list[int]
    keys: list[tuple]  # (organization_id, external_customer_id, code), shared with ``Ready.keys``
    counts: list[int]
    totals: list[int]  # exact scaled sums
    latest: list[int]  # the latest event time


@dataclass(frozen=True)
class _Sums:
    """Counted events summed per (period start, key), as arrays sorted by (period, key): what
    :class:`_Groups` are made of, and what a coarser grain sums up from."""

    starts: np.ndarray
    key_ids: np.ndarray
    firsts: np.ndarray  # each group's first event, in decision order
    counts: np.ndarray
    latest: np.ndarray
    totals: list  # the exact sums (Python integers)

    @staticmethod
    def of(ready: Ready, fresh: np.ndarray, times: np.ndarray, key_ids: np.ndarray,
           unit_ms: int) -> _Sums:
        """The counted events (positions ``fresh`` of ``ready``, their ``times`` and ``key_ids``)
        summed per (period of ``unit_ms``, key)."""
        starts = times - times % unit_ms
        order, heads = _runs(starts, key_ids, len(ready.keys))
        firsts = order[heads]
        return _Sums(starts[firsts], key_ids[firsts], firsts, np.diff(np.append(heads, len(order))),
                     np.maximum.reduceat(times[order], heads),
                     _exact_totals(*ready.run_parts(fresh[order], heads)))

    def rolled_up(self, unit_ms: int, n_keys: int) -> _Sums:
        """These sums per (period of ``unit_ms``, key), for periods that nest in it. A group
        alone in its period (most: a batch decides a window or two) keeps its total as it is."""
        starts = self.starts - self.starts % unit_ms
        order, heads = _runs(starts, self.key_ids, n_keys)
        totals = list(map(self.totals.__getitem__, order[heads].tolist()))
        ends = np.append(heads[1:], len(order))
        for run in np.flatnonzero(ends - heads > 1).tolist():
            totals[run] = sum(map(self.totals.__getitem__, order[heads[run]:ends[run]].tolist()))
        firsts = order[heads]
        return _Sums(starts[firsts], self.key_ids[firsts], np.minimum.reduceat(self.firsts[order], heads),
                     np.add.reduceat(self.counts[order], heads), np.maximum.reduceat(self.latest[order], heads),
                     totals)

    def groups(self, keys: list[tuple]) -> _Groups:
        """The sums as :class:`_Groups` (in the order of their first event).

            >>> ready = Ready(*[np.array(c, dtype=np.int64) for c in ([5, 61_000, 62_000, 63_000],
            ...               [0] * 4, [0] * 4, [0] * 4, [1, 2, 3, 4], [0] * 4)],
            ...               np.array([1, 0, 1, 1], dtype=np.int32), [("o", "c", "x"), ("o", "d", "x")], {}, {})
            >>> groups = _Sums.of(ready, np.arange(4), ready.times, ready.key_ids, 60_000).groups(ready.keys)
            >>> groups.starts, groups.keys, groups.counts, groups.latest
            ([0, 60000, 60000], [('o', 'd', 'x'), ('o', 'c', 'x'), ('o', 'd', 'x')], [1, 1, 2], [5, 61000, 63000])
            >>> groups.totals == [10**18, 2 * 10**18, 7 * 10**18]
            True
        """
        by_first = np.argsort(self.firsts)
        return _Groups(self.starts[by_first].tolist(),
                       list(map(keys.__getitem__, self.key_ids[by_first].tolist())),
                       self.counts[by_first].tolist(), list(map(self.totals.__getitem__, by_first.tolist())),
                       self.latest[by_first].tolist())


def _exact_totals(wholes, highs: np.ndarray, lows: np.ndarray, wide: dict) -> list[int]:
    """The exact sums of runs given in parts as ``Ready.run_parts`` gives them.

        >>> _exact_totals(np.array([1, -1]), np.array([0, 2 * 10**9 - 1]), np.array([3, 10**9 + 5]),
        ...               {1: 10**40}) == [10**18 + 3, 10**40 + 10**18 + 5]  # -1 + 2 * 10**9 * 10**9 = 1 whole
        True
    """
    low_carry, lows = np.divmod(lows, _HALF_UNIT)
    carry, highs = np.divmod(highs + low_carry, _HALF_UNIT)
    fractions = highs * _HALF_UNIT + lows  # each below VALUE_UNIT
    if isinstance(wholes, np.ndarray) and (not len(wholes) or int(np.abs(wholes).max())
                                           < _INT64_MAX - int(carry.max())):
        totals = scaled_values(wholes + carry, fractions)
    else:  # as Python integers
        wholes = map(add, wholes, carry.tolist())
        totals = list(map(add, map(mul, wholes, repeat(VALUE_UNIT)), fractions.tolist()))
    for run, value in wide.items():
        totals[run] += value
    return totals


def _grain_groups(ready: Ready, fresh: np.ndarray, windows: _Sums, window_groups: _Groups, unit_ms: int,
                  size_ms: int) -> _Groups:
    """The counted events (positions ``fresh`` of ``ready``) summed per (period of ``unit_ms``,
    key): from the ``windows`` sums (``window_groups`` as groups) where windows of ``size_ms``
    nest in the periods; where the batch decided a single window (most do), its groups are the
    period's, with the period's start."""
    if unit_ms % size_ms == 0:
        if windows.starts.min() == windows.starts.max():
            start = int(windows.starts[0])
            return _Groups([start - start % unit_ms] * len(window_groups.starts), window_groups.keys,
                           window_groups.counts, window_groups.totals, window_groups.latest)
        sums = windows.rolled_up(unit_ms, len(ready.keys))
    else:
        sums = _Sums.of(ready, fresh, ready.times[fresh], ready.key_ids[fresh], unit_ms)
    return sums.groups(ready.keys)


def _runs(starts: np.ndarray, key_ids: np.ndarray, n_keys: int) -> tuple[np.ndarray, np.ndarray]:
    """The order that sorts items by (start, key), stably, and where each run of equal ones
    begins in it.

        >>> [a.tolist() for a in _runs(np.array([60, 0, 60, 0]), np.array([1, 1, 1, 0]), 2)]
        [[3, 1, 0, 2], [0, 1, 2]]
    """
    n = len(starts)
    if n and starts.min() == starts.max():  # one period (most batches)
        distinct, codes = 1, key_ids.astype(np.int64)
    else:
        periods, start_index = np.unique(starts, return_inverse=True)
        distinct, codes = len(periods), start_index.astype(np.int64) * max(n_keys, 1) + key_ids
    if distinct * max(n_keys, 1) * max(n, 1) < 2**63:  # (code, position) packed: one unstable sort
        order = np.argsort(codes * n + np.arange(n))
    else:
        order = np.argsort(codes, kind="stable")
    sorted_codes = codes[order]
    return order, np.flatnonzero(np.concatenate(([True], sorted_codes[1:] != sorted_codes[:-1])))


def _add_groups(store: WindowStore, groups: _Groups) -> None:
    """Add each group to ``store``, in their order, window by window (a store gets lists of its
    own: the grains share their groups' lists where a batch decided one window)."""
    starts, at = groups.starts, 0
    if starts and starts.count(starts[0]) == len(starts):  # one window (most batches)
        runs = [(starts[0], len(starts))]
    else:
        runs = [(start, len(list(run))) for start, run in groupby(starts)]
    for start, size in runs:
        end = at + size
        store.add_groups(start, groups.keys[at:end], groups.counts[at:end], groups.totals[at:end])
        at = end


def _add_days(counted: dict, days: _Groups) -> None:
    """Add the day groups to ``counted`` (``{(org, customer, code, day): (count, total_scaled,
    latest_event_ms)}``), in their order.

        >>> counted = {("o", "c", "x", 0): (1, 5, 10)}
        >>> _add_days(counted, _Groups([0, 0], [("o", "d", "x"), ("o", "c", "x")], [2, 1], [7, 1], [20, 30]))
        >>> counted
        {('o', 'c', 'x', 0): (2, 6, 30), ('o', 'd', 'x', 0): (2, 7, 20)}

    Compiled where ``operators/_fastlive.c`` is built (the same dict, in the same order).
    """
    if _compiled_add_days is not None and _compiled_add_days(
            counted, days.keys, days.starts, days.counts, days.totals, days.latest):
        return
    day_keys = list(map(add, days.keys, zip(days.starts)))  # (org, customer, code) + (day,)
    sums = zip(days.counts, days.totals, days.latest)
    if not counted:  # the batch's first decision: every (key, day) is new (groups are distinct)
        counted.update(zip(day_keys, sums))
        return
    for day_key, (count, total, latest) in zip(day_keys, sums):
        old = counted.get(day_key)
        counted[day_key] = (count, total, latest) if old is None else (
            old[0] + count, old[1] + total, max(old[2], latest))


def _as_rows(metric: MetricDefinition | None, rows: list) -> list:
    """A store's rows as table rows: ``WindowRow`` as they are, session and metric rows converted."""
    if metric is not None:
        return [_metric_row(metric, r) for r in rows]
    return [r if r.__class__ is WindowRow or r.__class__ is WindowRowBlock else
            WindowRow(*r.key, r.start_ms, r.end_ms, r.count, r.result, r.version, r.is_deleted)
            for r in rows]


def _settle_extra(windows: WindowKind) -> int:
    """How much longer than its end + lateness a usage window waits for decisions: a
    sliding window's events are decided when their last window closes."""
    if isinstance(windows, SlidingWindows):
        return windows.size_ms - windows.slide_ms
    return 0


def _held(windows: WindowKind, step: int, offset: int,
          resume: HeldSnapshot | dict | None) -> HeldEvents:
    """The held events, resumed; a snapshot from before the columns (``{due: [(time, partition,
    offset, digest, ShardEvent)]}``) is carried over."""
    per_event = not isinstance(windows, TumblingWindows)
    if not isinstance(resume, dict):
        return HeldEvents(per_event, step, offset, resume)
    held = HeldEvents(per_event, step, offset)
    for entries in resume.values():
        for timestamp, partition, _o, _d, event in entries:
            held.add(held.bucket_of(timestamp - timestamp % step + offset), partition, [event])
    return held


def _longest_window(windows: WindowKind) -> int:
    """How far past an event's own time the windows holding it can end."""
    if isinstance(windows, SessionWindows):
        return windows.gap_ms
    return getattr(windows, "size_ms", 0)


def _store(windows: WindowKind, aggregation, lateness: int, resume, fast_usage: bool = False,
           recurring: bool = False, keep_ms: int = 0, decided_after: int = 0):
    """The store for ``windows``; ``decided_after``: how long after its time the shard
    decides an event at the latest (sessions wait for it before they are emitted)."""
    if isinstance(windows, SessionWindows):
        return SessionStore(windows.gap_ms, aggregation, lateness, resume, keep_ms, decided_after)
    if fast_usage:
        return WindowStore(windows, resume, lateness, keep_ms=keep_ms, emit_after_ms=keep_ms)
    return AggregateWindowStore(windows, aggregation, lateness, resume, recurring, keep_ms)


def _metric_row(metric: MetricDefinition, row) -> MetricRow:
    org, customer, group = row.key
    names = [".".join(path) for path in metric.group_by]
    group_key = json.dumps(dict(zip(names, group)), sort_keys=True, separators=(",", ":"))
    return MetricRow(metric.name, org, customer, group_key, row.start_ms, row.end_ms,
                     metric.rounded(row.result), row.count, row.version, row.is_deleted)
