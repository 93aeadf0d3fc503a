"""Rows ClickHouse cannot take, kept in ``usage_rejected_rows`` instead of stopping billing.

A row can be impossible to write while every other row is fine: a total beyond its column
(``Decimal(76, 18)``: it would take 10**38 events of the largest value, so no realistic stream
gets there, but a table not yet widened by ``tallyflow migrate`` refuses a total beyond
``Decimal(38, 18)``), or a value the engine refuses for another reason tied to that row. Retrying
such an insert cannot succeed, and failing the flow would only fail again after every restart:
billing would stop for every tenant. So the ClickHouse sink

1. keeps out, before encoding, every row whose sum does not fit its column
   (reason ``total_out_of_range``);
2. when the engine refuses a batch with an error about the data (``ROW_ERROR_CODES``), splits
   the batch in halves until the refused rows are alone (about ``2 × log2(batch)`` inserts per
   bad row; every other row is written, idempotently), and keeps them out (reason
   ``clickhouse_refused``, the engine's message as ``detail``);

and writes each kept-out row to ``usage_rejected_rows``: which table it was for, its key, the
reason, and the whole row as JSON (``row_json``) with exact decimal text. Nothing is lost, nothing loops: an
ERROR log line and ``tallyflow_sink_rows_rejected_total{table,reason}`` say it happened, and the
row can be written by hand once the cause is fixed. Any other engine error (no such table, access
denied, …) is about the setup, not a row: it still stops the flow with the engine's message, and
the replay after the fix writes everything.

    >>> from state.records import WindowRow
    >>> row = WindowRow("o", "c", "x", 0, 60_000, 2, 10**76, 3, grain="hour")
    >>> fits(row)
    False
    >>> rejected_record("usage_aggregates_hourly", row, "total_out_of_range", "")["row_key"]
    '["o","c","x","1970-01-01 00:00:00.000"]'
"""

from __future__ import annotations

import logging
import re

import msgspec

from operators.telemetry import metrics
from operators.validation import format_scaled
from sinks.schema import TABLES_BY_NAME, USAGE_REJECTED_ROWS, USAGE_REJECTED_ROWS_COLUMNS
from state.records import LateRecord, MetricRow, WindowRow
from state.utc_calendar import utc_text

log = logging.getLogger(__name__)

ROW_ERROR_CODES = frozenset({
    6,    # CANNOT_PARSE_TEXT
    26,   # CANNOT_PARSE_QUOTED_STRING
    27,   # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38,   # CANNOT_PARSE_DATE
    41,   # CANNOT_PARSE_DATETIME
    53,   # TYPE_MISMATCH
    69,   # ARGUMENT_OUT_OF_BOUND ("Decimal value is too big")
    70,   # CANNOT_CONVERT_TYPE
    72,   # CANNOT_PARSE_NUMBER
    117,  # INCORRECT_DATA
    131,  # TOO_LARGE_STRING_SIZE
    321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
    407,  # DECIMAL_OVERFLOW
})
"""ClickHouse errors about the values of some row: retrying the same rows cannot succeed."""


_encoder = msgspec.json.Encoder()
_DECIMAL_DIGITS = re.compile(r"Decimal\((\d+), 18\)")


def _limit(kind: str) -> int:
    """The first scaled integer a ``Decimal(P, 18)`` column cannot hold: ``10**P``."""
    match = _DECIMAL_DIGITS.fullmatch(kind)
    if match is None:
        raise ValueError(f"not a Decimal(P, 18) column type: {kind!r}")
    return 10 ** int(match.group(1))


def _column_kind(table: str, column: str) -> str:
    return dict(TABLES_BY_NAME[table].columns)[column]


_WINDOW_LIMIT = _limit(_column_kind("usage_aggregates", "total_value"))
_METRIC_LIMIT = _limit(_column_kind("metric_aggregates", "value"))
_LATE_LIMIT = _limit(_column_kind("usage_late_events", "value"))


def fits(item: WindowRow | MetricRow | LateRecord) -> bool:
    """Whether the row's sum (or value) fits its column's ``Decimal(P, 18)``."""
    if isinstance(item, WindowRow):
        return -_WINDOW_LIMIT < item.total_scaled < _WINDOW_LIMIT
    if isinstance(item, MetricRow):
        return -_METRIC_LIMIT < item.value_scaled < _METRIC_LIMIT
    return -_LATE_LIMIT < item.value_scaled < _LATE_LIMIT


def _key_and_row(item: WindowRow | MetricRow | LateRecord) -> tuple[list, dict, int]:
    row = msgspec.structs.asdict(item)
    for name in ("total_scaled", "value_scaled"):
        if name in row:
            row[name] = format_scaled(row[name])
    if isinstance(item, LateRecord):
        row["raw"] = item.raw.decode("utf-8", "replace")
        return [item.source_topic, item.source_partition, item.source_offset, item.reason], row, 0
    start = utc_text(item.window_start_ms)
    if isinstance(item, MetricRow):
        return [item.metric, item.organization_id, item.external_customer_id, item.group_key, start], \
            row, item.version
    return [item.organization_id, item.external_customer_id, item.code, start], row, item.version


def rejected_record(table: str, item, reason: str, detail: str) -> dict:
    """The ``usage_rejected_rows`` row keeping ``item`` (meant for ``table``)."""
    key, row, version = _key_and_row(item)
    return {"source_table": table, "row_key": _encoder.encode(key).decode(), "reason": reason,
            "detail": detail[:4_096], "row_json": _encoder.encode(row).decode(), "version": version}


def write_rejected(backend, table: str, items: list, reason: str, detail: str) -> None:
    """Keep ``items`` in ``usage_rejected_rows``, count them and say so (ERROR)."""
    payload = _encoder.encode_lines([rejected_record(table, item, reason, detail) for item in items])
    backend.insert_json_each_row(USAGE_REJECTED_ROWS, USAGE_REJECTED_ROWS_COLUMNS, payload)
    metrics.record_rows_rejected(table, reason, len(items))
    log.error("rows ClickHouse cannot take were written to %s instead", USAGE_REJECTED_ROWS,
              extra={"table": table, "rows": len(items), "reason": reason, "detail": detail[:500]})
