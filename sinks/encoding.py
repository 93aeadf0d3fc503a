"""Rows as ClickHouse JSONEachRow: exact decimals as strings, times as UTC text.

    >>> from state.records import WindowRow
    >>> encode_window_rows([WindowRow("o", "c", "x", 0, 60_000, 2, 15 * 10**17, 2)])
    b'{"organization_id":"o","external_customer_id":"c","code":"x","window_start":"1970-01-01 00:00:00.000","window_end":"1970-01-01 00:01:00.000","event_count":2,"total_value":"1.500000000000000000","version":2,"is_deleted":0}\\n'
"""

from __future__ import annotations

from functools import lru_cache

import msgspec

from operators.validation import format_scaled
from state.records import LateRecord, MetricRow, WindowRow
from state.utc_calendar import utc_text

DATETIME64_MIN_MS = -2_208_988_800_000  # 1900-01-01 00:00:00.000, ClickHouse's first DateTime64
DATETIME64_MAX_MS = 253_402_300_799_999  # 9999-12-31 23:59:59.999, the last time ClickHouse parses
_encoder = msgspec.json.Encoder()


@lru_cache(maxsize=4096)
def format_datetime64(epoch_ms: int) -> str:
    """Epoch milliseconds as ClickHouse DateTime64(3) text in UTC; never raises.

    Integer calendar arithmetic, so the end of a window or rollup past year 9999 (the day after
    9999-12-31) is a time like any other. A time outside what ClickHouse parses is written at
    the nearest end of that range: only a window's end can get there (event times are
    validated), and it is not part of any row's key.

    >>> format_datetime64(253_402_214_400_000), format_datetime64(253_402_300_800_000)
    ('9999-12-31 00:00:00.000', '9999-12-31 23:59:59.999')
    """
    return utc_text(min(max(epoch_ms, DATETIME64_MIN_MS), DATETIME64_MAX_MS))


def _window_row(r: WindowRow) -> dict:
    return {
        "organization_id": r.organization_id,
        "external_customer_id": r.external_customer_id,
        "code": r.code,
        "window_start": format_datetime64(r.window_start_ms),
        "window_end": format_datetime64(r.window_end_ms),
        "event_count": r.event_count,
        "total_value": format_scaled(r.total_scaled),
        "version": r.version,
        "is_deleted": int(r.is_deleted),
    }


def encode_window_rows(rows: list[WindowRow]) -> bytes:
    return _encoder.encode_lines([_window_row(r) for r in rows])


def encode_enriched_window_rows(rows: list[WindowRow], fields: tuple[str, ...],
                                attributes: dict) -> bytes:
    """Window rows plus a column per field; ``attributes`` maps (org, customer) to the values.

    >>> row = WindowRow("o", "c", "x", 0, 60_000, 1, 0, 1)
    >>> encode_enriched_window_rows([row], ("plan",), {("o", "c"): ("pro",)}).endswith(b',"plan":"pro"}\\n')
    True
    """
    empty = ("",) * len(fields)
    lines = []
    for r in rows:
        line = _window_row(r)
        line.update(zip(fields, attributes.get((r.organization_id, r.external_customer_id), empty)))
        lines.append(line)
    return _encoder.encode_lines(lines)


def encode_metric_rows(rows: list[MetricRow]) -> bytes:
    return _encoder.encode_lines(
        [
            {
                "metric": r.metric,
                "organization_id": r.organization_id,
                "external_customer_id": r.external_customer_id,
                "group_key": r.group_key,
                "window_start": format_datetime64(r.window_start_ms),
                "window_end": format_datetime64(r.window_end_ms),
                "value": format_scaled(r.value_scaled),
                "event_count": r.event_count,
                "version": r.version,
                "is_deleted": int(r.is_deleted),
            }
            for r in rows
        ]
    )


def encode_late_records(records: list[LateRecord]) -> bytes:
    return _encoder.encode_lines(
        [
            {
                "organization_id": r.organization_id,
                "external_customer_id": r.external_customer_id,
                "code": r.code,
                "transaction_id": r.transaction_id,
                "event_time": format_datetime64(r.timestamp_ms),
                "value": format_scaled(r.value_scaled),
                "reason": r.reason,
                "watermark": format_datetime64(max(r.watermark_ms, 0)),
                "source_topic": r.source_topic,
                "source_partition": r.source_partition,
                "source_offset": r.source_offset,
                "raw": r.raw.decode("utf-8", "replace"),
            }
            for r in records
        ]
    )
