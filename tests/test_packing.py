"""Packed aggregates (``state.packing``): format 2 round-trips exactly, whatever the keys and
integers, and format 1 (what snapshots of earlier releases hold) still unpacks.

The format 1 encoder (``support.packing_format_1``) is written out from its specification and
imports nothing from the product.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from state.packing import (COMPRESSED, compressed, pack_columns, pack_entries, pack_key_columns, unpack_entries,
                           unpack_key_columns)
from support.packing_format_1 import format_1

INT64 = 2**63
EXTREMES = [0, 1, -1, INT64 - 1, INT64, -INT64, -INT64 - 1, 2**64 - 1, 2**64, -(2**64),
            2**127 - 1, -(2**127), 2**127, -(2**127) - 1, 2**255 - 1, -(2**255), 2**300, -(2**300)]
names = st.text(max_size=6) | st.sampled_from(["", "\x00", "a:b", "100%", "é\x00ü", "😀:%", "org_017"])
key_items = names | st.integers(-(2**63), 2**63 - 1)
unbounded = st.sampled_from(EXTREMES) | st.integers(-(2**70), 2**70) | st.integers(-(2**300), 2**300)
small = st.sampled_from([0, 1, -1, INT64 - 1, -INT64]) | st.integers(-(2**63), 2**63 - 1)


def entries_of(width: int, key_width: int):
    keys = st.tuples(*[key_items] * key_width)
    values = st.tuples(small, unbounded, *[small] * (width - 2))
    return st.dictionaries(keys, values, max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.integers(2, 4), st.data())
def test_format_2_round_trips_exactly_in_order(key_width, width, data):
    entries = data.draw(entries_of(width, key_width))
    unpacked = unpack_entries(pack_entries(entries, key_width=key_width, big=1),
                              key_width=key_width, factory=tuple)
    assert unpacked == entries
    assert list(unpacked) == list(entries), "order kept"
    assert all(type(item) is type(expected) for key, keyed in zip(unpacked, entries)
               for item, expected in zip(key, keyed)), "str stays str, int stays int"


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.integers(2, 4), st.data(), st.integers(1, 400))
def test_format_3_round_trips_exactly_in_order_compressed_or_not(key_width, width, data, copies):
    """Key columns (``pack_key_columns``), and the same ``compressed`` (repeated to pass its
    threshold), unpack to the same keys and columns, as columns and as entries."""
    entries = data.draw(entries_of(width, key_width))
    entries = {key + (copy,): values for copy in range(copies) for key, values in entries.items()}
    keys, columns = list(entries), [list(column) for column in zip(*entries.values())] or [[]] * width
    packed = pack_key_columns(keys, columns)
    small = compressed(packed)
    assert (small[0] == COMPRESSED) == (small is not packed)
    for form in (packed, small):
        assert unpack_key_columns(form) == (keys, columns if keys else [[]] * width)
        assert unpack_entries(form, key_width=key_width + 1, factory=tuple) == entries


def test_large_bytes_are_compressed():
    packed = pack_key_columns([("org_001", f"cus_001_{i:04d}", "api_calls") for i in range(1_000)],
                              ([1] * 1_000, [10**18 + i for i in range(1_000)], [0] * 1_000))
    assert compressed(packed)[0] == COMPRESSED and 3 * len(compressed(packed)) < len(packed)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 5), st.integers(2, 4), st.data())
def test_format_1_still_unpacks(key_width, width, data):
    entries = data.draw(entries_of(width, key_width))
    unpacked = unpack_entries(format_1(entries), key_width=key_width)
    assert unpacked == {key: list(values) for key, values in entries.items()}
    assert list(unpacked) == list(entries)


@pytest.mark.parametrize("value", EXTREMES)
def test_each_extreme_sum_round_trips_among_large_ones(value):
    entries = {("o", f"c{i}", "x"): [i, total, -1]
               for i, total in enumerate([3 * 10**21, value, -(10**19), 0])}
    assert unpack_entries(pack_entries(entries, key_width=3, big=1), key_width=3) == entries


def test_every_encoding_of_the_unbounded_column_round_trips():
    for sums in ([5, -(2**63), 2**64 - 1],  # msgpack integers
                 [10**21, -(2**127), 2**127 - 1, 0],  # JSON
                 [2**300, -(10**500), -1]):
        entries = {(f"k{i}",): (i, total) for i, total in enumerate(sums)}
        packed = pack_columns(list(entries), list(entries.values()), key_width=1, big=1)
        assert unpack_entries(packed, key_width=1, factory=tuple) == entries


def test_bytes_written_by_format_1_unpack():
    """Bytes as the release before format 2 wrote them (its ``pack_entries``)."""
    window = bytes.fromhex(
        "9296a76f72675f303137a763757374003a25a6c3a9f09f9880a16fa164a17893920201c4400000000000"
        "9f0a4654405ba33c0ed69ce2ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"
        "ffffffffffffffffffffffffffffffff7f920100")
    assert unpack_entries(window, key_width=3) == {
        ("org_017", "cust\x00:%", "é😀"): [2, -(10**40), 1], ("o", "d", "x"): [1, 2**255 - 1, 0]}
    totals = bytes.fromhex(
        "929aa16fa163a178a3646179ce05265c00a16fa163a179a56d6f6e7468009292030192d95b3230333730"
        "333539373633333434383630383632363834343536383834303933373831363130353134363833393336"
        "363539333632353036333631343034343933353433383132393937363333333637303631383333393733"
        "3736a22d35")
    assert unpack_entries(totals, key_width=5, factory=tuple) == {
        ("o", "c", "x", "day", 86_400_000): (3, 2**300), ("o", "c", "y", "month", 0): (1, -5)}


def test_an_empty_pack_round_trips():
    assert unpack_entries(pack_entries({}, key_width=3, big=1), key_width=3) == {}
    assert unpack_entries(format_1({}), key_width=3) == {}
