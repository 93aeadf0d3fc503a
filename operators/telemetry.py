"""Process-wide metrics, status figures and sampled traces, recorded once per batch.

Every ``record_*`` function is a no-op until ``dataflows.observability.configure_telemetry()``
installed a :class:`Telemetry`; after that it adds to OpenTelemetry instruments and to the
in-process :class:`StatusBoard` the status page reads. Worker threads of one process share both.
Call these per batch, never per event::

    >>> record_consumed(partition=0, n=500)   # nothing configured: returns at once
    >>> board = StatusBoard(clock=lambda: 1_000.0)
    >>> board.consumed(0, 500); board.invalid("malformed_json", 2); board.watermark(0, 90_000, 100_000)
    >>> board.consumer_lag(0, -3)   # the dev broker under-reports end offsets: clamped at 0
    >>> status = board.status()
    >>> status["totals"]["consumed"], status["totals"]["invalid"], status["partitions"][0]["lag"]
    (500, 2, 0)

Traces follow a sampled event through decode → window → sink. Intake picks records (a
``traceparent`` Kafka header with the sampled flag always, others at ``TRACE_SAMPLE_RATIO``),
opens a span per picked record and, for a valid on-time one, puts a :data:`TraceCarry` on the
batch's side list ``traces_by_shard``; the shard opens a window span under it and, when the
window closes, sends a :class:`SinkTrace` item down the sink stream beside the row; the sink's
``with trace_sink(items) as items:`` strips those carriers and opens a span under each. With
tracing off, :meth:`IntakeTracing.begin` returns ``None`` and nothing else runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import msgspec

# Attribute names: OpenTelemetry semantic conventions where one applies. The Prometheus
# endpoint renames them to the dashboard's labels (dataflows.observability.PROMETHEUS_LABELS).
PARTITION = "messaging.destination.partition.id"
TABLE = "db.collection.name"
REASON = "error.type"

log = logging.getLogger(__name__)

_NO_WATERMARK_BELOW = -(2**62)  # state.watermark.NO_WATERMARK and anything near it


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


def record_valid(n: int) -> None:
    t = _active
    if t is not None and n:
        t.valid(n)


def record_invalid(reason: str, n: int = 1) -> None:
    """``n`` records were dead-lettered for ``reason`` (an ``operators.validation`` reason code)."""
    t = _active
    if t is not None and n:
        t.invalid(reason, n)


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


def record_watermark(partition: int, watermark_ms: int, max_event_ms: int | None) -> None:
    """``partition``'s event-time watermark and the newest event time it has seen."""
    t = _active
    if t is not None and max_event_ms is not None and watermark_ms > _NO_WATERMARK_BELOW:
        t.watermark(partition, watermark_ms, max_event_ms)


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


class LagProbe:
    """Consumer lag of one partition from librdkafka's cached end offset, at most every ``every_s``.

    The cached end offset comes with every fetch response, so this costs no broker round trip.
    """

    def __init__(self, topic: str, partition: int, every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.topic, self.partition, self.every_s, self._clock = topic, partition, every_s, clock
        self._due = 0.0
        self._tp = None

    def maybe_record(self, consumer: Any, next_offset: int, eof_offset: int | None = None) -> None:
        """Record the lag if it is due; ``eof_offset`` (a partition-EOF signal just seen) is the
        end offset itself, recorded at once: the lag after catching up reads 0 right away."""
        if _active is None:
            return
        if eof_offset is not None:  # nothing read yet and already at the end: no lag either
            record_consumer_lag(self.partition, eof_offset - next_offset if next_offset >= 0 else 0)
            self._due = self._clock() + self.every_s
            return
        now = self._clock()
        if now < self._due:
            return
        self._due = now + self.every_s
        if next_offset < 0:  # nothing read yet: the position is not known
            return
        if self._tp is None:
            from confluent_kafka import TopicPartition

            self._tp = TopicPartition(self.topic, self.partition)
        try:
            _low, high = consumer.get_watermark_offsets(self._tp, cached=True)
        except Exception as err:  # noqa: BLE001 - a metric must never stop the flow
            log.debug("consumer lag unavailable",
                      extra={"topic": self.topic, "partition": self.partition, "error": str(err)})
            return
        if high is not None and high >= 0:
            record_consumer_lag(self.partition, high - next_offset)


# ---- the status page's figures ----------------------------------------------------------------


@dataclass
class PartitionStatus:
    consumed: int = 0
    lag: int | None = None
    watermark_ms: int | None = None
    max_event_ms: int | None = None


class StatusBoard:
    """The small in-process state behind ``/status.json``; thread-safe, wall clock injected.

    :meth:`tick` (once a second, from the HTTP server's sampler thread) keeps the history the
    sparklines draw: events per second, rows per second, total lag.
    """

    def __init__(self, clock: Callable[[], float] = time.time, history: int = 180) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.started_s = clock()
        self.totals = Counter()  # consumed, valid, duplicates, late, windows_closed, sink_retries
        self.invalid_by_reason: Counter = Counter()
        self.rows_by_table: Counter = Counter()
        self.partitions: dict[int, PartitionStatus] = {}
        self.last_write: tuple[float, str, int, float] | None = None  # (at, table, rows, seconds)
        self.last_snapshot: tuple[float, float] | None = None  # (at, seconds)
        self.recent_traces: deque[str] = deque(maxlen=10)
        self._history: deque[tuple[float, int, int, int]] = deque(maxlen=history + 1)

    def _partition(self, partition: int) -> PartitionStatus:
        status = self.partitions.get(partition)
        if status is None:
            status = self.partitions[partition] = PartitionStatus()
        return status

    def consumed(self, partition: int, n: int) -> None:
        with self._lock:
            self.totals["consumed"] += n
            self._partition(partition).consumed += n

    def add(self, name: str, n: int) -> None:
        with self._lock:
            self.totals[name] += n

    def invalid(self, reason: str, n: int) -> None:
        with self._lock:
            self.invalid_by_reason[reason] += n

    def sink_write(self, table: str, rows: int, seconds: float) -> None:
        with self._lock:
            self.rows_by_table[table] += rows
            self.last_write = (self._clock(), table, rows, seconds)

    def snapshot_taken(self, seconds: float | None) -> None:
        """A snapshot was taken now; ``seconds`` is its duration (None: keep the last known)."""
        with self._lock:
            if seconds is None:
                seconds = self.last_snapshot[1] if self.last_snapshot else 0.0
            self.last_snapshot = (self._clock(), seconds)

    def watermark(self, partition: int, watermark_ms: int, max_event_ms: int) -> None:
        with self._lock:
            status = self._partition(partition)
            status.watermark_ms, status.max_event_ms = watermark_ms, max_event_ms

    def consumer_lag(self, partition: int, lag: int) -> None:
        with self._lock:
            self._partition(partition).lag = max(0, lag)

    def trace_started(self, trace_id: str) -> None:
        with self._lock:
            self.recent_traces.appendleft(trace_id)

    def watermarks(self) -> list[tuple[int, int, int]]:
        """(partition, watermark, delay behind the newest event this process has seen)."""
        with self._lock:
            known = [(p, s.watermark_ms, s.max_event_ms) for p, s in self.partitions.items()
                     if s.watermark_ms is not None]
        if not known:
            return []
        newest = max(m for _p, _w, m in known)
        return [(p, w, max(0, newest - w)) for p, w, _m in known]

    def lags(self) -> list[tuple[int, int]]:
        with self._lock:
            return [(p, s.lag) for p, s in self.partitions.items() if s.lag is not None]

    def tick(self) -> None:
        with self._lock:
            lag = sum(s.lag or 0 for s in self.partitions.values())
            rows = sum(self.rows_by_table.values())
            self._history.append((self._clock(), self.totals["consumed"], rows, lag))

    def status(self) -> dict:
        """Everything ``/status.json`` serves, as plain JSON-able values."""
        delays = {p: d for p, _w, d in self.watermarks()}
        now = self._clock()
        with self._lock:
            history = list(self._history)
            partitions = [
                {"partition": p, "consumed": s.consumed, "lag": s.lag, "watermark_ms": s.watermark_ms,
                 "watermark_delay_ms": delays.get(p), "max_event_ms": s.max_event_ms}
                for p, s in sorted(self.partitions.items())
            ]
            totals = {
                "consumed": self.totals["consumed"], "valid": self.totals["valid"],
                "invalid": sum(self.invalid_by_reason.values()), "duplicates": self.totals["duplicates"],
                "late": self.totals["late"], "windows_closed": self.totals["windows_closed"],
                "rows_written": sum(self.rows_by_table.values()),
                "sink_retries": self.totals["sink_retries"],
                "metric_field_missing": self.totals["metric_field_missing"],
            }
            invalid = dict(sorted(self.invalid_by_reason.items()))
            rows = dict(sorted(self.rows_by_table.items()))
            last_write, last_snapshot = self.last_write, self.last_snapshot
            traces = list(self.recent_traces)
        series = _rates(history)
        return {
            "now_ms": int(now * 1000),
            "uptime_s": round(now - self.started_s, 1),
            "totals": totals,
            "invalid_by_reason": invalid,
            "rows_by_table": rows,
            "rates": {"events_per_s": _recent_rate(history, 1), "rows_per_s": _recent_rate(history, 2)},
            "lag_total": sum(p["lag"] or 0 for p in partitions),
            "partitions": partitions,
            "sink": None if last_write is None else {
                "last_write_ms": int(last_write[0] * 1000), "age_s": round(now - last_write[0], 1),
                "table": last_write[1], "rows": last_write[2], "seconds": round(last_write[3], 4)},
            "snapshot": None if last_snapshot is None else {
                "last_ms": int(last_snapshot[0] * 1000), "age_s": round(now - last_snapshot[0], 1),
                "seconds": round(last_snapshot[1], 4)},
            "history": series,
            "recent_traces": traces,
        }


def _rates(history: list[tuple[float, int, int, int]]) -> dict:
    t, events, rows, lag = [], [], [], []
    for (t0, c0, r0, _l0), (t1, c1, r1, l1) in zip(history, history[1:]):
        span = max(t1 - t0, 1e-3)
        t.append(int(t1 * 1000))
        events.append(round((c1 - c0) / span, 1))
        rows.append(round((r1 - r0) / span, 1))
        lag.append(l1)
    return {"t_ms": t, "events_per_s": events, "rows_per_s": rows, "lag": lag}


def _recent_rate(history: list, column: int, seconds: float = 5.0) -> float:
    if len(history) < 2:
        return 0.0
    last = history[-1]
    first = next((h for h in history if last[0] - h[0] <= seconds), history[0])
    if first is last:
        first = history[-2]
    return round((last[column] - first[column]) / max(last[0] - first[0], 1e-3), 1)


# ---- the recorder ------------------------------------------------------------------------------


class Telemetry:
    """OpenTelemetry instruments from ``meter`` plus the status board (and tracing, if on)."""

    def __init__(self, meter: Any, board: StatusBoard | None = None,
                 tracing: "Tracing | None" = None) -> None:
        from opentelemetry.metrics import Observation

        self.board = board or StatusBoard()
        self.tracing = tracing
        self._sink_events: deque = deque()
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


# ---- traces -------------------------------------------------------------------------------------

TraceCarry = tuple
"""(traceparent, organization_id, external_customer_id, code, timestamp_ms): a sampled event
on its way to its shard, in ``IntakeBatch.traces_by_shard`` and ``ShardBatch.traces``."""

MAX_TRACED_PER_BATCH = 32
_MAX_PENDING_WINDOW_SPANS = 10_000


class SinkTrace(msgspec.Struct, frozen=True, gc=False):
    """Rides the sink stream beside the row it traces; the sink opens a span under it."""

    traceparent: str
    table: str
    row: str


def traceparent_of(span_context: Any) -> str:
    """The W3C ``traceparent`` value of a span context.

    >>> from types import SimpleNamespace
    >>> traceparent_of(SimpleNamespace(trace_id=1, span_id=2, trace_flags=1))
    '00-00000000000000000000000000000001-0000000000000002-01'
    """
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def parse_traceparent(value: Any) -> tuple[int, int, bool] | None:
    """(trace id, span id, sampled) of a W3C ``traceparent`` (str or bytes), or None if invalid.

    >>> parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")[2]
    True
    >>> parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    True
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 \
            or len(parts[2]) != 16 or len(parts[3]) != 2 or (parts[0] == "00" and len(parts) != 4):
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, bool(flags & 1)


def _header_traceparent(headers: Iterable) -> tuple[int, int, bool] | None:
    for key, value in headers:
        if key == "traceparent":
            return parse_traceparent(value)
    return None


def _context(trace_id: int, span_id: int, sampled: bool = True) -> Any:
    from opentelemetry import trace

    parent = trace.SpanContext(trace_id, span_id, is_remote=True,
                               trace_flags=trace.TraceFlags(1 if sampled else 0))
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def _context_of(traceparent: str) -> Any:
    parsed = parse_traceparent(traceparent)
    return None if parsed is None else _context(*parsed)


class Tracing:
    """The tracer and the sample ratio; built by ``configure_telemetry`` when the ratio is > 0."""

    def __init__(self, tracer: Any, ratio: float, rng: random.Random | None = None) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"TRACE_SAMPLE_RATIO must lie in (0, 1] to trace, got {ratio}")
        self.tracer, self.ratio = tracer, ratio
        self.rng = rng or random.Random()

    def gap(self) -> int:
        """Records to skip before the next pick: geometric, so picking costs O(picks) per batch."""
        if self.ratio >= 1:
            return 0
        return int(math.log(1.0 - self.rng.random()) / math.log1p(-self.ratio))


def _tracing() -> Tracing | None:
    t = _active
    return None if t is None else t.tracing


class IntakeTracing:
    """Decode spans for one partition's sampled records (one per intake, not snapshotted)."""

    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition
        self._skip: int | None = None

    def begin(self, records: list) -> list | None:
        """Open a span per picked record of ``records`` ((offset, key, value, headers, ...) tuples).

        Returns None when tracing is off (then :meth:`end` need not be called).
        """
        tracing = _tracing()
        if tracing is None or not records:
            return None
        if self._skip is None:
            self._skip = tracing.gap()
        picked, skip = [], self._skip
        for index, record in enumerate(records):
            headers = record[3]
            parent = _header_traceparent(headers) if headers else None
            if parent is not None:
                if parent[2]:
                    picked.append((index, parent))
            elif skip == 0:
                picked.append((index, None))
                skip = tracing.gap()
            else:
                skip -= 1
            if len(picked) >= MAX_TRACED_PER_BATCH:
                break
        self._skip = skip
        if not picked:
            return None
        from opentelemetry.trace import SpanKind

        start = time.time_ns()
        begun = []
        for index, parent in picked:
            offset, value = records[index][0], records[index][2]
            span = tracing.tracer.start_span(
                f"decode {self.topic}", context=None if parent is None else _context(*parent),
                kind=SpanKind.CONSUMER, start_time=start,
                attributes={"messaging.system": "kafka", "messaging.operation.type": "process",
                            "messaging.operation.name": "decode",
                            "messaging.destination.name": self.topic,
                            PARTITION: str(self.partition), "messaging.kafka.offset": offset},
            )
            begun.append((offset, value, span))
            board = _active.board if _active is not None else None
            if board is not None and span.get_span_context().trace_flags.sampled:
                board.trace_started(f"{span.get_span_context().trace_id:032x}")
        return begun

    def end(self, batch: Any, begun: list | None) -> None:
        """Close the spans with each record's outcome; carry valid on-time ones to their shard."""
        if not begun:
            return
        from operators.intake import shard_of
        from operators.validation import Invalid, validate

        dead = {d.source_offset: d for d in batch.dead_letters}
        late = {item[2].source_offset for items in batch.late_by_shard.values() for item in items}
        carries = getattr(batch, "traces_by_shard", None)
        if carries is None:
            carries = batch.traces_by_shard = {}
        for offset, value, span in begun:
            if offset in dead:
                span.set_attributes({"tallyflow.outcome": "invalid", REASON: dead[offset].reason})
            elif offset in late:
                span.set_attributes({"tallyflow.outcome": "late", "tallyflow.watermark_ms": batch.watermark})
            else:
                event = validate(value)
                if isinstance(event, Invalid):  # cannot happen: intake took it as valid
                    span.end()
                    continue
                shard = shard_of(event.organization_id, batch.shards)
                span.set_attributes({"tallyflow.outcome": "windowed", "tallyflow.shard": shard,
                                     "tallyflow.organization_id": event.organization_id})
                if span.get_span_context().trace_flags.sampled:
                    carries.setdefault(shard, []).append((
                        traceparent_of(span.get_span_context()), event.organization_id,
                        event.external_customer_id, event.code, event.timestamp_ms,
                    ))
            span.end()


class WindowTracing:
    """Window spans of one shard: open while the event waits in its window (not snapshotted).

    Works for every window kind: a span ends with the first closed main window (``grain`` "")
    of its key that covers its event time.
    """

    def __init__(self, table: str = "usage_aggregates") -> None:
        self.table = table
        self.pending: dict[tuple, list] = {}  # (org, customer, code) -> [(timestamp, span)]
        self._count = 0

    def add(self, traces: list) -> None:
        """Open a window span under each carried decode span (``ShardBatch.traces``)."""
        tracing = _tracing()
        if tracing is None or not traces or self._count >= _MAX_PENDING_WINDOW_SPANS:
            return
        for traceparent, org, customer, code, timestamp in traces:
            span = tracing.tracer.start_span(
                "window", context=_context_of(traceparent),
                attributes={"tallyflow.organization_id": org, "tallyflow.code": code,
                            "tallyflow.event_ms": timestamp},
            )
            self.pending.setdefault((org, customer, code), []).append((timestamp, span))
            self._count += 1

    def closed(self, rows: Iterable) -> list[SinkTrace]:
        """End the spans whose window is in ``rows``; the SinkTrace items to emit beside them."""
        if not self.pending:
            return []
        out = []
        for row in rows:
            if getattr(row, "grain", "") != "" or not hasattr(row, "window_start_ms"):
                continue
            key = (row.organization_id, row.external_customer_id, row.code)
            waiting = self.pending.get(key)
            if not waiting:
                continue
            start, end = row.window_start_ms, row.window_end_ms
            still = []
            for timestamp, span in waiting:
                if not start <= timestamp < end:
                    still.append((timestamp, span))
                    continue
                span.set_attributes({"tallyflow.window_start_ms": start, "tallyflow.window_end_ms": end,
                                     "tallyflow.event_count": row.event_count,
                                     "tallyflow.version": row.version})
                out.append(SinkTrace(traceparent_of(span.get_span_context()), self.table,
                                     f"{key[0]}/{key[1]}/{key[2]}/{start}"))
                span.end()
                self._count -= 1
            if still:
                self.pending[key] = still
            else:
                del self.pending[key]
        return out


def trace_sink(items: list) -> contextlib.AbstractContextManager:
    """Wrap a sink flush: ``with trace_sink(items) as items:`` gives the items without the
    :class:`SinkTrace` carriers, and a span per carrier covers the block.
    """
    tracing = _tracing()
    if tracing is None:
        return contextlib.nullcontext(items)
    traced = [item for item in items if type(item) is SinkTrace]
    if not traced:
        return contextlib.nullcontext(items)
    rows = [item for item in items if type(item) is not SinkTrace]
    return _sink_spans(tracing, traced, rows)


@contextlib.contextmanager
def _sink_spans(tracing: Tracing, traced: list[SinkTrace], rows: list) -> Iterator[list]:
    from opentelemetry.trace import SpanKind, Status, StatusCode

    spans = [tracing.tracer.start_span(
        f"insert {item.table}", context=_context_of(item.traceparent), kind=SpanKind.CLIENT,
        attributes={"db.system.name": "clickhouse", "db.operation.name": "INSERT", TABLE: item.table,
                    "tallyflow.row": item.row, "tallyflow.flush_rows": len(rows)},
    ) for item in traced]
    try:
        yield rows
    except BaseException as err:
        for span in spans:
            span.record_exception(err)
            span.set_status(Status(StatusCode.ERROR, str(err)))
        raise
    finally:
        for span in spans:
            span.end()
