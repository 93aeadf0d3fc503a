"""The Arrow batches the sink sends equal, byte for byte, those of the plain per-value encoder.

``reference_batch`` below is the encoder the sink used before it was made columnar in bulk:
one ``getattr`` per row and column, Python clamping of times, and every decimal written with
``int.to_bytes`` into Arrow's little-endian two's complement. It imports nothing from the
project (the tables' column types are written out here, and checked against ``sinks.schema``).
Hypothesis compares it with ``sinks.columnar`` on random rows of every table the sink writes,
with the extremes mixed in: sums at ``±(10**P - 1)`` and past 64 and 128 bits (and blocks
whose sums all fit 128 bits, as billing's do), zero, window ends past year 9999, times past
64 bits, UInt64's maximum, ids with NUL, emoji and lone surrogates. A sum beyond its column must raise the same error, naming the column.
"""

from __future__ import annotations

import re

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sinks.columnar import DecimalOverflow, arrow_stream, block_batch, late_batch, metric_batch, window_batch
from sinks.schema import TABLES_BY_NAME
from state.records import LateRecord, MetricRow, WindowRow, WindowRowBlock, expanded

# ------------------------------------------------------------------ the reference encoder

DATETIME_MIN_MS, DATETIME_MAX_MS = -2_208_988_800_000, 253_402_300_799_999  # 1900 .. 9999 (ms)
TIME = "DateTime64(3, 'UTC')"
WINDOW_COLUMNS = [  # (column, ClickHouse type, attribute of the row)
    ("organization_id", "String", "organization_id"),
    ("external_customer_id", "String", "external_customer_id"), ("code", "String", "code"),
    ("window_start", TIME, "window_start_ms"), ("window_end", TIME, "window_end_ms"),
    ("event_count", "UInt64", "event_count"), ("total_value", "Decimal(76, 18)", "total_scaled"),
    ("version", "UInt64", "version"), ("is_deleted", "UInt8", "is_deleted"),
]
METRIC_COLUMNS = [
    ("metric", "LowCardinality(String)", "metric"), ("organization_id", "String", "organization_id"),
    ("external_customer_id", "String", "external_customer_id"), ("group_key", "String", "group_key"),
    ("window_start", TIME, "window_start_ms"), ("window_end", TIME, "window_end_ms"),
    ("value", "Decimal(76, 18)", "value_scaled"), ("event_count", "UInt64", "event_count"),
    ("version", "UInt64", "version"), ("is_deleted", "UInt8", "is_deleted"),
]
LATE_COLUMNS = [
    ("organization_id", "String", "organization_id"),
    ("external_customer_id", "String", "external_customer_id"), ("code", "String", "code"),
    ("transaction_id", "String", "transaction_id"), ("event_time", TIME, "timestamp_ms"),
    ("value", "Decimal(38, 18)", "value_scaled"), ("reason", "LowCardinality(String)", "reason"),
    ("watermark", TIME, lambda r: max(r.watermark_ms, 0)),
    ("source_topic", "String", "source_topic"), ("source_partition", "UInt32", "source_partition"),
    ("source_offset", "UInt64", "source_offset"),
    ("raw", "String", lambda r: r.raw.decode("utf-8", "replace")),
]
WINDOW_TABLES = ("usage_aggregates", "usage_aggregates_hourly", "usage_aggregates_daily")
COLUMNS = {**{t: WINDOW_COLUMNS for t in WINDOW_TABLES}, "metric_aggregates": METRIC_COLUMNS,
           "usage_late_events": LATE_COLUMNS}


class ReferenceOverflow(ValueError):
    pass


def reference_decimal(values: list, kind: str, column: str) -> pa.Array:
    precision = int(re.match(r"Decimal\((\d+), 18\)", kind).group(1))
    arrow_type = pa.decimal128(precision, 18) if precision <= 38 else pa.decimal256(precision, 18)
    for value in values:
        if abs(value) >= 10**precision:
            raise ReferenceOverflow(f"{column}: {value} does not fit {kind}")
    data = b"".join(v.to_bytes(arrow_type.byte_width, "little", signed=True) for v in values)
    return pa.Array.from_buffers(arrow_type, len(values), [None, pa.py_buffer(data)])


def reference_column(values: list, kind: str, column: str) -> pa.Array:
    if kind.startswith("Decimal"):
        return reference_decimal(values, kind, column)
    if kind == TIME:
        clamped = [min(max(v, DATETIME_MIN_MS), DATETIME_MAX_MS) for v in values]
        return pa.array(clamped, pa.timestamp("ms", tz="UTC"))
    if kind.startswith("UInt"):
        return pa.array([int(v) for v in values], getattr(pa, kind.lower())())
    texts = [v.encode("utf-8", "replace").decode() for v in values]  # a lone surrogate -> "?"
    return pa.array(texts, pa.string())


def reference_batch(rows: list, table: str, extra: tuple[str, ...] = (), attributes=None):
    arrays, names = [], []
    for column, kind, attribute in COLUMNS[table]:
        read = attribute if callable(attribute) else (lambda r, a=attribute: getattr(r, a))
        arrays.append(reference_column([read(r) for r in rows], kind, column))
        names.append(column)
    for i, field in enumerate(extra):
        found = [attributes.get((r.organization_id, r.external_customer_id), ("",) * len(extra))[i]
                 for r in rows]
        arrays.append(reference_column(found, "String", field))
        names.append(field)
    return pa.record_batch(arrays, names=names)


def test_the_reference_knows_the_tables_as_the_schema_defines_them():
    for table, columns in COLUMNS.items():
        assert [(c, k) for c, k, _ in columns] == list(TABLES_BY_NAME[table].columns)


# ------------------------------------------------------------------ random rows, with extremes

def edges(precision: int) -> list[int]:
    top = 10**precision - 1
    return [0, 1, -1, top, -top, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**64, -(2**64),
            2**127 - 1, -(2**127), 2**127, -(2**127) - 1, 10**38 - 1, -(10**38 - 1)]


def sums(precision: int):
    top = 10**precision - 1
    in_range = [v for v in edges(precision) if abs(v) <= top]
    return st.one_of(st.sampled_from(in_range), st.integers(-(2**63), 2**63 - 1),
                     st.integers(-top, top), st.integers(1, 1000).map(lambda units: units * 10**18 + 7))


texts = st.one_of(st.text(max_size=8), st.sampled_from(["", "a\x00b", "é☃𝄞", "ｏｒｇ", "\u200b\ufeff",
                                                         "lone\ud800", 'q"uo\\te', "x" * 300]))
times = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**70), 2**70),
                  st.sampled_from([0, DATETIME_MIN_MS - 1, DATETIME_MAX_MS, DATETIME_MAX_MS + 1,
                                   253_402_300_800_000, 253_402_387_200_000, 1_767_225_600_000]))
uint64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**64 - 1]))
window_rows = st.builds(WindowRow, texts, texts, texts, times, times, uint64, sums(76), uint64,
                        st.booleans(), st.sampled_from(["", "hour", "day"]))
metric_rows = st.builds(MetricRow, texts, texts, texts, texts, times, times, sums(76), uint64,
                        uint64, st.booleans())
late_records = st.builds(LateRecord, texts, texts, texts, texts, times, sums(38), texts, times,
                         texts, st.integers(0, 2**32 - 1), uint64, st.binary(max_size=12))
checks = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def reference_stream(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def assert_same_batch(ours: pa.RecordBatch, reference: pa.RecordBatch) -> None:
    assert ours.schema == reference.schema
    assert ours.equals(reference)
    assert arrow_stream(ours) == reference_stream(reference)  # what ClickHouse receives


@checks
@given(st.lists(window_rows, max_size=40), st.sampled_from(WINDOW_TABLES))
def test_window_batches_equal_the_reference(rows, table):
    assert_same_batch(window_batch(rows, table), reference_batch(rows, table))


@checks
@given(st.lists(window_rows, min_size=1, max_size=20), st.data())
def test_enriched_window_batches_equal_the_reference(rows, data):
    keys = [(r.organization_id, r.external_customer_id) for r in rows]
    known = data.draw(st.lists(st.sampled_from(keys), unique=True))
    attributes = {key: (data.draw(texts), data.draw(texts)) for key in known}
    fields = ("plan", "region")
    assert_same_batch(window_batch(rows, "usage_aggregates", (fields, attributes)),
                      reference_batch(rows, "usage_aggregates", fields, attributes))


@checks
@given(st.lists(metric_rows, max_size=40))
def test_metric_batches_equal_the_reference(rows):
    assert_same_batch(metric_batch(rows, "metric_aggregates"), reference_batch(rows, "metric_aggregates"))


@checks
@given(st.lists(late_records, max_size=40))
def test_late_event_batches_equal_the_reference(records):
    assert_same_batch(late_batch(records, "usage_late_events"),
                      reference_batch(records, "usage_late_events"))


def overflowing(precision: int):
    top = 10**precision
    return st.one_of(st.sampled_from([top, -top, 2**256, -(2**256), 2**300]),
                     st.integers(top, 2**260), st.integers(-(2**260), -top))


@checks
@given(st.lists(window_rows, max_size=10), overflowing(76), st.data())
def test_a_sum_beyond_its_column_is_refused_naming_it(rows, too_big, data):
    at = data.draw(st.integers(0, len(rows)))
    row = WindowRow("o", "c", "x", 0, 60_000, 1, too_big, 1)
    rows = rows[:at] + [row] + rows[at:]
    with pytest.raises(ReferenceOverflow):
        reference_batch(rows, "usage_aggregates")
    with pytest.raises(DecimalOverflow, match=r"^total_value: -?\d+\.\d{18} does not fit Decimal\(76, 18\)$"):
        window_batch(rows, "usage_aggregates")


@checks
@given(st.lists(late_records, max_size=10), overflowing(38))
def test_a_late_value_beyond_its_column_is_refused_naming_it(records, too_big):
    records = records + [LateRecord("o", "c", "x", "t", 0, too_big, "late", 0, "usage", 0, 1, b"")]
    with pytest.raises(ReferenceOverflow):
        reference_batch(records, "usage_late_events")
    with pytest.raises(DecimalOverflow, match=r"^value: -?\d+\.\d{18} does not fit Decimal\(38, 18\)$"):
        late_batch(records, "usage_late_events")


def test_the_overflow_names_the_most_negative_sum_first_then_the_largest():
    """As before: the smallest sum is checked first, then the largest."""
    rows = [WindowRow("o", "c", "x", 0, 60_000, 1, total, 1) for total in (10**76, 5, -(10**77))]
    with pytest.raises(DecimalOverflow, match=r"^total_value: -100000000000000000000000000000000000000000000000000000000000\.0{18} "):
        window_batch(rows, "usage_aggregates")
    rows = [WindowRow("o", "c", "x", 0, 60_000, 1, total, 1) for total in (2**64, 10**76 + 1)]
    with pytest.raises(DecimalOverflow, match=r"^total_value: 10000000000000000000000000000000000000000000000000000000000\.0{17}1 "):
        window_batch(rows, "usage_aggregates")


# ------------------------------------------------------------------ windows' first rows as blocks

def _block(grain: str, start: int, end: int, version: int, entries: list) -> WindowRowBlock:
    keys = [key for key, _count, _total in entries]
    return WindowRowBlock(grain, start, end, version, keys, tuple(c for _k, c, _t in entries),
                          tuple(t for _k, _c, t in entries))


def row_blocks_of(totals):
    return st.builds(_block, st.sampled_from(["", "hour", "day"]), times, times, uint64,
                     st.lists(st.tuples(st.tuples(texts, texts, texts), st.integers(1, 2**64 - 1), totals),
                              max_size=12))


blocks = row_blocks_of(sums(76))
# Billing's sums: most are past 64 bits (9.3 units and up) and within 128 (the encoder's split).
within_128_bits = st.one_of(st.integers(-(2**127), 2**127 - 1), st.sampled_from([v for v in edges(38) if -(2**127) <= v < 2**127]),
                            st.integers(-(10**9), 10**9).map(lambda units: units * 10**18 + 7))


@checks
@given(st.lists(blocks, max_size=5), st.sampled_from(WINDOW_TABLES))
def test_row_blocks_encode_as_their_rows_would(row_blocks, table):
    rows = expanded(row_blocks)
    assert_same_batch(block_batch(row_blocks, table), reference_batch(rows, table))


@checks
@given(st.lists(row_blocks_of(within_128_bits), max_size=5), st.sampled_from(WINDOW_TABLES))
def test_row_blocks_of_sums_within_128_bits_encode_as_their_rows_would(row_blocks, table):
    rows = expanded(row_blocks)
    assert_same_batch(block_batch(row_blocks, table), reference_batch(rows, table))


@checks
@given(st.lists(blocks, min_size=1, max_size=4), st.data())
def test_enriched_row_blocks_encode_as_their_rows_would(row_blocks, data):
    rows = expanded(row_blocks)
    keys = [(r.organization_id, r.external_customer_id) for r in rows]
    known = data.draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []
    attributes = {key: (data.draw(texts), data.draw(texts)) for key in known}
    fields = ("plan", "region")
    assert_same_batch(block_batch(row_blocks, "usage_aggregates", (fields, attributes)),
                      reference_batch(rows, "usage_aggregates", fields, attributes))


def test_a_block_sum_beyond_its_column_is_refused_naming_it():
    block = _block("", 0, 60_000, 1, [(("o", "c", "x"), 1, 10**76)])
    with pytest.raises(DecimalOverflow, match="total_value"):
        block_batch([block], "usage_aggregates")
