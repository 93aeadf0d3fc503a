"""Sampled traces that follow an event through decode → window → sink.

Intake picks records (a ``traceparent`` Kafka header with the sampled flag always, others at
``TRACE_SAMPLE_RATIO``), opens a span per picked record and, for a valid on-time one, puts a
:data:`TraceCarry` on the batch's side list ``traces_by_shard``; the shard opens a window span
under it and, when the window closes, sends a :class:`SinkTrace` item down the sink stream
on the shard step's ``traces`` stream, which joins the rows' stream to their sink; the sink's
``with trace_sink(items) as items:`` strips those carriers and opens
a span under each. With tracing off, :meth:`IntakeTracing.begin` returns ``None`` and nothing
else runs.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from typing import Any, Iterable, Iterator

import msgspec

from operators.telemetry import metrics
from operators.telemetry.metrics import PARTITION, REASON, TABLE
from state.records import row_count


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
    t = metrics.active()
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
            recorder = metrics.active()
            board = recorder.board if recorder is not None else None
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
                    "tallyflow.row": item.row, "tallyflow.flush_rows": row_count(rows)},
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
