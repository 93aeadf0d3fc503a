"""The metrics API every layer above calls: process-wide counters, recorded once per batch.

Every ``record_*`` function is a no-op until :func:`operators.telemetry.setup.configure_telemetry`
installed a :class:`Telemetry`; after that it adds to OpenTelemetry instruments (served on
``/metrics`` and sent by OTLP) and to the in-process status board the status page reads. Worker
threads of one process share both. Call these per batch, never per event::

    >>> record_consumed(partition=0, n=500)   # nothing configured: returns at once
    >>> active() is None
    True
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import TYPE_CHECKING, Any, Iterable, Optional

from operators.telemetry.board import StatusBoard
from operators.validation import REASONS

if TYPE_CHECKING:
    from operators.telemetry.tracing import Tracing

# Attribute names: OpenTelemetry semantic conventions where one applies. The Prometheus
# endpoint renames them to the dashboard's labels (operators.telemetry.setup.PROMETHEUS_LABELS).
PARTITION = "messaging.destination.partition.id"
TABLE = "db.collection.name"
REASON = "error.type"

log = logging.getLogger(__name__)

_NO_WATERMARK_BELOW = -(2**62)  # state.watermark.NO_WATERMARK and anything near it

# The label values each labelled counter shows at 0 from the start (so rate() works at once).
ENRICHMENT_OUTCOMES = ("hit", "fetched", "unknown", "stale", "unavailable")
"""hit (fresh in cache), fetched (known, from Redis), unknown (no hash in Redis), stale (Redis
unavailable, expired cache used), unavailable (Redis unavailable, never seen: empty attributes)."""
ALERT_OUTCOMES = ("sent", "sent_unfenced", "replay_skipped", "replay_found")
"""sent, sent_unfenced (Redis unavailable), replay_skipped (the fence said sent), replay_found
(already in the topic)."""
REJECT_REASONS = ("total_out_of_range", "clickhouse_refused")
"""Why the ClickHouse sink kept a row in ``usage_rejected_rows`` instead (see sinks.rejected)."""


# ---- the hot-path API -------------------------------------------------------------------------

_active: Optional["Telemetry"] = None


def install(telemetry: "Telemetry") -> None:
    """Make ``telemetry`` the process's recorder (``configure_telemetry`` calls this)."""
    global _active
    _active = telemetry


def uninstall() -> None:
    """Back to no-ops (tests, shutdown)."""
    global _active
    _active = None


def active() -> Optional["Telemetry"]:
    return _active


def record_consumed(partition: int, n: int) -> None:
    """``n`` Kafka records of ``partition`` were read (valid or not)."""
    t = _active
    if t is not None and n:
        t.consumed(partition, n)


def record_duplicates(n: int) -> None:
    t = _active
    if t is not None and n:
        t.duplicates(n)


def record_late(n: int) -> None:
    """``n`` valid events arrived after their window had closed on their partition."""
    t = _active
    if t is not None and n:
        t.late(n)


def record_windows_closed(n: int) -> None:
    """``n`` aggregate rows (one per key and closed window) were emitted."""
    t = _active
    if t is not None and n:
        t.windows_closed(n)


def record_sink_write(table: str, rows: int, seconds: float) -> None:
    """One successful insert of ``rows`` rows into ``table`` took ``seconds`` (retries included)."""
    t = _active
    if t is not None:
        t.sink_write(table, rows, seconds)


def record_sink_retry(table: str) -> None:
    t = _active
    if t is not None:
        t.sink_retry(table)


def record_snapshot(seconds: float) -> None:
    """A recovery snapshot (of one shard's state) took ``seconds``."""
    t = _active
    if t is not None:
        t.snapshot(seconds)


def record_source_snapshot() -> None:
    """The source's offsets were snapshotted: the flow's resume point moved (no duration)."""
    t = _active
    if t is not None:
        t.board.snapshot_taken(None)


def declare_partition(partition: int) -> None:
    """A source reads ``partition``: its consumed counter shows 0 until records come."""
    t = _active
    if t is not None:
        t.consumed(partition, 0)


def declare_tables(tables: Iterable[str]) -> None:
    """A sink writes ``tables``: their rows, retries and rejected-rows counters show 0."""
    t = _active
    if t is not None:
        for table in tables:
            t.declare_table(table)


def record_rows_rejected(table: str, reason: str, n: int) -> None:
    """``n`` rows meant for ``table`` were kept in ``usage_rejected_rows`` (``reason``)."""
    t = _active
    if t is not None and n:
        t.queue(t.rows_rejected, n, {TABLE: table, REASON: reason})


def record_enrichment_lookups(outcome: str, n: int) -> None:
    """``n`` customer attribute lookups ended with ``outcome`` (:data:`ENRICHMENT_OUTCOMES`)."""
    t = _active
    if t is not None and n:
        t.queue(t.enrichment_lookups, n, {"outcome": outcome})


def record_alert(outcome: str) -> None:
    """A quota alert ended with ``outcome`` (:data:`ALERT_OUTCOMES`)."""
    t = _active
    if t is not None:
        t.queue(t.alerts, 1, {"outcome": outcome})


def record_live_totals_written(n: int) -> None:
    """``n`` live totals were written to Redis."""
    t = _active
    if t is not None and n:
        t.queue(t.live_totals_written, n)


def record_live_totals_redis_error() -> None:
    """A write of live totals to Redis failed (it is retried)."""
    t = _active
    if t is not None:
        t.queue(t.live_totals_redis_errors, 1)


def record_live_totals_resync() -> None:
    """Redis had lost its data: every live total was written again."""
    t = _active
    if t is not None:
        t.queue(t.live_totals_resyncs, 1)


def record_live_totals_pending(part: str, n: int) -> None:
    """``n`` live totals of sink partition ``part`` wait for Redis."""
    t = _active
    if t is not None:
        t.live_totals_pending[part] = n


def record_consumer_lag(partition: int, lag: int) -> None:
    """End offset minus position; negative values (an under-reported end) count as 0."""
    t = _active
    if t is not None:
        t.consumer_lag(partition, lag)


def record_intake(batch: Any, max_event_ms: int | None) -> None:
    """Everything one ``operators.intake.IntakeBatch`` says, in one call from the source.

    Consumed per partition, valid, invalid by reason, late, and the partition's watermark.
    """
    t = _active
    if t is None:
        return
    partition = batch.partition
    if batch.consumed_count:
        t.consumed(partition, batch.consumed_count)
    if batch.valid_count:
        t.valid(batch.valid_count)
    if batch.dead_letters:
        for reason, n in Counter(d.reason for d in batch.dead_letters).items():
            t.invalid(reason, n)
    if batch.late_by_shard:
        t.late(sum(len(late) for late in batch.late_by_shard.values()))
    if batch.metric_field_missing:
        t.metric_field_missing(batch.metric_field_missing)
    if max_event_ms is not None and batch.watermark > _NO_WATERMARK_BELOW:
        t.watermark(partition, batch.watermark, max_event_ms)


# ---- the recorder ------------------------------------------------------------------------------


class Telemetry:
    """OpenTelemetry instruments from ``meter`` plus the status board (and tracing, if on)."""

    def __init__(self, meter: Any, board: StatusBoard | None = None,
                 tracing: Tracing | None = None) -> None:
        from opentelemetry.metrics import Observation

        self.board = board or StatusBoard()
        self.tracing = tracing
        self._sink_events: deque = deque()
        self._queued: deque = deque()  # (counter, n, attributes) from sink threads, see drain()
        self.live_totals_pending: dict[str, int] = {}
        self._partition_attrs: dict[int, dict] = {}
        self._table_attrs: dict[str, dict] = {}
        c = meter.create_counter
        self._consumed = c("tallyflow.events.consumed", "{event}", "Kafka records read, valid or not")
        self._valid = c("tallyflow.events.valid", "{event}", "Records that decoded to a usage event")
        self._invalid = c("tallyflow.events.invalid", "{event}", "Records sent to the DLQ, by reason")
        self._duplicates = c("tallyflow.events.duplicate", "{event}", "Repeated transactions dropped")
        self._late = c("tallyflow.events.late", "{event}", "Events after their window closed")
        self._field_missing = c("tallyflow.metric.field_missing", "{event}",
                                "Catalog metric values missing or not numeric (the event still counts in usage)")
        self._windows = c("tallyflow.windows.closed", "{window}", "Aggregate rows of closed windows")
        self._rows = c("tallyflow.rows.written", "{row}", "Rows inserted into ClickHouse, by table")
        self._retries = c("tallyflow.sink.retries", "{retry}", "ClickHouse write retries, by table")
        self.rows_rejected = c("tallyflow.sink.rows_rejected", "{row}",
                               "Rows ClickHouse cannot take, written to usage_rejected_rows instead, "
                               "by target table and reason")
        self.enrichment_lookups = c("tallyflow.enrichment.lookups", "{lookup}",
                                    "Customer attribute lookups by outcome")
        self.alerts = c("tallyflow.alerts", "{alert}", "Quota alerts by outcome")
        self.live_totals_written = c("tallyflow.live_totals.written", "{total}",
                                     "Live totals written to Redis")
        self.live_totals_redis_errors = c("tallyflow.live_totals.redis_errors", "{error}",
                                          "Failed writes of live totals to Redis")
        self.live_totals_resyncs = c("tallyflow.live_totals.resyncs", "{resync}",
                                     "Times Redis had lost its data and was rewritten")
        self._zero_from_start()
        h = meter.create_histogram
        self._batch_rows = h("tallyflow.sink.batch.rows", "{row}", "Rows per ClickHouse insert",
                             explicit_bucket_boundaries_advisory=[1, 10, 100, 500, 1_000, 5_000,
                                                                  10_000, 50_000, 100_000])
        seconds = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
        self._write_seconds = h("tallyflow.sink.write", "s", "Duration of one ClickHouse insert",
                                explicit_bucket_boundaries_advisory=seconds)
        self._snapshot_seconds = h("tallyflow.snapshot", "s", "Duration of one shard's snapshot",
                                   explicit_bucket_boundaries_advisory=seconds)
        board_ = self.board

        def watermarks(_options):
            return [Observation(w, self._pattrs(p)) for p, w, _d in board_.watermarks()]

        def delays(_options):
            return [Observation(d, self._pattrs(p)) for p, _w, d in board_.watermarks()]

        def lags(_options):
            return [Observation(lag, self._pattrs(p)) for p, lag in board_.lags()]

        g = meter.create_observable_gauge
        g("tallyflow.watermark", [watermarks], "ms", "Event-time watermark per partition")
        g("tallyflow.watermark.delay", [delays], "ms",
          "How far a partition's watermark is behind the newest event seen in this process")
        g("tallyflow.consumer.lag", [lags], "{message}",
          "End offset minus position per partition, clamped at 0")

        def pending(_options):
            return [Observation(n, {"part": part}) for part, n in list(self.live_totals_pending.items())]

        g("tallyflow.live_totals.pending", [pending], "{total}", "Live totals waiting for Redis")

    def _zero_from_start(self) -> None:
        """Every counter whose series are known in advance reads 0 before its first event."""
        for counter in (self._valid, self._duplicates, self._late, self._field_missing, self._windows,
                        self.live_totals_written, self.live_totals_redis_errors, self.live_totals_resyncs):
            counter.add(0)
        for reason in REASONS:
            self._invalid.add(0, {REASON: reason})
        for outcome in ENRICHMENT_OUTCOMES:
            self.enrichment_lookups.add(0, {"outcome": outcome})
        for outcome in ALERT_OUTCOMES:
            self.alerts.add(0, {"outcome": outcome})

    def queue(self, counter: Any, n: int, attributes: dict | None = None) -> None:
        """Add ``n`` to ``counter`` at the next :meth:`drain` (for sink threads, see there)."""
        self._queued.append((counter, n, attributes))

    def declare_table(self, table: str) -> None:
        """``table``'s rows, retries and rejected rows read 0 from now (applied by drain())."""
        self._sink_events.append((table, 0, None))
        for reason in REJECT_REASONS:
            self.queue(self.rows_rejected, 0, {TABLE: table, REASON: reason})

    def _pattrs(self, partition: int) -> dict:
        attrs = self._partition_attrs.get(partition)
        if attrs is None:
            attrs = self._partition_attrs[partition] = {PARTITION: str(partition)}
        return attrs

    def _tattrs(self, table: str) -> dict:
        attrs = self._table_attrs.get(table)
        if attrs is None:
            attrs = self._table_attrs[table] = {TABLE: table}
        return attrs

    def consumed(self, partition: int, n: int) -> None:
        self._consumed.add(n, self._pattrs(partition))
        self.board.consumed(partition, n)

    def valid(self, n: int) -> None:
        self._valid.add(n)
        self.board.add("valid", n)

    def invalid(self, reason: str, n: int) -> None:
        self._invalid.add(n, {REASON: reason})
        self.board.invalid(reason, n)

    def duplicates(self, n: int) -> None:
        self._duplicates.add(n)
        self.board.add("duplicates", n)

    def late(self, n: int) -> None:
        self._late.add(n)
        self.board.add("late", n)

    def metric_field_missing(self, n: int) -> None:
        self._field_missing.add(n)
        self.board.add("metric_field_missing", n)

    def windows_closed(self, n: int) -> None:
        self._windows.add(n)
        self.board.add("windows_closed", n)

    # The sink's figures reach the OpenTelemetry instruments through drain(), called from the
    # status sampler thread and before every /metrics answer, never from the worker thread that
    # just wrote: with the in-process chdb engine and two workers, OpenTelemetry calls made
    # right after an insert were followed by an abort inside chdb (double free, then a hang)
    # in 15 of 40 runs; queued like this, in none of 36.

    def sink_write(self, table: str, rows: int, seconds: float) -> None:
        self._sink_events.append((table, rows, seconds))
        self.board.sink_write(table, rows, seconds)

    def sink_retry(self, table: str) -> None:
        self._sink_events.append((table, None, None))
        self.board.add("sink_retries", 1)

    def drain(self) -> None:
        """Move queued sink figures into the OpenTelemetry instruments (any thread)."""
        self._drain_sink_writes()
        queued = self._queued
        while queued:
            try:
                counter, n, attributes = queued.popleft()
            except IndexError:
                return
            counter.add(n, attributes)

    def _drain_sink_writes(self) -> None:
        events = self._sink_events
        while events:
            try:
                table, rows, seconds = events.popleft()
            except IndexError:
                return
            fresh = table not in self._table_attrs
            attrs = self._tattrs(table)
            if fresh:  # a retry counter that reads 0 rather than no series at all
                self._retries.add(0, attrs)
            if rows is None:
                self._retries.add(1, attrs)
                continue
            if seconds is None:  # declare_table: the zero series only
                self._rows.add(0, attrs)
                continue
            self._rows.add(rows, attrs)
            self._batch_rows.record(rows, attrs)
            self._write_seconds.record(seconds, attrs)

    def snapshot(self, seconds: float) -> None:
        self._snapshot_seconds.record(seconds)
        self.board.snapshot_taken(seconds)

    def watermark(self, partition: int, watermark_ms: int, max_event_ms: int) -> None:
        self.board.watermark(partition, watermark_ms, max_event_ms)

    def consumer_lag(self, partition: int, lag: int) -> None:
        self.board.consumer_lag(partition, lag)


