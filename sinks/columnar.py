"""Rows as columns: one Arrow record batch per insert, typed from the table's definition.

The sink used to build a JSON object per row (decimals as text, times as text) and have
ClickHouse parse them back; at one row per event that was a third of the flow's time. Here
each column is pulled from the rows in one pass and handed to numpy or Arrow as a typed array,
so the per-row work in Python is one attribute read per column, and no Python code runs per
value (``tests/test_columnar_reference.py`` checks the bytes against a per-value encoder):

* ``String`` and ``LowCardinality(String)`` -> Arrow ``string`` (UTF-8, bytes unchanged);
* ``DateTime64(3, 'UTC')`` -> ``timestamp[ms, UTC]`` from the epoch milliseconds, clamped to
  what ClickHouse takes (``sinks.encoding.DATETIME64_MIN_MS``/``_MAX_MS``; only a window's end
  past year 9999 gets there);
* ``UInt8/32/64`` -> the same unsigned integers (booleans as 0/1);
* ``Decimal(P, S)`` -> ``decimal128(P, S)`` when ``P <= 38`` else ``decimal256(P, S)``, built
  from the scaled integers (two's complement, little-endian: Arrow's layout): sign-extended
  in numpy when all fit 64 bits, else read by Arrow as ``Decimal(P, 0)``, the same bytes. The
  scale must be 18 (the flow's scaled integers); a value that does not fit ``P`` digits raises
  ``DecimalOverflow`` naming the column, where ClickHouse would have refused the row (Code 69).

The types come from ``sinks.schema``, so widening a column there widens it here. The payload
is an Arrow IPC stream, ClickHouse's ``ArrowStream`` input format, which both chdb's streaming
insert and the HTTP interface take.

    >>> from state.records import WindowRow
    >>> batch = window_batch([WindowRow("o", "c", "x", 0, 60_000, 2, -15 * 10**17, 2)], "usage_aggregates")
    >>> batch.num_rows, batch.schema.field("total_value").type.scale, batch.column("total_value")[0].as_py()
    (1, 18, Decimal('-1.500000000000000000'))
    >>> str(batch.schema.field("window_end").type), batch.column("is_deleted").to_pylist()
    ('timestamp[ms, tz=UTC]', [0])
"""

from __future__ import annotations

import re
from functools import partial
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Callable, Sequence

from sinks.encoding import DATETIME64_MAX_MS, DATETIME64_MIN_MS
from sinks.schema import TABLES_BY_NAME
from state.compiled import compiled_function

FORMAT = "ArrowStream"
"""ClickHouse's name of the payload's format."""

SCALE_DIGITS = 18  # the flow's sums are integers scaled by 10**18

_DECIMAL_RE = re.compile(r"^Decimal\((\d+),\s*(\d+)\)$")
_UNSIGNED = {"UInt8", "UInt16", "UInt32", "UInt64"}
_DATETIME = "DateTime64(3, 'UTC')"
_LOW_WORD = 2**64 - 1


class DecimalOverflow(ValueError):
    """A sum does not fit its ``Decimal(P, S)`` column."""


def arrow_type(kind: str):
    """The Arrow type that ClickHouse reads into a column of type ``kind``.

    >>> [str(arrow_type(k)) for k in ("String", "LowCardinality(String)", "UInt64", "DateTime64(3, 'UTC')")]
    ['string', 'string', 'uint64', 'timestamp[ms, tz=UTC]']
    >>> str(arrow_type("Decimal(38, 18)")), str(arrow_type("Decimal(76, 18)"))
    ('decimal128(38, 18)', 'decimal256(76, 18)')
    >>> arrow_type("Float64")
    Traceback (most recent call last):
    ...
    ValueError: no columnar encoding for ClickHouse type 'Float64'
    """
    import pyarrow as pa

    if kind in ("String", "LowCardinality(String)"):
        return pa.string()
    if kind == _DATETIME:
        return pa.timestamp("ms", tz="UTC")
    if kind in _UNSIGNED:
        return getattr(pa, kind.lower())()
    match = _DECIMAL_RE.match(kind)
    if match:
        precision, scale = int(match.group(1)), int(match.group(2))
        return (pa.decimal128 if precision <= 38 else pa.decimal256)(precision, scale)
    raise ValueError(f"no columnar encoding for ClickHouse type {kind!r}")


def decimal_array(values: Sequence[int], kind: str, column: str):
    """Scaled integers (``value * 10**18``) as an Arrow decimal array of ``kind``.

    Sums that fit 64 or 128 bits (a sum of 9.3 units or more needs more than 64) are split
    into, and sign-extended to, Arrow's two's complement words in bulk; larger ones are read
    by Arrow as ``Decimal(P, 0)`` integers, whose bytes are those of ``Decimal(P, 18)`` (the
    scale only labels them). Both check that every value fits ``P`` digits, and a value that
    does not raises ``DecimalOverflow`` naming the column.

    >>> decimal_array([1, -1, 10**38 - 1], "Decimal(38, 18)", "v").to_pylist()[:2]
    [Decimal('1E-18'), Decimal('-1E-18')]
    >>> [str(d) for d in decimal_array([-(2**70), 2**63], "Decimal(76, 18)", "v").to_pylist()]
    ['-1180.591620717411303424', '9.223372036854775808']
    >>> decimal_array([10**38], "Decimal(38, 18)", "total_value")
    Traceback (most recent call last):
    ...
    sinks.columnar.DecimalOverflow: total_value: 100000000000000000000.000000000000000000 does not fit Decimal(38, 18)
    """
    import pyarrow as pa

    kind_type = arrow_type(kind)
    if kind_type.scale != SCALE_DIGITS:
        raise ValueError(f"{column}: {kind} has scale {kind_type.scale}; the flow's sums have "
                         f"{SCALE_DIGITS} decimal places")
    for bits, split in ((64, _int64_words), (128, _int128_words)):
        words = split(values, kind_type.byte_width // 8)
        if words is not None:
            if 10**kind_type.precision <= 2**(bits - 1):  # a value this wide may not fit: check them all
                _check_digits(values, kind_type.precision, kind, column)
            return pa.Array.from_buffers(kind_type, len(values), [None, pa.py_buffer(words)])
    unscaled_type = (pa.decimal128 if kind_type.byte_width == 16 else pa.decimal256)(
        kind_type.precision, 0)
    try:
        unscaled = pa.array(values, unscaled_type)
    except (pa.ArrowInvalid, OverflowError):
        _check_digits(values, kind_type.precision, kind, column)
        raise  # every value fits: something else is wrong (not an int?)
    return pa.Array.from_buffers(kind_type, len(values), unscaled.buffers(), unscaled.null_count)


def _int64_words(values: Sequence[int], words: int):
    """``values`` as rows of ``words`` little-endian 64-bit words (two's complement), or
    ``None`` when one of them does not fit 64 bits.

    >>> _int64_words([1, -2], 2).tolist(), _int64_words([2**63], 2)
    ([[1, 0], [-2, -1]], None)
    """
    import numpy as np

    try:
        low = np.fromiter(values, np.int64, len(values))
    except OverflowError:
        return None
    out = np.empty((len(values), words), np.int64)
    out[:, 0] = low
    out[:, 1:] = (low >> 63)[:, None]  # the sign, extended
    return out


def _int128_words(values: Sequence[int], words: int):
    """``values`` as rows of ``words`` (2 or more) little-endian 64-bit words (two's
    complement), or ``None`` when one of them does not fit 128 bits.

    Compiled (``sinks/_fastcolumns.c``) where built; else the shift and mask run in numpy over
    the ints as objects: about half what Arrow's conversion of Python ints to decimals costs.

    >>> _int128_words([2**64 + 3, -1], 4).tolist(), _int128_words([2**127], 2)
    ([[3, 1, 0, 0], [-1, -1, -1, -1]], None)
    """
    import numpy as np

    if _fast_int128_words is not None and type(values) is list:
        words_bytes = _fast_int128_words(values, words)
        if words_bytes is not None:
            return np.frombuffer(words_bytes, np.int64).reshape(len(values), words)
    objects = np.fromiter(values, object, len(values))
    try:
        high = (objects >> 64).astype(np.int64)
    except OverflowError:
        return None
    out = np.empty((len(values), words), np.int64)
    out[:, 0] = (objects & _LOW_WORD).astype(np.uint64).view(np.int64)
    out[:, 1] = high
    out[:, 2:] = (high >> 63)[:, None]  # the sign, extended
    return out


def _check_digits(values: Sequence[int], precision: int, kind: str, column: str) -> None:
    if values:
        limit = 10**precision
        for extreme in (min(values), max(values)):
            if not -limit < extreme < limit:
                raise DecimalOverflow(f"{column}: {_decimal_text(extreme)} does not fit {kind}")


def _decimal_text(scaled: int) -> str:
    sign = "-" if scaled < 0 else ""
    whole, fraction = divmod(abs(scaled), 10**SCALE_DIGITS)
    return f"{sign}{whole}.{fraction:0{SCALE_DIGITS}d}"


def column_array(values: list, kind: str, column: str):
    """``values`` (Python ints, bools or strings) as the Arrow array ClickHouse reads as ``kind``.

    >>> column_array([True, False], "UInt8", "is_deleted").to_pylist()
    [1, 0]
    >>> column_array(["a\\u0000é"], "String", "code").to_pylist()
    ['a\\x00é']
    >>> column_array([253_402_300_800_000], "DateTime64(3, 'UTC')", "window_end").cast("int64").to_pylist()
    [253402300799999]
    """
    import pyarrow as pa

    if kind.startswith("Decimal("):
        return decimal_array(values, kind, column)
    kind_type = arrow_type(kind)
    if pa.types.is_string(kind_type):
        try:
            return pa.array(values, kind_type)
        except UnicodeEncodeError:  # a lone surrogate: keep the row, mark the character
            return pa.array([v.encode("utf-8", "replace").decode() for v in values], kind_type)
    if pa.types.is_timestamp(kind_type):
        try:
            times = _fromiter(values, "int64", len(values))
        except OverflowError:  # beyond int64: beyond DateTime64 too
            times = _fromiter([min(max(v, DATETIME64_MIN_MS), DATETIME64_MAX_MS) for v in values],
                              "int64", len(values))
        return pa.array(_clamped(times), pa.int64()).view(kind_type)
    return pa.array(_fromiter(values, kind.lower(), len(values)), kind_type)


def _fromiter(values, dtype: str, count: int):
    """``count`` ints or bools as a numpy array of ``dtype``; ``OverflowError`` if one does not
    fit. numpy converts Python ints in one pass, about twice as fast as Arrow does."""
    import numpy as np

    return np.fromiter(values, dtype, count)


def _clamped(epoch_ms):
    """int64 epoch milliseconds clamped (in place) to what ``DateTime64(3)`` holds."""
    import numpy as np

    if len(epoch_ms) and (epoch_ms.min() < DATETIME64_MIN_MS or epoch_ms.max() > DATETIME64_MAX_MS):
        np.clip(epoch_ms, DATETIME64_MIN_MS, DATETIME64_MAX_MS, out=epoch_ms)
    return epoch_ms


def record_batch(table: str, columns: dict[str, list]):
    """An Arrow record batch of ``table``'s columns (a subset, in the table's order, is fine).

    >>> record_batch("usage_late_events", {"reason": ["late"], "source_offset": [7]}).schema.names
    ['reason', 'source_offset']
    >>> record_batch("usage_aggregates", {"nope": [1]})
    Traceback (most recent call last):
    ...
    KeyError: "usage_aggregates has no column 'nope'"
    """
    import pyarrow as pa

    kinds = dict(TABLES_BY_NAME[table].columns)
    arrays = []
    for name, values in columns.items():
        if name not in kinds:
            raise KeyError(f"{table} has no column {name!r}")
        arrays.append(column_array(values, kinds[name], name))
    return pa.record_batch(arrays, names=list(columns))


_END_OF_STREAM = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # a continuation marker, then length 0


def arrow_stream(batch) -> bytes:
    """``batch`` as an Arrow IPC stream: ClickHouse's ``ArrowStream`` input.

    The bytes ``pyarrow.ipc.new_stream`` writes (the schema's message, the batch's, the end
    marker), each message serialized at its size and joined in one copy: no stream buffer
    grown and copied again.

        >>> import pyarrow as pa
        >>> batch = record_batch("usage_late_events", {"reason": ["late"], "source_offset": [7]})
        >>> pa.ipc.open_stream(arrow_stream(batch)).read_next_batch().equals(batch)
        True
    """
    return b"".join((batch.schema.serialize(), batch.serialize(), _END_OF_STREAM))


def in_key_order(batch, table: str):
    """``batch`` with its rows in the order of ``table``'s sorting key (``ORDER BY``).

    The engine sorts every insert by that key unless it finds the rows sorted already; sorted
    here (by ranks: about half Arrow's sort of the columns, a third of the engine's), an
    insert of 50k rows costs ~200 ns less CPU a row. The sort is stable, as the engine's is,
    so rows of one key keep their order and the part written is the same. A batch without
    every key column, or with a null in one, is returned as it is.

        >>> unsorted = record_batch("usage_late_events", {"source_topic": ["t", "t", "s"],
        ...     "source_partition": [1, 0, 9], "source_offset": [0, 5, 0], "reason": ["late"] * 3})
        >>> in_key_order(unsorted, "usage_late_events").column("source_partition").to_pylist()
        [9, 0, 1]
    """
    names = TABLES_BY_NAME[table].order_by
    if batch.num_rows < 2 or not set(names) <= set(batch.schema.names):
        return batch
    columns = [batch.column(name) for name in names]
    if any(column.null_count for column in columns):
        return batch
    return arrow_function("take", batch, _key_order(columns))


def _key_order(columns: list, span_limit: int = 2**63):
    """The stable order of rows by ``columns`` (the first most significant), as indices.

    Each column becomes ranks (its distinct values sorted, by Arrow: bytes for strings, as the
    engine compares them); the ranks are folded into one int64 key per row, re-ranked densely
    whenever the next column would take the key past ``span_limit``.

    >>> import pyarrow as pa
    >>> _key_order([pa.array(["b", "a", "b", "a"]), pa.array([2, 9, 1, 9])], span_limit=3).tolist()
    [1, 3, 2, 0]
    """
    import numpy as np

    key, span = np.zeros(len(columns[0]), np.int64), 1
    for column in columns:
        rank, distinct = _ranks(column)
        if span * distinct >= span_limit:
            distinct_keys, key = np.unique(key, return_inverse=True)
            span = len(distinct_keys)
        key, span = key * distinct + rank, span * distinct
    return _stable_argsort(key, span)


def _stable_argsort(key, span: int):
    """The stable order of ``key`` (ints in ``[0, span)``): a least-significant-digit radix
    sort by 16 bits, each pass numpy's radix sort of a ``uint16`` digit (a fourth of the
    cost of ``argsort(kind="stable")`` on int64, which merges).

    >>> import numpy as np
    >>> _stable_argsort(np.array([70_000, 3, 70_000, 65_536, 3]), 70_001).tolist()
    [1, 4, 3, 0, 2]
    """
    import numpy as np

    order = np.arange(len(key))
    for shift in range(0, max(span - 1, 1).bit_length(), 16):
        digit = (key[order] >> shift).astype(np.uint16)  # the low 16 bits left
        order = order[np.argsort(digit, kind="stable")]
    return order


def _ranks(column):
    """Each value's rank among the column's distinct values (0 the least), and how many."""
    import numpy as np

    encoded = arrow_function("dictionary_encode", column)
    order = integers_view(arrow_function("sort_indices", encoded.dictionary))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank[integers_view(encoded.indices)], len(order)


def integers_view(array):
    """An Arrow integer array with no nulls as a read-only numpy array over the same memory.

    What ``to_numpy()`` returns, without going through pyarrow's pandas conversion, whose first
    use imports pandas (0.2-0.3 s of a run's start-up; ``dataflows.usage.settle_arrow_pandas_probe``).

    >>> import pyarrow as pa
    >>> integers_view(pa.array([5, -1, 7], pa.int32())[1:]).tolist()
    [-1, 7]
    """
    import numpy as np
    import pyarrow as pa

    if array.null_count:
        raise ValueError("integers_view: the array has nulls")
    kind = "i" if pa.types.is_signed_integer(array.type) else "u"
    dtype = np.dtype(f"{kind}{array.type.bit_width // 8}")
    return np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * dtype.itemsize)


def _pull(rows: list, attributes: dict[str, str], table: str) -> dict:
    """Each column of ``table`` read from the rows' attribute of that name, as an Arrow array.

    Integers and times go from the rows straight into numpy (no list in between: half their
    cost); strings and sums through a list (``column_array``), read once per column.

    >>> from state.records import WindowRow
    >>> pulled = _pull([WindowRow("o", "c", "x", 0, 60_000, 7, 0, 1)], {"event_count": "event_count"},
    ...                "usage_aggregates")
    >>> {name: array.to_pylist() for name, array in pulled.items()}
    {'event_count': [7]}
    """
    kinds = dict(TABLES_BY_NAME[table].columns)
    return {column: _rows_array(rows, attrgetter(attribute), kinds[column], column)
            for column, attribute in attributes.items()}


def _rows_array(rows: list, read, kind: str, column: str):
    import pyarrow as pa

    if kind in _UNSIGNED or kind == _DATETIME:
        try:
            numbers = _fromiter(map(read, rows), "int64" if kind == _DATETIME else kind.lower(), len(rows))
        except OverflowError:  # a time beyond int64 (clamped below) or an invalid count (raises)
            pass
        else:
            if kind == _DATETIME:
                return pa.array(_clamped(numbers), pa.int64()).view(arrow_type(kind))
            return pa.array(numbers, arrow_type(kind))
    return column_array(list(map(read, rows)), kind, column)


def _arrays_batch(arrays: dict):
    import pyarrow as pa

    return pa.record_batch(list(arrays.values()), names=list(arrays))


_WINDOW_ROW = {
    "organization_id": "organization_id", "external_customer_id": "external_customer_id",
    "code": "code", "window_start": "window_start_ms", "window_end": "window_end_ms",
    "event_count": "event_count", "total_value": "total_scaled", "version": "version",
    "is_deleted": "is_deleted",
}
_METRIC_ROW = {
    "metric": "metric", "organization_id": "organization_id",
    "external_customer_id": "external_customer_id", "group_key": "group_key",
    "window_start": "window_start_ms", "window_end": "window_end_ms", "value": "value_scaled",
    "event_count": "event_count", "version": "version", "is_deleted": "is_deleted",
}
_LATE_RECORD = {
    "organization_id": "organization_id", "external_customer_id": "external_customer_id",
    "code": "code", "transaction_id": "transaction_id", "event_time": "timestamp_ms",
    "value": "value_scaled", "reason": "reason", "source_topic": "source_topic",
    "source_partition": "source_partition", "source_offset": "source_offset",
}


def window_batch(rows: list, table: str, enrichment: tuple[tuple[str, ...], dict | Callable] | None = None):
    """``WindowRow`` s of ``table`` (the main table or a rollup) as a record batch.

    ``enrichment`` is ``(fields, attributes)``: a ``String`` column per field, the values from
    ``attributes[(organization_id, external_customer_id)]`` (empty strings when absent: it may
    hold only the customers that have attributes), or, where ``attributes`` is a lookup
    (``CustomerAttributes.present``), from ``attributes(organizations, customers)``, called
    once with the distinct customers as two lists, which answers the attributes of those that
    have some by their position.

        >>> from state.records import WindowRow
        >>> rows = [WindowRow("o", "c", "x", 0, 60_000, 1, 0, 1), WindowRow("o", "d", "x", 0, 60_000, 1, 0, 1)]
        >>> window_batch(rows, "usage_aggregates", (("plan",), {("o", "c"): ("pro",)})).column("plan").to_pylist()
        ['pro', '']
    """
    arrays = _pull(rows, _WINDOW_ROW, table)
    if enrichment is not None:
        _add_enrichment(arrays, lambda: ((row.organization_id, row.external_customer_id) for row in rows),
                        enrichment)
    return _arrays_batch(arrays)


def block_batch(blocks: list, table: str, enrichment: tuple[tuple[str, ...], dict | Callable] | None = None,
                key_ordered: bool = False):
    """``WindowRowBlock`` s of ``table`` as one record batch: what :func:`window_batch` makes of
    their rows, without building a row (a block already holds its rows as columns).

    ``key_ordered``: the rows in the table's key order, what :func:`in_key_order` makes of the
    batch; compiled (where built), the keys are sorted first and the columns built in that order.

        >>> from state.records import WindowRowBlock
        >>> block = WindowRowBlock("", 0, 60_000, 5, [("o", "c", "x"), ("o", "d", "x")], (2, 1), (7, 3))
        >>> block_batch([block], "usage_aggregates").equals(window_batch(block.rows(), "usage_aggregates"))
        True
        >>> block = WindowRowBlock("", 0, 60_000, 5, [("p", "c", "x"), ("o", "d", "x")], (2, 1), (7, 3))
        >>> block_batch([block], "usage_aggregates", key_ordered=True).column("event_count").to_pylist()
        [1, 2]
    """
    keys = list(chain.from_iterable(block.keys for block in blocks))
    ordered = _keys_in_order(keys, blocks, table) if key_ordered else None
    texts, order = (text_columns(keys, _BLOCK_KEY), None) if ordered is None else ordered
    kinds = dict(TABLES_BY_NAME[table].columns)
    shared = {"window_start": [block.window_start_ms for block in blocks],
              "window_end": [block.window_end_ms for block in blocks],
              "version": [block.version for block in blocks], "is_deleted": [False] * len(blocks)}
    arrays = {**texts, **_per_block(shared, blocks, kinds, order)}
    for column, attribute in (("event_count", "counts"), ("total_value", "totals")):
        values = list(chain.from_iterable(getattr(block, attribute) for block in blocks))
        array = column_array(values, kinds[column], column)
        arrays[column] = array if order is None else arrow_function("take", array, order)
    arrays = {column: arrays[column] for column in _WINDOW_ROW}  # the table's order
    if enrichment is not None:
        if order is not None:
            _enrich_runs(arrays, keys, order, enrichment)
        else:
            _add_enrichment(arrays, partial(map, _CUSTOMER, keys), enrichment)
    batch = _arrays_batch(arrays)
    return in_key_order(batch, table) if key_ordered and order is None else batch


def _keys_in_order(keys: list, blocks: list, table: str):
    """The blocks' rows in ``table``'s key order (by the key's strings' UTF-8 bytes, then the
    window start as stored: clamped), stably: the key's ``String`` columns in that order, and
    the order as row indices; None where the compiled sort is not built or declines, or the
    table is sorted by another key.

    Compiled (``sinks/_fastcolumns.c``): each key string ranked among its column's distinct
    values (found by their str hashes), the ranks folded into one integer a row and radix
    sorted, the columns copied from the distinct values in that order (about half the cost of
    ranking and reordering the built columns, :func:`in_key_order`).
    """
    import numpy as np

    if _fast_key_order is None or TABLES_BY_NAME[table].order_by != _BLOCK_KEY + ("window_start",):
        return None
    try:
        starts = _clamped(_fromiter((block.window_start_ms for block in blocks), "int64", len(blocks)))
    except OverflowError:  # a start beyond int64: the column clamps it, the batch is sorted after
        return None
    distinct, start_ranks = np.unique(starts, return_inverse=True)
    ordered = _fast_key_order(keys, np.repeat(start_ranks.astype(np.int64), [len(block) for block in blocks]),
                              max(len(distinct), 1))
    if ordered is None:
        return None
    buffers, order = ordered
    return _string_arrays(buffers, _BLOCK_KEY, len(keys)), np.frombuffer(order, np.int64)


_BLOCK_KEY = ("organization_id", "external_customer_id", "code")  # a block's key, in order
_CUSTOMER = itemgetter(0, 1)  # (organization_id, external_customer_id) of a key


def _per_block(columns: dict[str, list], blocks: list, kinds: dict[str, str], order=None) -> dict:
    """Columns of one value per block (``columns``), encoded once per block and repeated for
    each of its rows by Arrow (``take``): the same values, typed and clamped alike; the rows in
    ``order`` (row indices) where given."""
    import numpy as np
    import pyarrow as pa

    rows_block = np.repeat(np.arange(len(blocks)), [len(block) for block in blocks])
    rows_block = pa.array(rows_block if order is None else rows_block[order])
    return {name: arrow_function("take", column_array(values, kinds[name], name), rows_block)
            for name, values in columns.items()}


def arrow_function(name: str, *args):
    """Arrow's compute function ``name`` on ``args``: what ``pyarrow.compute.<name>(*args)``
    and ``.take`` call, without importing ``pyarrow.compute``, whose first import builds
    Python wrappers for every function (~30 ms of a run's start-up).

    >>> import pyarrow as pa
    >>> arrow_function("take", pa.array(["a", "b", "c"]), pa.array([2, 0])).to_pylist()
    ['c', 'a']
    """
    from pyarrow._compute import call_function

    return call_function(name, list(args))


def text_columns(rows: list, names: Sequence[str]) -> dict:
    """Tuples of strings (``rows``) as a ``String`` array per position, named ``names``.

    Compiled (``sinks/_fastcolumns.c``, where built): each column's offsets and UTF-8 bytes
    copied from the strings in one pass, for Arrow to take as they are. Else Arrow reads the
    tuples as a struct, in one pass, with no list per column. A lone surrogate (which UTF-8
    cannot hold) is replaced as :func:`column_array` does.

    >>> {name: array.to_pylist() for name, array in text_columns([("o", "a"), ("p", "lone\\ud800")], ("x", "y")).items()}
    {'x': ['o', 'p'], 'y': ['a', 'lone?']}
    """
    import pyarrow as pa

    if not names:
        return {}
    if _fast_text_buffers is not None and type(rows) is list:
        buffers = _fast_text_buffers(rows, len(names))
        if buffers is not None:
            return _string_arrays(buffers, names, len(rows))
    try:
        struct = pa.array(rows, pa.struct([(name, pa.string()) for name in names]))
    except UnicodeEncodeError:
        return {name: column_array([row[i] for row in rows], "String", name) for i, name in enumerate(names)}
    return dict(zip(names, struct.flatten()))


def _string_arrays(buffers: list, names: Sequence[str], count: int) -> dict:
    """``String`` arrays of ``count`` rows, named ``names``, from their (offsets, UTF-8 data)."""
    import pyarrow as pa

    return {name: pa.Array.from_buffers(pa.string(), count, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
            for name, (offsets, data) in zip(names, buffers)}


def _compiled(name: str) -> Callable | None:
    """The compiled fast path's function ``name`` (``sinks/_fastcolumns.c``, built by ``make
    install``) at :data:`_INTERFACE`, or None: numpy and Arrow then build the same columns from
    the objects, slower."""
    return compiled_function("sinks._fastcolumns", _INTERFACE, name)


_INTERFACE = 2
"""The version of ``sinks/_fastcolumns.c``'s functions this module calls (its ``INTERFACE``)."""

_fast_text_buffers = _compiled("text_buffers")
"""What :func:`text_columns` uses; tests set it to None for the pure path."""
_fast_int128_words = _compiled("int128_words")
"""What :func:`_int128_words` uses; tests set it to None for the pure path."""
_fast_key_order = _compiled("key_order")
"""What :func:`block_batch` sorts a row block's keys with; tests set it to None for the pure path."""


def _add_enrichment(arrays: dict, customers: Callable, enrichment: tuple[tuple[str, ...], dict | Callable]) -> None:
    """A ``String`` column per enrichment field for the rows of ``arrays`` (their
    ``organization_id`` and ``external_customer_id`` columns built), ``""`` where the
    attributes have none. ``customers()``: the rows' ``(organization_id,
    external_customer_id)`` pairs, in order, read to look the customers up (where the
    attributes are a lookup) and where the columns cannot be matched exactly.

    No Python code runs per row but to collect the distinct customers: when none has
    attributes (the usual flush), the columns are empty strings made at once; else Arrow
    matches the rows' ids to those of the customers that have attributes
    (:func:`_attribute_rows`) and takes each field's values by the match.

        >>> import pyarrow as pa
        >>> arrays = {"organization_id": pa.array(["o", "p", "o"]), "external_customer_id": pa.array(["c", "c", "d"])}
        >>> _add_enrichment(arrays, list, (("plan", "region"), {("o", "c"): ("pro", "")}))
        >>> arrays["plan"].to_pylist(), arrays["region"].to_pylist()
        (['pro', '', ''], ['', '', ''])
    """
    fields, attributes = enrichment
    if callable(attributes):
        distinct = list(set(customers()))
        found = attributes([org for org, _ in distinct], [customer for _, customer in distinct])
        attributes = {distinct[at]: values for at, values in found.items()}
    count = len(arrays["organization_id"])
    if not attributes:
        arrays.update(_empty_strings(fields, count))
        return
    at = _attribute_rows(arrays["organization_id"], arrays["external_customer_id"], attributes)
    if at is None:
        empty = ("",) * len(fields)
        arrays.update(text_columns(list(map(attributes.get, customers(), repeat(empty))), fields))
        return
    values = list(zip(*attributes.values()))
    for field, field_values in zip(fields, values):
        known = column_array([*field_values, ""], "String", field)  # "" at the end: no attributes
        arrays[field] = _without_validity(arrow_function("take", known, at))


def _enrich_runs(arrays: dict, keys: list, order, enrichment: tuple[tuple[str, ...], dict | Callable]) -> None:
    """What :func:`_add_enrichment` adds, for row block keys ``keys`` taken in key ``order``
    (organization, then customer first) into the columns of ``arrays``, whose text holds the
    ids exactly (no character replaced): each customer's rows are one run, so it is looked up
    once, and the attributes of the few that have some are encoded once and repeated over their
    runs by Arrow (the other rows take ``""``); no key is read per row.

        >>> import numpy as np, pyarrow as pa
        >>> keys = [("o", "d", "x"), ("o", "c", "x"), ("p", "c", "x"), ("o", "c", "y")]
        >>> arrays = {"organization_id": pa.array(["o", "o", "o", "p"]), "external_customer_id": pa.array(["c", "c", "d", "c"])}
        >>> _enrich_runs(arrays, keys, np.array([1, 3, 0, 2]), (("plan",), {("o", "d"): ("pro",)}))
        >>> arrays["plan"].to_pylist()
        ['', '', 'pro', '']
        >>> _enrich_runs(arrays, keys, np.array([1, 3, 0, 2]), (("plan",), lambda orgs, customers: {2: ("pro",)}))
        >>> arrays["plan"].to_pylist()
        ['', '', '', 'pro']
    """
    import numpy as np

    fields, attributes = enrichment
    count = len(keys)
    organizations, customers = arrays["organization_id"], arrays["external_customer_id"]
    starts = _run_starts(organizations, customers)
    if callable(attributes):
        found = attributes(arrow_function("take", organizations, starts), arrow_function("take", customers, starts))
    else:
        distinct = map(_CUSTOMER, map(keys.__getitem__, order[starts].tolist()))
        found = {at: attributes[customer] for at, customer in enumerate(distinct) if customer in attributes}
    if not found:
        arrays.update(_empty_strings(fields, count))
        return
    of_run = np.full(len(starts), len(found), np.int64)  # the last value: no attributes
    of_run[np.fromiter(found, np.int64, len(found))] = np.arange(len(found))
    of_row = np.repeat(of_run, np.diff(starts, append=count))
    for field, values in zip(fields, zip(*found.values())):
        known = column_array([*values, ""], "String", field)
        arrays[field] = _without_validity(arrow_function("take", known, of_row))


def _run_starts(organizations, customers):
    """The first row of each run of equal ``(organization, customer)`` in the two columns."""
    import numpy as np

    count = len(customers)
    if count < 2:
        return np.zeros(count, np.int64)
    rest, previous = slice(1, count), slice(0, count - 1)
    changed = arrow_function("or", arrow_function("not_equal", organizations[rest], organizations[previous]),
                             arrow_function("not_equal", customers[rest], customers[previous]))
    later = integers_view(arrow_function("indices_nonzero", changed)).astype(np.int64)
    return np.concatenate(([0], later + 1))


def _empty_strings(fields: tuple[str, ...], count: int) -> dict:
    """A ``String`` column of ``count`` empty strings per field: what :func:`text_columns`
    builds of them, with no row read."""
    return _string_arrays([(bytes(4 * (count + 1)), b"")] * len(fields), fields, count)


def _attribute_rows(organizations, customers, attributes: dict):
    """For each row (its ``organizations`` and ``customers`` columns), the position of its
    customer among those of ``attributes``, or ``len(attributes)`` where it has none: an
    Arrow int32 array with no nulls. None where Arrow cannot match exactly: an id shared by two
    organizations among ``attributes``, or one that UTF-8 could not hold as it is (a lone
    surrogate, or a ``?``, which the columns use in its place)."""
    import pyarrow as pa
    from pyarrow._compute import SetLookupOptions, call_function

    organization_ids, customer_ids = zip(*attributes)
    if len(set(customer_ids)) < len(customer_ids) or "?" in "".join(chain(organization_ids, customer_ids)):
        return None
    try:
        known_customers = pa.array(customer_ids, pa.string())
        known_organizations = pa.array([*organization_ids, ""], pa.string())
    except UnicodeEncodeError:
        return None
    none = pa.scalar(len(customer_ids), pa.int32())
    at = call_function("index_in", [customers], SetLookupOptions(known_customers))
    at = _without_validity(call_function("coalesce", [at, none]))
    same = arrow_function("equal", arrow_function("take", known_organizations, at), organizations)
    return _without_validity(call_function("if_else", [same, at, none]))


def _without_validity(array):
    """``array`` (no nulls) without its validity bitmap: the same values, a plain column."""
    import pyarrow as pa

    if array.buffers()[0] is None:
        return array
    return pa.Array.from_buffers(array.type, len(array), [None, *array.buffers()[1:]], 0, array.offset)


def metric_batch(rows: list, table: str):
    """``MetricRow`` s as a record batch of ``metric_aggregates``."""
    return _arrays_batch(_pull(rows, _METRIC_ROW, table))


def late_batch(records: list, table: str):
    """``LateRecord`` s as a record batch of ``usage_late_events``; the raw event as text
    (invalid UTF-8 replaced) and the watermark clamped at the epoch, as before.

        >>> from state.records import LateRecord
        >>> late = LateRecord("o", "c", "x", "t", 5, 1, "late", -9, "topic", 0, 3, b"\\xff{}")
        >>> batch = late_batch([late], "usage_late_events")
        >>> batch.column("raw").to_pylist(), batch.column("watermark").cast("int64").to_pylist()
        (['\\ufffd{}'], [0])
    """
    arrays = _pull(records, _LATE_RECORD, table)
    arrays["watermark"] = column_array([max(r.watermark_ms, 0) for r in records], _DATETIME, "watermark")
    arrays["raw"] = column_array([r.raw.decode("utf-8", "replace") for r in records], "String", "raw")
    return _arrays_batch({name: arrays[name] for name in TABLES_BY_NAME[table].column_names})

