"""Read what ClickHouse holds, diff it against the recomputation, and report.

Every table is compared as ``{key: values}``; a key on one side only is a difference::

    >>> from decimal import Decimal
    >>> diff({("o", "c", "x", 0): (2, Decimal("1.0"))}, {("o", "c", "x", 0): (2, Decimal("1.000"))})
    []
    >>> [d.actual for d in diff({("k",): (1, Decimal(1))}, {("k",): (1, Decimal(2))})]
    [(1, Decimal('2'))]
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from recovery.reconcile.recompute import LateRow, Recomputation

AGGREGATE_TABLES = {"": "usage_aggregates", "hour": "usage_aggregates_hourly",
                    "day": "usage_aggregates_daily"}


@dataclass(frozen=True)
class Difference:
    key: tuple
    expected: tuple | None
    actual: tuple | None
    table: str = "usage_aggregates"


def diff(expected: dict, actual: dict, table: str = "usage_aggregates") -> list[Difference]:
    """Every key whose values differ (Decimals compare by value), or that one side lacks."""
    differences = []
    for key in sorted(set(expected) | set(actual), key=repr):
        want, have = expected.get(key), actual.get(key)
        if want is None or have is None or tuple(want) != tuple(have):
            differences.append(Difference(key, want, have, table))
    return differences


def read_aggregates(backend, table: str = "usage_aggregates") -> dict[tuple, tuple[int, Decimal]]:
    """``table FINAL`` (usage or a rollup) as ``{(org, customer, code, start_ms): (count, total)}``."""
    _, rows = backend.query(
        "SELECT organization_id, external_customer_id, code, toUnixTimestamp64Milli(window_start), "
        f"event_count, total_value FROM {table} FINAL")
    return {(r[0], r[1], r[2], int(r[3])): (int(r[4]), Decimal(r[5])) for r in rows}


def read_metrics(backend, names: set[str]) -> dict[tuple, tuple[int, Decimal]]:
    """``metric_aggregates FINAL`` rows of the metrics ``names``, keyed like the recomputation."""
    _, rows = backend.query(
        "SELECT metric, organization_id, external_customer_id, group_key, "
        "toUnixTimestamp64Milli(window_start), event_count, value FROM metric_aggregates FINAL")
    return {(r[0], r[1], r[2], r[3], int(r[4])): (int(r[5]), Decimal(r[6]))
            for r in rows if r[0] in names}


def read_late(backend, topic: str) -> dict[tuple, LateRow]:
    """``usage_late_events FINAL`` rows from ``topic`` as ``{(partition, offset, reason): LateRow}``."""
    _, rows = backend.query(
        "SELECT source_partition, source_offset, reason, organization_id, external_customer_id, code, "
        "transaction_id, toUnixTimestamp64Milli(event_time), value, toUnixTimestamp64Milli(watermark) "
        f"FROM usage_late_events FINAL WHERE source_topic = '{_quoted(topic)}'")
    return {(int(r[0]), int(r[1]), r[2]): LateRow(r[3], r[4], r[5], r[6], int(r[7]), Decimal(r[8]), int(r[9]))
            for r in rows}


def count_rejected(backend) -> int:
    """Rows of ``usage_aggregates`` ClickHouse could not take (``usage_rejected_rows``); 0 when
    the table does not exist yet."""
    from sinks.clickhouse_backend import ClickHouseError

    try:
        _, [(count,)] = backend.query("SELECT count() FROM usage_rejected_rows FINAL "
                                      "WHERE source_table = 'usage_aggregates'")
    except ClickHouseError as err:
        if err.code != 60:  # UNKNOWN_TABLE: a store written before the table existed
            raise
        return 0
    return int(count)


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _late_values(rows: dict) -> dict:
    return {key: (row.organization_id, row.external_customer_id, row.code, row.transaction_id,
                  row.event_time_ms, row.value, row.watermark_ms) for key, row in rows.items()}


@dataclass(frozen=True)
class Window:
    """Which rows to compare: window starts (or late events' times) in ``[first_ms, until_ms)``."""

    first_ms: int | None = None
    until_ms: int | None = None

    def keep(self, rows: dict, time_of) -> dict:
        return {key: value for key, value in rows.items()
                if (self.first_ms is None or time_of(key, value) >= self.first_ms)
                and (self.until_ms is None or time_of(key, value) < self.until_ms)}


def compare_all(expected: Recomputation, backend, topic: str,
                window: Window = Window()) -> dict[str, list[Difference]]:
    """Differences per table: usage, each rollup, the recomputed metrics, the late events
    (but the late rows of metrics reconcile does not recompute)."""
    by_start = lambda key, _value: key[-1]  # noqa: E731
    found = {}
    for grain, table in AGGREGATE_TABLES.items():
        if grain and grain not in expected.rollups:
            continue
        want = expected.rollups[grain] if grain else expected.aggregates
        found[table] = diff(window.keep(want, by_start), window.keep(read_aggregates(backend, table), by_start),
                            table)
    if expected.metrics_recomputed:
        found["metric_aggregates"] = diff(
            window.keep(expected.metrics, by_start),
            window.keep(read_metrics(backend, set(expected.metrics_recomputed)), by_start),
            "metric_aggregates")
    by_time = lambda _key, value: value[4]  # noqa: E731
    unknown = {f"window_closed:metric:{name}" for name in expected.metrics_skipped}
    actual_late = {key: row for key, row in read_late(backend, topic).items() if key[2] not in unknown}
    found["usage_late_events"] = diff(window.keep(_late_values(expected.late_rows), by_time),
                                      window.keep(_late_values(actual_late), by_time),
                                      "usage_late_events")
    return found

