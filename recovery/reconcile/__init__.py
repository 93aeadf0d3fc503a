"""``tallyflow reconcile``: recompute the flow's tables from the raw topic and diff them.

This is how an operator proves the totals: a second, deliberately plain implementation
of the README's rules — its own decoding and validation (:mod:`.decoding`), per-partition
lateness, dedup with the horizon, every window kind with allowed lateness, rollups,
catalog metrics and late events (:mod:`.recompute`) — summing exact decimals, then
compared with ``usage_aggregates``, its rollups, ``metric_aggregates`` and
``usage_late_events`` (:mod:`.compare`). It imports nothing of the flow's logic
(``operators/``, ``state/``): a bug there cannot hide itself here. It takes the flow's
``Settings``, so it applies the same windows, lateness, horizon, rollups and catalog.

What it cannot recompute it says: catalog metrics with options other than the plain
ones (listed as skipped), and flows run with ``IDLE_TIMEOUT`` (the wall clock decides
there). Windows still open in a running flow differ until they close: compare a closed
range with ``windows_from_ms``/``windows_until_ms``.
"""

from __future__ import annotations

from recovery.reconcile.compare import (Difference, Window, compare_all, count_rejected, diff,
                                        read_aggregates)
from recovery.reconcile.decoding import Event, decode
from recovery.reconcile.recompute import LateRow, Recomputation, recompute
from recovery.reconcile.rules import Rules

__all__ = ["Difference", "Event", "LateRow", "Recomputation", "Rules", "compare_all", "count_rejected",
           "decode", "diff", "parse_offset_ranges", "read_aggregates", "read_topic", "recompute",
           "run_reconcile"]

RawRecord = tuple  # (partition, offset, value bytes)


def run_reconcile(settings, *, bootstrap=None, topic: str | None = None,
                  url: str | None = None, offset_specs: list[str] = (),
                  windows_from_ms: int | None = None, windows_until_ms: int | None = None,
                  limit: int = 50, out=None) -> int:
    """Print every differing row; 0 when ClickHouse equals the topic, 1 otherwise.

    ``settings`` is the flow's ``Settings``; ``bootstrap`` (a ``KafkaConnection`` or
    servers), ``topic`` and ``url`` default to its Kafka connection, input topic and
    ClickHouse URL. Rows ClickHouse refused (``usage_rejected_rows``) are counted too.
    """
    import sys

    from sinks.clickhouse_backend import connect

    out = out or sys.stdout
    topic = topic or settings.kafka.usage_topic
    rules = Rules.from_settings(settings)
    records = read_topic(bootstrap or settings.kafka.connection, topic,
                         ranges=parse_offset_ranges(list(offset_specs)) or None)
    expected = recompute(records, rules)
    backend = connect(url or settings.clickhouse.url)
    try:
        found = compare_all(expected, backend, topic, Window(windows_from_ms, windows_until_ms))
        rejected = count_rejected(backend)
    finally:
        backend.close()
    _report(out, topic, records, expected, found, limit)
    if rejected:
        print(f"usage_rejected_rows holds {rejected} usage_aggregates row(s) ClickHouse refused; "
              "they show as differences above", file=out)
    return 1 if any(found.values()) else 0


def _report(out, topic: str, records: list, expected: Recomputation,
            found: dict[str, list[Difference]], limit: int) -> None:
    total = sum(len(differences) for differences in found.values())
    print(f"reconcile {topic}: {len(records)} records, {len(expected.invalid)} invalid, "
          f"{len(expected.late_rows)} late rows, {expected.duplicates} duplicates; "
          f"{len(expected.aggregates)} expected usage rows; {total} differ", file=out)
    for table, differences in found.items():
        print(f"  {table}: {len(differences)} differ", file=out)
    if expected.metrics_skipped:
        print(f"  not recomputed (options reconcile does not know): "
              f"{', '.join(expected.metrics_skipped)}", file=out)
    shown = [d for differences in found.values() for d in differences][:limit]
    for difference in shown:
        print(f"{difference.table} {difference.key}: expected {_values(difference.expected)}, "
              f"clickhouse {_values(difference.actual)}", file=out)
    if total > len(shown):
        print(f"… and {total - len(shown)} more", file=out)


def _values(values) -> str:
    if values is None:
        return "no row"
    if isinstance(values, LateRow):
        values = tuple(vars(values).values())
    return "(" + ", ".join(str(v) for v in values) + ")"


def read_topic(kafka, topic: str, *, ranges: dict[int, tuple[int, int]] | None = None,
               timeout_s: float = 120.0) -> list[RawRecord]:
    """Every record of ``topic`` as ``(partition, offset, value, timestamp_ms)``, read to partition EOF.

    ``timestamp_ms`` is the record's Kafka timestamp (None when it has none); ``kafka`` is
    a ``sinks.kafka_client.KafkaConnection`` or bootstrap servers.
    ``ranges`` limits partitions to ``[first, last)`` offsets. End offsets are
    not trusted (some brokers under-report them); the EOF signal is.
    """
    import time

    from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, KafkaError, TopicPartition

    from sinks.kafka_client import as_connection, list_topics

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
                    kind, timestamp_ms = message.timestamp()
                    records.append((partition, offset, message.value(),
                                    None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp_ms))
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
