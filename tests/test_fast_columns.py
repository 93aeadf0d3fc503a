"""The compiled row-block encoding (``sinks/_fastcolumns.c``) against the pure path (numpy and
Arrow from the objects): the same String columns, the same decimal words, the same batch bytes."""

import os

import numpy as np
import pyarrow as pa

import pytest
from hypothesis import given, settings, strategies as st

import sinks.columnar as columnar
from sinks.columnar import _int128_words, arrow_stream, block_batch, in_key_order, text_columns
from sinks.clickhouse_sink import ClickHousePartition
from state.records import WindowRowBlock

COMPILED = columnar._compiled("text_buffers")

if COMPILED is None and os.environ.get("CI"):
    pytest.fail("sinks/_fastcolumns.c was not built: `make install` builds it", pytrace=False)
compiled_only = pytest.mark.skipif(COMPILED is None, reason="the compiled columns are not built (make install)")

TEXT = st.one_of(st.text(), st.text(alphabet=st.characters(codec="ascii")),
                 st.sampled_from(["", "\x00", "a\x00b", "é", "\U0001f600", "lone\ud800", "\udfff"]))
SCALED = st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**127), 2**127 - 1),
                   st.integers(-(2**130), 2**130), st.sampled_from([2**63, -(2**63) - 1, 2**127 - 1, -(2**127),
                                                                    2**127, -(2**127) - 1, True, False]))


def pure(monkeypatch) -> None:
    monkeypatch.setattr(columnar, "_fast_text_buffers", None)
    monkeypatch.setattr(columnar, "_fast_int128_words", None)


@compiled_only
@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(TEXT, TEXT, TEXT), max_size=30))
def test_text_columns_are_the_pure_ones(rows):
    compiled = text_columns(rows, ("a", "b", "c"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure(monkeypatch)
        expected = text_columns(rows, ("a", "b", "c"))
    assert list(compiled) == list(expected)
    for name, array in compiled.items():
        array.validate(full=True)
        assert array.type == expected[name].type and array.equals(expected[name])
        assert array.to_pylist() == expected[name].to_pylist()


@compiled_only
@settings(max_examples=400, deadline=None)
@given(st.lists(SCALED, max_size=30), st.sampled_from([2, 4]))
def test_int128_words_are_the_pure_ones(values, words):
    compiled = _int128_words(values, words)
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure(monkeypatch)
        expected = _int128_words(values, words)
    assert (compiled is None) == (expected is None)
    if expected is not None:
        assert compiled.tolist() == expected.tolist()


@compiled_only
@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.tuples(TEXT, TEXT, TEXT), st.integers(1, 2**40), SCALED.filter(
    lambda v: -(10**38) < v < 10**38)), min_size=1, max_size=10), min_size=1, max_size=3))
def test_a_row_blocks_batch_is_the_pure_ones_byte_for_byte(drawn):
    blocks = [WindowRowBlock("", 0, 60_000, 3, [key for key, _, _ in rows], tuple(c for _, c, _ in rows),
                             tuple(t for _, _, t in rows)) for rows in drawn]
    compiled = arrow_stream(block_batch(blocks, "usage_aggregates"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure(monkeypatch)
        assert compiled == arrow_stream(block_batch(blocks, "usage_aggregates"))


@compiled_only
def test_what_the_compiled_path_declines_the_pure_path_builds():
    """Rows not shaped as keys (a list, a short tuple, a non-str) and non-int sums go the pure way."""
    assert COMPILED([("a", "b")], 3) is None and COMPILED([["a"]], 1) is None and COMPILED([(None,)], 1) is None
    assert text_columns([("a", "\ud800")], ("x", "y"))["y"].to_pylist() == ["?"]
    assert columnar._compiled("int128_words")([1, 1.5], 2) is None
    with pytest.raises(TypeError):
        _int128_words([1, 1.5], 2)


def test_a_stale_build_is_not_used(monkeypatch):
    """A build from another version of ``sinks/_fastcolumns.c`` (``make install`` not run since
    it changed) is left aside: the pure path encodes."""
    _fastcolumns = pytest.importorskip("sinks._fastcolumns")
    monkeypatch.setattr(_fastcolumns, "INTERFACE", columnar._INTERFACE - 1)
    assert columnar._compiled("text_buffers") is None


KEY_TEXT = st.one_of(TEXT, st.sampled_from(["", "a", "a\x00", "ab", "b", "é", "ｏ", "𝄞", "A", "org-0001", "org-0001x"]))
STARTS = st.one_of(st.sampled_from([0, 60_000, -60_000]), st.integers(-(2**63), 2**63 - 1),
                   st.sampled_from([2**63, 253_402_300_800_000, 253_402_300_860_000, -(10**20)]))


def sorted_by_bytes(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The oracle: Python's stable sort of the rows by the key's UTF-8 bytes, then the stored start."""
    names = ("organization_id", "external_customer_id", "code")
    columns = [[v.encode() for v in batch.column(name).to_pylist()] for name in names]
    columns.append(batch.column("window_start").cast(pa.int64()).to_pylist())
    order = sorted(range(batch.num_rows), key=lambda i: tuple(column[i] for column in columns))
    return batch.take(pa.array(order, pa.int64()))


@st.composite
def row_blocks(draw) -> list:
    """Row blocks whose keys share prefixes and repeat (ties keep their order), at any starts."""
    texts = draw(st.lists(KEY_TEXT, min_size=1, max_size=6))
    key = st.tuples(*[st.sampled_from(texts)] * 3)
    blocks = []
    for _ in range(draw(st.integers(1, 4))):
        keys = draw(st.lists(key, min_size=1, max_size=12))
        start = draw(STARTS)
        blocks.append(WindowRowBlock("", start, start + 60_000 if start < 2**62 else start, draw(st.integers(1, 9)),
                                     keys, tuple(range(1, len(keys) + 1)), tuple(range(len(keys)))))
    return blocks


@settings(max_examples=400, deadline=None)
@given(row_blocks(), st.sampled_from(["usage_aggregates", "usage_aggregates_hourly"]), st.booleans())
def test_a_key_ordered_row_blocks_batch_is_the_sorted_batch(blocks, table, enriched):
    """Sorted while built (compiled where built), the batch is the one sorted after it was built,
    by the pure path, and Python's stable sort by UTF-8 bytes: byte for byte."""
    enrichment = (("plan",), {key[:2]: (f"p{i}",) for i, key in enumerate(blocks[0].keys)}) if enriched else None
    ordered = block_batch(blocks, table, enrichment, key_ordered=True)
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure(monkeypatch)
        monkeypatch.setattr(columnar, "_fast_key_order", None)
        built = block_batch(blocks, table, enrichment)
        assert arrow_stream(ordered) == arrow_stream(in_key_order(built, table))
        assert arrow_stream(ordered) == arrow_stream(block_batch(blocks, table, enrichment, key_ordered=True))
    ordered.validate(full=True)
    assert ordered.equals(sorted_by_bytes(built))


@compiled_only
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.text(alphabet="cus_0\x00é", max_size=6), st.integers(6, 14))
def test_many_distinct_values_sharing_a_prefix_are_ordered_by_their_bytes(seed, prefix, longest):
    """Thousands of distinct values a column (the compiled sort's radix path, past 4,096):
    one shared prefix, then suffixes that end before, inside and past the 8 bytes it compares
    as an integer, with NULs, multi-byte characters and many equal 8-byte prefixes."""
    import random

    rng = random.Random(seed)
    alphabet = ["0", "1", "\x00", "\x01", "é", "\U0001f600", "z"]
    def text() -> str:
        return prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, longest)))
    rows = [(text(), text(), rng.choice(["a", "b\x00", "b"]), rng.randint(0, 2)) for _ in range(6_000)]
    keys = [row[:3] for row in rows]
    buffers, order = columnar._fast_key_order(keys, np.array([row[3] for row in rows], np.int64), 3)
    expected = sorted(range(len(rows)), key=lambda i: (*(t.encode() for t in keys[i]), rows[i][3]))
    assert np.frombuffer(order, np.int64).tolist() == expected
    columns = columnar._string_arrays(buffers, columnar._BLOCK_KEY, len(rows))
    assert columns["organization_id"].to_pylist() == [keys[i][0] for i in expected]


@compiled_only
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(KEY_TEXT, KEY_TEXT, KEY_TEXT, st.integers(0, 2)), max_size=40))
def test_the_compiled_key_order_is_pythons_sort_by_utf8_bytes(rows):
    """The order itself (row indices, ties in input order) and the columns in it."""
    keys = [row[:3] for row in rows]
    ranks = np.array([row[3] for row in rows], np.int64)
    answer = columnar._fast_key_order(keys, ranks, 3)
    if any("\ud800" <= ch <= "\udfff" for key in keys for text in key for ch in text):
        assert answer is None  # UTF-8 cannot hold it: the pure path replaces it, then sorts
        return
    buffers, order = answer
    expected = sorted(range(len(rows)), key=lambda i: (*(text.encode() for text in keys[i]), rows[i][3]))
    assert np.frombuffer(order, np.int64).tolist() == expected
    columns = columnar._string_arrays(buffers, columnar._BLOCK_KEY, len(rows))
    assert [list(values) for values in zip(*(column.to_pylist() for column in columns.values()))] == \
        [list(keys[i]) for i in expected]


@compiled_only
def test_what_the_compiled_key_order_declines_or_refuses():
    key_order = columnar._fast_key_order
    one = np.zeros(1, np.int64)
    assert key_order([("a", "b")], one, 1) is None and key_order([("a", "b", 1)], one, 1) is None
    assert key_order([["a", "b", "c"]], one, 1) is None and key_order([("a", "b", type("S", (str,), {})("c"))], one, 1) is None
    assert key_order([], np.zeros(0, np.int64), 1) == ([(b"\0" * 4, b"")] * 3, b"")
    with pytest.raises(ValueError):
        key_order([("a", "b", "c")], np.zeros(2, np.int64), 1)
    with pytest.raises(ValueError):
        key_order([("a", "b", "c")], np.array([1], np.int64), 1)



class Recorded:
    """A backend that keeps what is inserted."""

    def __init__(self):
        self.inserts = []

    def insert_arrow(self, table, columns, payload, *args, **kwargs):
        self.inserts.append((table, payload))


def test_the_sink_sends_a_row_blocks_batch_in_key_order_once():
    blocks = [WindowRowBlock("", 60_000, 120_000, 5, [("p", "c", "x"), ("o", "d", "x"), ("o", "c", "y")], (1, 2, 3),
                             (4, 5, 6)), WindowRowBlock("", 0, 60_000, 5, [("o", "d", "x")], (7,), (8,))]
    backend = Recorded()
    part = ClickHousePartition(backend, max_rows=1_000, max_age_s=60)
    part.write_batch(blocks)
    part.flush()
    [(table, payload)] = backend.inserts
    sent = pa.ipc.open_stream(payload).read_next_batch()
    assert table == "usage_aggregates" and sent.equals(sorted_by_bytes(block_batch(blocks, table)))
    assert sent.column("event_count").to_pylist() == [3, 7, 2, 1]


ATTRIBUTE = st.sampled_from(["", "pro", "free", "?", "é"])


@settings(max_examples=300, deadline=None)
@given(row_blocks(), st.data(), st.integers(1, 2), st.booleans())
def test_enriched_columns_are_each_rows_customers_attributes_on_every_path(blocks, data, width, ask):
    """The enrichment columns on every path (compiled key order: a customer's run; pure: Arrow
    matching the rows' ids, or rows one by one where ids repeat across organizations or hold a
    ``?``; the attributes given, or asked for by position), against the attributes of each
    row's customer looked up row by row: none, some (with ``""`` fields) or all customers."""
    customers = sorted({key[:2] for block in blocks for key in block.keys})
    chosen = data.draw(st.lists(st.sampled_from(customers), unique=True)) if customers else []
    attributes = {customer: data.draw(st.tuples(*[ATTRIBUTE] * width)) for customer in chosen}
    fields = ("plan", "region")[:width]
    asked = []

    def lookup(organizations, customer_ids):  # lists, or the key columns' Arrow arrays
        if not isinstance(organizations, list):
            organizations, customer_ids = organizations.to_pylist(), customer_ids.to_pylist()
        asked.append(list(zip(organizations, customer_ids)))
        return {at: attributes[customer] for at, customer in enumerate(asked[-1])
                if any(attributes.get(customer, ()))}

    enrichment = (fields, lookup if ask else attributes)
    rows = [row for block in blocks for row in block.rows()]
    expected = {field: [attributes.get((row.organization_id, row.external_customer_id), ("",) * width)[i]
                        for row in rows] for i, field in enumerate(fields)}
    unenriched = block_batch(blocks, "usage_aggregates")
    for name, values in expected.items():
        unenriched = unenriched.append_column(name, columnar.column_array(values, "String", name))
    oracle = in_key_order(unenriched, "usage_aggregates")
    ordered = block_batch(blocks, "usage_aggregates", enrichment, key_ordered=True)
    ordered.validate(full=True)
    assert ordered.equals(oracle)
    with pytest.MonkeyPatch.context() as monkeypatch:
        pure(monkeypatch)
        monkeypatch.setattr(columnar, "_fast_key_order", None)
        assert block_batch(blocks, "usage_aggregates", enrichment, key_ordered=True).equals(oracle)
        assert block_batch(blocks, "usage_aggregates", enrichment).equals(unenriched)
    if ask:
        assert all(len(set(customers_asked)) == len(customers_asked) for customers_asked in asked)


def test_rows_of_customers_without_attributes_get_empty_strings_without_a_lookup_per_row():
    blocks = [WindowRowBlock("", 0, 60_000, 1, [("o", "c", "x"), ("o", "d", "x"), ("o", "c", "y")], (1, 1, 1), (0, 0, 0))]
    batch = block_batch(blocks, "usage_aggregates", (("plan", "region"), lambda organizations, customers: {}),
                        key_ordered=True)
    assert batch.column("plan").to_pylist() == batch.column("region").to_pylist() == ["", "", ""]
    assert batch.column("plan").null_count == 0 and batch.column("plan").buffers()[0] is None


def test_an_id_shared_by_two_organizations_gets_each_ones_attributes():
    from sinks.columnar import window_batch
    from state.records import WindowRow

    rows = [WindowRow(org, "c", "x", 0, 60_000, 1, 0, 1) for org in ("o", "p", "q")]
    for attributes in ({("o", "c"): ("pro",), ("p", "c"): ("free",)}, {("p", "c"): ("free",)},
                       {("p", "c?"): ("x",), ("o", "c"): ("pro",)}):
        plan = window_batch(rows, "usage_aggregates", (("plan",), attributes)).column("plan").to_pylist()
        assert plan == [attributes.get((row.organization_id, "c"), ("",))[0] for row in rows]
