"""The columnar (Arrow) output path writes exactly what an independent JSONEachRow encoder writes.

The oracle below builds JSON rows from plain dicts with ``decimal`` and ``datetime`` only (no
project code); the sink partition writes the same rows through ``sinks.columnar`` and
``insert_arrow``. Both land in identical tables of one engine (the sink's in ``default``, the
oracle's in ``oracle``) and every column is compared, as text and as values, on both backends
(embedded chdb and the HTTP dev server). Extreme values: the largest and smallest sums the
column's ``Decimal(P, 18)`` holds, 18 decimal places, the epoch and year 9999, UInt64's
maximum, and ids with NUL, quotes, backslashes, emoji, full-width and zero-width characters.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from state.records import LateRecord, MetricRow, WindowRow, WindowRows
from sinks.clickhouse_backend import ClickHouseBackend, connect
from sinks.clickhouse_sink import ClickHousePartition
from sinks.columnar import DecimalOverflow, window_batch
from sinks.schema import TABLES, TABLES_BY_NAME, create_statement

pytestmark = pytest.mark.integration

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
UINT64_MAX = 2**64 - 1
YEAR_9999_END_MS = 253_402_300_799_999
ODD_IDS = ["org", "é☃𝄞", "a\x00b", 'q"uo\\te', "ｏｒｇ", "\u200b\ufeff", "x" * 256, "line\nbreak", ""]


def precision(table: str, column: str) -> int:
    """Digits of a ``Decimal(P, 18)`` column, read from the schema (38 today, 76 when widened)."""
    kind = dict(TABLES_BY_NAME[table].columns)[column]
    return int(re.match(r"Decimal\((\d+),", kind).group(1))


# ------------------------------------------------------------------ the independent oracle


def decimal_text(scaled: int) -> str:
    return format(Decimal(f"{scaled}E-18"), "f")  # exact (no context rounding), plain digits


def datetime_text(epoch_ms: int) -> str:
    moment = EPOCH + timedelta(milliseconds=epoch_ms)
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{epoch_ms % 1000:03d}"


def oracle_window(row: dict) -> dict:
    return {"organization_id": row["org"], "external_customer_id": row["customer"],
            "code": row["code"], "window_start": datetime_text(row["start"]),
            "window_end": datetime_text(row["end"]), "event_count": row["count"],
            "total_value": decimal_text(row["total"]), "version": row["version"],
            "is_deleted": 1 if row["deleted"] else 0}


def oracle_metric(row: dict) -> dict:
    return {"metric": row["metric"], "organization_id": row["org"],
            "external_customer_id": row["customer"], "group_key": row["group"],
            "window_start": datetime_text(row["start"]), "window_end": datetime_text(row["end"]),
            "value": decimal_text(row["value"]), "event_count": row["count"],
            "version": row["version"], "is_deleted": 1 if row["deleted"] else 0}


def oracle_late(row: dict) -> dict:
    return {"organization_id": row["org"], "external_customer_id": row["customer"],
            "code": row["code"], "transaction_id": row["txn"],
            "event_time": datetime_text(row["time"]), "value": decimal_text(row["value"]),
            "reason": row["reason"], "watermark": datetime_text(max(row["watermark"], 0)),
            "source_topic": row["topic"], "source_partition": row["partition"],
            "source_offset": row["offset"], "raw": row["raw"].decode("utf-8", "replace")}


def json_each_row(objects: list[dict]) -> bytes:
    return b"".join(json.dumps(o, ensure_ascii=False).encode() + b"\n" for o in objects)


# ------------------------------------------------------------------ the rows


def window_row(row: dict, grain: str = "") -> WindowRow:
    return WindowRow(row["org"], row["customer"], row["code"], row["start"], row["end"],
                     row["count"], row["total"], row["version"], row["deleted"], grain)


def extreme_windows(table: str = "usage_aggregates") -> list[dict]:
    top = 10 ** precision(table, "total_value") - 1
    totals = [top, -top, 1, -1, 0, 123_456_789_012_345_678, -10**18 - 1, 10**36 + 7]
    rows = []
    for i, org in enumerate(ODD_IDS):
        rows.append({"org": org, "customer": ODD_IDS[-1 - i], "code": ODD_IDS[i // 2],
                     "start": [0, YEAR_9999_END_MS - 59_999, 1_767_225_600_000][i % 3],
                     "end": [60_000, YEAR_9999_END_MS, 1_767_225_660_000][i % 3],
                     "count": [UINT64_MAX, 0, 1][i % 3], "total": totals[i % len(totals)],
                     "version": [1, UINT64_MAX, 7][i % 3], "deleted": i % 4 == 3})
    return rows


def extreme_metrics() -> list[dict]:
    top = 10 ** precision("metric_aggregates", "value") - 1
    return [{"metric": m, "org": org, "customer": "c", "group": g, "start": s, "end": s + 60_000,
             "value": v, "count": n, "version": 2, "deleted": False}
            for m, org, g, s, v, n in [("sum_gb", "é☃𝄞", "", 0, top, 1),
                                       ("max_x", "a\x00b", 'region="eu"', 1_767_225_600_000, -top, 0),
                                       ("count", "ｏｒｇ", "k\\v", YEAR_9999_END_MS - 60_000, 1, UINT64_MAX)]]


def extreme_late() -> list[dict]:
    top = 10 ** precision("usage_late_events", "value") - 1
    return [{"org": org, "customer": "c", "code": "x", "txn": f"t{i}", "time": t, "value": v,
             "reason": "late", "watermark": w, "topic": "usage", "partition": i,
             "offset": UINT64_MAX - i, "raw": raw}
            for i, (org, t, v, w, raw) in enumerate([
                ("é☃𝄞", 0, top, -5, b'{"a":1}'), ("a\x00b", YEAR_9999_END_MS, -top, 10, b"\xff\xfe bad"),
                ("ｏｒｇ", 1_767_225_600_000, 10**17, 1_767_225_600_000, "ünï".encode())])]


# ------------------------------------------------------------------ writing both ways


@pytest.fixture
def backend(clickhouse_url: str) -> Iterator[ClickHouseBackend]:
    opened = connect(clickhouse_url)
    try:
        opened.command("CREATE DATABASE IF NOT EXISTS oracle")
        for table in TABLES:
            opened.command(create_statement(table))
            opened.command(create_statement(replace(table, name=f"oracle.{table.name}")))
        yield opened
    finally:
        opened.close()


def write_both(backend: ClickHouseBackend, table: str, items: list, oracle_rows: list[dict]) -> None:
    partition = ClickHousePartition(backend, max_rows=1_000_000, max_age_s=3600.0,
                                    table_of=lambda _row: table)  # one typed stream, one table
    partition.write_batch(items)
    partition.flush()
    columns = list(oracle_rows[0])
    backend.insert_json_each_row(f"oracle.{table}", columns, json_each_row(oracle_rows))


def table_contents(backend: ClickHouseBackend, table: str) -> tuple[list, list]:
    """Every column as values and as ClickHouse's own text (``toString``), in a fixed order."""
    names = TABLES_BY_NAME[table.split(".")[-1]].column_names
    text = ", ".join(f"hex(toString({name}))" for name in names)
    order = ", ".join(names)
    _, values = backend.query(f"SELECT {order} FROM {table} ORDER BY {order}")
    _, texts = backend.query(f"SELECT {text} FROM {table} ORDER BY {order}")
    return values, texts


def assert_same(backend: ClickHouseBackend, table: str, rows: int) -> None:
    ours, theirs = table_contents(backend, table), table_contents(backend, f"oracle.{table}")
    assert len(ours[0]) == rows
    assert ours == theirs


def test_window_rows_match_the_oracle_at_the_extremes(backend):
    for grain, table in (("", "usage_aggregates"), ("hour", "usage_aggregates_hourly"),
                         ("day", "usage_aggregates_daily")):
        rows = extreme_windows(table)
        write_both(backend, table, [window_row(r, grain) for r in rows], [oracle_window(r) for r in rows])
        assert_same(backend, table, len(rows))


def test_metric_rows_and_late_events_match_the_oracle(backend):
    metrics = extreme_metrics()
    items = [MetricRow(r["metric"], r["org"], r["customer"], r["group"], r["start"], r["end"],
                       r["value"], r["count"], r["version"], r["deleted"]) for r in metrics]
    write_both(backend, "metric_aggregates", items, [oracle_metric(r) for r in metrics])
    assert_same(backend, "metric_aggregates", len(metrics))
    late = extreme_late()
    items = [LateRecord(r["org"], r["customer"], r["code"], r["txn"], r["time"], r["value"],
                        r["reason"], r["watermark"], r["topic"], r["partition"], r["offset"],
                        r["raw"]) for r in late]
    write_both(backend, "usage_late_events", items, [oracle_late(r) for r in late])
    assert_same(backend, "usage_late_events", len(late))


def test_the_encoder_refuses_a_sum_beyond_its_column_naming_it():
    """The sink keeps such rows out before encoding (``sinks.rejected``); the encoder still
    refuses one rather than let Arrow wrap it into another value."""
    too_big = 10 ** precision("usage_aggregates", "total_value")
    for total in (too_big, -too_big):
        rows = [window_row({**extreme_windows()[0], "total": t}) for t in (1, total)]
        with pytest.raises(DecimalOverflow, match="total_value"):
            window_batch(rows, "usage_aggregates")


ids = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
scaled = st.integers(min_value=-(10**38) + 1, max_value=10**38 - 1)
instants = st.integers(min_value=0, max_value=YEAR_9999_END_MS - 60_000)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.fixed_dictionaries({
    "org": ids, "customer": ids, "code": ids, "start": instants,
    "count": st.integers(0, UINT64_MAX), "total": scaled, "version": st.integers(0, UINT64_MAX),
    "deleted": st.booleans()}), min_size=1, max_size=30,
    unique_by=lambda r: (r["org"], r["customer"], r["code"], r["start"])))  # one row per key
def test_any_window_rows_match_the_oracle(chdb_url, rows):
    backend = connect(chdb_url)
    try:
        for name in ("usage_aggregates", "oracle.usage_aggregates"):
            backend.command(f"DROP TABLE IF EXISTS {name}")
        backend.command("CREATE DATABASE IF NOT EXISTS oracle")
        table = TABLES_BY_NAME["usage_aggregates"]
        backend.command(create_statement(table))
        backend.command(create_statement(replace(table, name="oracle.usage_aggregates")))
        rows = [{**r, "end": r["start"] + 60_000} for r in rows]
        write_both(backend, "usage_aggregates", [window_row(r) for r in rows],
                   [oracle_window(r) for r in rows])
        assert_same(backend, "usage_aggregates", len(rows))
    finally:
        backend.close()


def test_row_batches_go_to_their_grains_tables_and_count_as_rows(backend):
    """The shard step sends ``WindowRows`` batches: the partition buffers their rows by count
    (not by item) and writes each to its grain's table. (Inserts run in the background:
    ``settle`` waits for those handed over, and writes nothing still buffered.)"""
    partition = ClickHousePartition(backend, max_rows=3, max_age_s=3600.0)
    counts = lambda: partition.settle() or [backend.query(f"SELECT count() FROM {t}")[1][0][0]
                                            for t in ("usage_aggregates", "usage_aggregates_hourly")]
    minute = lambda c: WindowRow("o", c, "x", 0, 60_000, 1, 10**18, 1)
    hour = lambda c: WindowRow("o", c, "x", 0, 3_600_000, 1, 10**18, 1, grain="hour")
    partition.write_batch([WindowRows("", [minute("first")])])  # nothing written yet: at once
    assert counts() == [1, 0]
    partition.write_batch([WindowRows("", [minute("a"), minute("b")])])
    assert counts() == [1, 0]  # 2 rows buffered, under max_rows
    partition.write_batch([WindowRows("hour", [hour("a"), hour("b")])])
    assert counts() == [3, 2]  # 4 rows >= 3: flushed, each batch to its table
