"""The sink sends each batch sorted by its table's sorting key, so the engine need not sort it.

``in_key_order`` must be a stable sort by the ``ORDER BY`` columns as ClickHouse compares them
(strings as UTF-8 bytes, times and integers as numbers). The oracle here is Python's stable
``sorted`` over those values; the engine itself is asked to sort the same rows (``ORDER BY``)
and must agree; and what lands in a table is the same whether the batch was sorted or not.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from msgspec.structs import replace
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.clickhouse_backend import connect
from state.records import WindowRow
from sinks.columnar import (_key_order, _stable_argsort, arrow_function, arrow_stream, in_key_order, integers_view,
                             late_batch, metric_batch, window_batch)
from sinks.schema import TABLES_BY_NAME, Table, create_statement
from test_columnar_reference import WINDOW_TABLES, checks, late_records, metric_rows, window_rows


def sort_value(value):
    """A value as the engine orders it: strings by their UTF-8 bytes, times by their instant."""
    return value.encode() if isinstance(value, str) else value


def reference_order(batch: pa.RecordBatch, names) -> list[int]:
    columns = [batch.column(name).cast(pa.int64()) if pa.types.is_timestamp(batch.column(name).type)
               else batch.column(name) for name in names]
    values = [[sort_value(v) for v in column.to_pylist()] for column in columns]
    return sorted(range(batch.num_rows), key=lambda i: tuple(column[i] for column in values))


def assert_key_ordered(batch: pa.RecordBatch, table: str) -> None:
    ordered = in_key_order(batch, table)
    expected = batch.take(pa.array(reference_order(batch, TABLES_BY_NAME[table].order_by), pa.int64()))
    assert ordered.equals(expected)


few_texts = st.sampled_from(["", "a", "a\x00", "b", "é", "ｏ", "𝄞", "A"])  # ties and byte order


@checks
@given(st.lists(window_rows, max_size=40), st.sampled_from(WINDOW_TABLES), st.data())
def test_window_batches_are_sorted_as_the_engine_sorts(rows, table, data):
    tied = [replace(row, organization_id=data.draw(few_texts)) for row in rows]  # equal first keys
    assert_key_ordered(window_batch(rows + tied, table), table)


@checks
@given(st.lists(metric_rows, max_size=40))
def test_metric_batches_are_sorted_as_the_engine_sorts(rows):
    assert_key_ordered(metric_batch(rows, "metric_aggregates"), "metric_aggregates")


@checks
@given(st.lists(late_records, max_size=40))
def test_late_event_batches_are_sorted_as_the_engine_sorts(records):
    assert_key_ordered(late_batch(records, "usage_late_events"), "usage_late_events")


@checks
@given(st.lists(st.tuples(few_texts, st.integers(0, 3), st.text(st.characters(exclude_categories=("Cs",)), max_size=4),
                          st.integers(-5, 5)), min_size=1, max_size=60),
       st.integers(2, 40))
def test_keys_re_ranked_past_the_span_limit_keep_the_order(rows, span_limit):
    columns = [pa.array([row[i] for row in rows]) for i in range(4)]
    expected = sorted(range(len(rows)), key=lambda i: tuple(sort_value(v) for v in rows[i]))
    assert _key_order(columns, span_limit=span_limit).tolist() == expected


@checks
@given(st.integers(1, 2**63 - 1).flatmap(lambda span: st.tuples(
    st.just(span), st.lists(st.one_of(st.integers(0, span - 1), st.sampled_from([0, span - 1])), max_size=80))))
def test_the_radix_sort_is_stable_for_any_span(case):
    span, keys = case
    expected = sorted(range(len(keys)), key=keys.__getitem__)
    assert _stable_argsort(np.array(keys, np.int64), span).tolist() == expected


def test_a_batch_without_its_key_columns_or_with_a_null_key_is_left_as_it_is():
    batch = pa.record_batch([pa.array(["b", "a"])], names=["organization_id"])
    assert in_key_order(batch, "usage_aggregates") is batch
    with_null = pa.record_batch({"organization_id": ["b", "a"], "external_customer_id": ["x", "x"],
                                 "code": ["c", None], "window_start": pa.array([0, 0], pa.timestamp("ms"))})
    assert in_key_order(with_null, "usage_aggregates") is with_null


@pytest.mark.integration
def test_the_engine_sorts_the_rows_as_in_key_order_does_and_stores_the_same(chdb_url):
    ids = ["org", "é☃𝄞", "a\x00b", 'q"uo\\te', "ｏｒｇ", "\u200b\ufeff", "line\nbreak", "", "A", "a"]
    rng = np.random.default_rng(5)
    rows = [WindowRow(ids[a], ids[b], ids[c], 60_000 * int(m), 60_000 * int(m) + 60_000, 1, int(v), int(v) % 3)
            for a, b, c, m, v in rng.integers(0, 10, (400, 5))]
    batch = window_batch(rows, "usage_aggregates")
    table = TABLES_BY_NAME["usage_aggregates"]
    ours = in_key_order(batch, table.name)
    key = ", ".join(table.order_by)
    with connect(chdb_url) as backend:
        for name, sent in (("as_built", batch), ("sorted_here", ours), ("every_row", batch)):
            statement = create_statement(Table(name, table.columns, table.order_by, table.version, table.is_deleted))
            if name == "every_row":  # no replacing: the engine sorts all 400 rows
                statement = statement.replace("ReplacingMergeTree(version, is_deleted)", "MergeTree")
            backend.command(statement)
            backend.insert_arrow(name, sent.schema.names, arrow_stream(sent))
        _, engine_order = backend.query("SELECT organization_id, external_customer_id, code, "
                                        f"toUnixTimestamp64Milli(window_start) FROM every_row ORDER BY {key}")
        _, as_built = backend.query(f"SELECT * FROM as_built FINAL ORDER BY {key}")
        _, sorted_here = backend.query(f"SELECT * FROM sorted_here FINAL ORDER BY {key}")
    our_keys = zip(*(ours.column(name).to_pylist() for name in table.order_by[:3]),
                   ours.column("window_start").cast(pa.int64()).to_pylist())
    assert [tuple(row) for row in engine_order] == list(our_keys)
    assert sorted_here == as_built and len(as_built) > 100


INTEGER_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()]


@st.composite
def integer_arrays(draw) -> pa.Array:
    """An integer array of any width, maybe a slice (an offset into its buffer)."""
    kind = draw(st.sampled_from(INTEGER_TYPES))
    signed = pa.types.is_signed_integer(kind)
    bits = kind.bit_width
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    values = draw(st.lists(st.integers(low, high), max_size=30))
    start = draw(st.integers(0, len(values)))
    return pa.array(values, kind)[start:start + draw(st.integers(0, len(values)))]


@checks
@given(integer_arrays())
def test_an_integers_view_is_what_to_numpy_returns(array):
    view, plain = integers_view(array), array.to_numpy()
    assert view.dtype == plain.dtype
    assert view.tolist() == plain.tolist() == array.to_pylist()


def test_an_integers_view_refuses_nulls():
    with pytest.raises(ValueError, match="nulls"):
        integers_view(pa.array([1, None], pa.int32()))


@checks
@given(st.lists(st.text(max_size=4), min_size=1, max_size=30), st.data())
def test_arrow_functions_are_what_pyarrow_compute_returns(values, data):
    import pyarrow.compute as pc

    column = pa.array(values, pa.string())
    encoded = arrow_function("dictionary_encode", column)
    assert encoded.equals(pc.dictionary_encode(column))
    assert arrow_function("sort_indices", encoded.dictionary).equals(pc.sort_indices(encoded.dictionary))
    rows = np.array(data.draw(st.lists(st.integers(0, len(values) - 1), max_size=30)), np.int64)
    assert arrow_function("take", column, rows).equals(column.take(rows))
    batch = pa.record_batch([column, pa.array(range(len(values)), pa.uint64())], names=["s", "n"])
    assert arrow_function("take", batch, rows).equals(batch.take(rows))
