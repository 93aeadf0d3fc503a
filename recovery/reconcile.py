"""Recompute the billing totals from the raw topic and diff them against ClickHouse.

This is how an operator proves the totals: a second, deliberately plain
implementation of the same rules (validation, per-partition event-time
lateness, dedup by organization and transaction, epoch-aligned tumbling
windows), summing with ``decimal.Decimal`` instead of the flow's scaled
integers. ``tallyflow reconcile`` exits non-zero on any difference.

    >>> ev = b'{"transaction_id":"%s","organization_id":"o","external_customer_id":"c","code":"x","timestamp":%d,"value":"0.1"}'
    >>> result = recompute([(0, 0, ev % (b"a", 1_000)), (1, 0, ev % (b"a", 1_000)), (0, 1, ev % (b"b", 2_000))],
    ...                    window_size_ms=60_000, max_out_of_orderness_ms=0)
    >>> result.aggregates
    {('o', 'c', 'x', 0): (2, Decimal('0.200000000000000000'))}
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable

from operators.validation import Invalid, VALUE_SCALE, validate
from sinks.kafka_client import KafkaConnection, as_connection, list_topics

AggregateKey = tuple  # (organization_id, external_customer_id, code, window_start_ms)
RawRecord = tuple  # (partition, offset, value bytes)

_CONTEXT = decimal.Context(prec=80)


@dataclass
class Recomputation:
    aggregates: dict[AggregateKey, tuple[int, Decimal]] = field(default_factory=dict)
    late: set[tuple[str, str]] = field(default_factory=set)
    invalid: set[tuple[int, int]] = field(default_factory=set)
    duplicates: int = 0
    counted: list = field(default_factory=list)  # (UsageEvent, watermark_before) of counted events


def recompute(
    records: Iterable[RawRecord],
    *,
    window_size_ms: int,
    max_out_of_orderness_ms: int,
    allowed_lateness_ms: int = 0,
    window_kind: str = "tumbling",
    window_slide_ms: int | None = None,
    session_gap_ms: int | None = None,
) -> Recomputation:
    """Expected aggregates, late transactions and invalid positions for raw records of a topic.

    An event is late when its own partition's watermark just before it has passed
    the end (plus the allowed lateness) of the last window that could hold it. It
    counts in each of its windows still open by that rule. A late event that copies
    a counted (or an already late) transaction is a duplicate, not a late event.
    """
    if window_kind == "session":
        last_end = lambda ts: ts + session_gap_ms  # noqa: E731
    elif window_kind == "sliding":
        last_end = lambda ts: ts - ts % window_slide_ms + window_size_ms  # noqa: E731
    else:
        last_end = lambda ts: ts - ts % window_size_ms + window_size_ms  # noqa: E731
    result = Recomputation()
    on_time, late = [], []
    for partition, offset, event, watermark in _classified(records, max_out_of_orderness_ms, result):
        if watermark is not None and last_end(event.timestamp_ms) + allowed_lateness_ms <= watermark:
            late.append(event)
        else:
            on_time.append((event, watermark))
    seen: set[tuple[str, str]] = set()
    for event, watermark in on_time:
        identity = (event.organization_id, event.transaction_id)
        if identity in seen:
            result.duplicates += 1
            continue
        seen.add(identity)
        result.counted.append((event, watermark))
    for event in late:
        identity = (event.organization_id, event.transaction_id)
        if identity in seen:
            result.duplicates += 1
            continue
        seen.add(identity)
        result.late.add(identity)
    if window_kind == "session":
        _sessions(result, session_gap_ms)
    else:
        slide = window_slide_ms if window_kind == "sliding" else window_size_ms
        _fixed_windows(result, window_size_ms, slide, allowed_lateness_ms)
    return result


def _classified(records, max_out_of_orderness_ms: int, result: Recomputation):
    """Valid events per partition in offset order, with their partition's watermark before them."""
    by_partition: dict[int, list[tuple[int, bytes]]] = {}
    for partition, offset, value in records:
        by_partition.setdefault(partition, []).append((offset, value))
    for partition in sorted(by_partition):
        max_event = None
        for offset, value in sorted(by_partition[partition], key=lambda r: r[0]):
            event = validate(value)
            if isinstance(event, Invalid):
                result.invalid.add((partition, offset))
                continue
            watermark = None if max_event is None else max_event - max_out_of_orderness_ms
            yield partition, offset, event, watermark
            ts = event.timestamp_ms
            max_event = ts if max_event is None else max(max_event, ts)


def _decimal(event) -> Decimal:
    return Decimal(event.value_scaled).scaleb(-VALUE_SCALE, _CONTEXT)


def _add(result: Recomputation, key: AggregateKey, count: int, total: Decimal) -> None:
    old_count, old_total = result.aggregates.get(key, (0, Decimal(0)))
    result.aggregates[key] = (old_count + count, _CONTEXT.add(old_total, total))


def _fixed_windows(result: Recomputation, size: int, slide: int, lateness: int) -> None:
    for event, watermark in result.counted:
        ts = event.timestamp_ms
        start = ts - ts % slide
        while start > ts - size:
            if watermark is None or start + size + lateness > watermark:
                key = (event.organization_id, event.external_customer_id, event.code, start)
                _add(result, key, 1, _decimal(event))
            start -= slide


def _sessions(result: Recomputation, gap: int) -> None:
    by_key: dict[tuple, list] = {}
    for event, _watermark in result.counted:
        key = (event.organization_id, event.external_customer_id, event.code)
        by_key.setdefault(key, []).append(event)
    for key, events in by_key.items():
        events.sort(key=lambda e: e.timestamp_ms)
        first = last = None
        for event in events:
            if last is None or event.timestamp_ms >= last + gap:
                first = event.timestamp_ms
            last = event.timestamp_ms if last is None else max(last, event.timestamp_ms)
            _add(result, (*key, first), 1, _decimal(event))


@dataclass(frozen=True)
class Difference:
    key: AggregateKey
    expected: tuple[int, Decimal] | None
    actual: tuple[int, Decimal] | None


def diff(expected: dict[AggregateKey, tuple[int, Decimal]],
         actual: dict[AggregateKey, tuple[int, Decimal]]) -> list[Difference]:
    """Every key whose (count, total) differs, including keys present on one side only."""
    differences = []
    for key in sorted(set(expected) | set(actual)):
        want, have = expected.get(key), actual.get(key)
        if want is None or have is None or want[0] != have[0] or want[1].compare(have[1]) != 0:
            differences.append(Difference(key, want, have))
    return differences


AGGREGATES_SQL = """
SELECT organization_id, external_customer_id, code, toUnixTimestamp64Milli(window_start) AS start_ms,
       event_count, total_value
FROM usage_aggregates FINAL
"""


def read_aggregates(backend) -> dict[AggregateKey, tuple[int, Decimal]]:
    """What ClickHouse says: ``usage_aggregates FINAL`` as ``{key: (count, total)}``."""
    _, rows = backend.query(AGGREGATES_SQL)
    return {(r[0], r[1], r[2], int(r[3])): (int(r[4]), Decimal(r[5])) for r in rows}


def read_topic(kafka: KafkaConnection | str, topic: str, *, ranges: dict[int, tuple[int, int]] | None = None,
               timeout_s: float = 120.0) -> list[RawRecord]:
    """Every record of ``topic`` as ``(partition, offset, value)``, read to partition EOF.

    ``ranges`` limits partitions to ``[first, last)`` offsets. End offsets are
    not trusted (some brokers under-report them); the EOF signal is.
    """
    import time

    from confluent_kafka import OFFSET_BEGINNING, KafkaError, TopicPartition

    consumer = as_connection(kafka).consumer({
        "group.id": "tallyflow-reconcile", "enable.auto.commit": False, "enable.partition.eof": True,
    })
    try:
        metadata = list_topics(consumer, "reconcile").topics.get(topic)
        if metadata is None or not metadata.partitions:
            raise RuntimeError(f"topic {topic!r} not found")
        partitions = sorted(metadata.partitions)
        if ranges:
            partitions = [p for p in partitions if p in ranges]
        consumer.assign([TopicPartition(topic, p, ranges[p][0] if ranges else OFFSET_BEGINNING)
                         for p in partitions])
        pending, records = set(partitions), []
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"partitions {sorted(pending)} of {topic!r} did not reach their end")
            for message in consumer.consume(10_000, 0.5):
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise RuntimeError(f"reading {topic!r}: {error.str()}")
                    pending.discard(message.partition())
                    continue
                partition, offset = message.partition(), message.offset()
                if ranges and offset >= ranges[partition][1]:
                    pending.discard(partition)
                    continue
                if partition in pending:
                    records.append((partition, offset, message.value()))
        return records
    finally:
        consumer.close()


def parse_offset_ranges(specs: list[str]) -> dict[int, tuple[int, int]]:
    """``["0:100-200", "3:0-50"]`` → ``{0: (100, 200), 3: (0, 50)}`` (end exclusive).

    >>> parse_offset_ranges(["0:100-200"])
    {0: (100, 200)}
    """
    ranges = {}
    for spec in specs:
        try:
            partition, span = spec.split(":")
            first, last = span.split("-")
            ranges[int(partition)] = (int(first), int(last))
        except ValueError:
            raise ValueError(f"offset range {spec!r} is not PARTITION:FIRST-LAST") from None
    return ranges


def _in_windows(key: AggregateKey, first_ms: int | None, until_ms: int | None) -> bool:
    start = key[3]
    return (first_ms is None or start >= first_ms) and (until_ms is None or start < until_ms)


def count_rejected(backend) -> int:
    """Rows of ``usage_aggregates`` ClickHouse could not take (``sinks.rejected``); 0 when the
    table does not exist yet."""
    from sinks.clickhouse_backend import ClickHouseError

    try:
        _, [(count,)] = backend.query("SELECT count() FROM usage_rejected_rows FINAL "
                                      "WHERE source_table = 'usage_aggregates'")
    except ClickHouseError as err:
        if err.code != 60:  # UNKNOWN_TABLE: a store written before the table existed
            raise
        return 0
    return int(count)


def run_reconcile(*, bootstrap: KafkaConnection | str, topic: str, url: str, window_size_ms: int,
                  max_out_of_orderness_ms: int, offset_specs: list[str] = (),
                  windows_from_ms: int | None = None, windows_until_ms: int | None = None,
                  limit: int = 50, out=None) -> int:
    """``tallyflow reconcile``: print the differing rows; 0 when ClickHouse equals the topic."""
    import sys

    from state.text_table import format_table
    from sinks.clickhouse_backend import connect
    from sinks.encoding import format_datetime64

    out = out or sys.stdout
    ranges = parse_offset_ranges(list(offset_specs)) or None
    records = read_topic(bootstrap, topic, ranges=ranges)
    expected = recompute(records, window_size_ms=window_size_ms,
                         max_out_of_orderness_ms=max_out_of_orderness_ms)
    backend = connect(url)
    try:
        actual = read_aggregates(backend)
        rejected = count_rejected(backend)
    finally:
        backend.close()
    keep = lambda d: {k: v for k, v in d.items() if _in_windows(k, windows_from_ms, windows_until_ms)}  # noqa: E731
    differences = diff(keep(expected.aggregates), keep(actual))
    print(f"reconcile {topic}: {len(records)} records, {len(expected.invalid)} invalid, "
          f"{len(expected.late)} late, {expected.duplicates} duplicates; "
          f"{len(keep(expected.aggregates))} expected rows, {len(keep(actual))} in ClickHouse, "
          f"{len(differences)} differ", file=out)
    if rejected:
        print(f"usage_rejected_rows holds {rejected} usage_aggregates row(s) ClickHouse refused; "
              "they show as differences below", file=out)
    if differences:
        rows = [
            (*d.key[:3], format_datetime64(d.key[3]),
             *(d.expected or ("-", "-")), *(d.actual or ("-", "-")))
            for d in differences[:limit]
        ]
        columns = ["organization_id", "external_customer_id", "code", "window_start",
                   "expected_count", "expected_total", "clickhouse_count", "clickhouse_total"]
        print(format_table(columns, rows), file=out)
        if len(differences) > limit:
            print(f"… and {len(differences) - limit} more", file=out)
    return 1 if differences else 0
