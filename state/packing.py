"""Keyed aggregates as compact bytes, for snapshots taken at every epoch.

A shard's stores hold a tuple key and a few integers per entry; at one row per event that is
millions of entries, all snapshotted at the end of every epoch. As a dict of tuples each entry
cost ~2.6 µs to build and pickle (700k entries: 1.8 CPU s). Packed, it costs ~0.2 µs (format 1
below: ~0.45 µs): the keys as msgpack arrays, and the values as msgpack arrays of integers where
they all fit 64 bits, else as one JSON array of arrays (msgspec writes and reads integers of any
size in JSON, in C; a sum above 9.2 units of 10**18 does not fit 64 bits).

    >>> entries = {("o", "c", "x", 0): (2, -10**40), ("o", "d", "x", 60_000): (1, 5)}
    >>> unpack_entries(pack_entries(entries, key_width=4, big=1), key_width=4, factory=tuple) == entries
    True

The bytes are a msgpack array ``[2, keys, values]`` (format 2; ``values`` a msgpack array, or
bin holding JSON). Format 1, which snapshots of earlier releases hold, is ``[flat keys,
columns]``: the keys' items in one flat list, then one list of integers per value column, the
unbounded one as 32-byte integers (or decimal text past 256 bits); ``unpack_entries`` reads both.

A store that holds its values as columns (``state.windows``) packs them as they are, with
``pack_key_columns``: format 3, ``[3, keys, [column, ...]]``, each column a msgpack array of
integers, or bin holding JSON where one does not fit 64 bits. No row is built per entry
(300k entries: ~70 ns each, against ~190 ns zipped into rows for format 2), and it unpacks to
columns (``unpack_key_columns``, which reads every format) in a third of format 2's time::

    >>> keys, columns = unpack_key_columns(pack_key_columns([("o", "c"), ("o", "d")], ([2, 1], [-10**40, 5])))
    >>> keys, columns
    ([('o', 'c'), ('o', 'd')], [[2, 1], [-10000000000000000000000000000000000000000, 5]])
    >>> unpack_entries(pack_key_columns(keys, columns), key_width=2)
    {('o', 'c'): [2, -10000000000000000000000000000000000000000], ('o', 'd'): [1, 5]}
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import msgspec
import pyarrow

FORMAT = 2
KEY_COLUMNS = 3  # the format of pack_key_columns
COMPRESSED = 0xC1  # the first byte of compressed bytes (``compressed``): one msgpack never uses
COMPRESS_FROM = 4096  # bytes; below, compressing saves little
_ZSTD = pyarrow.Codec("zstd", 1)
_FORMAT_2 = 0x93  # the first byte of format 2 (a 3-item array); format 1 starts 0x92 (2 items)
_FORMAT_1_BYTES = 32  # format 1's unbounded column: 32-byte signed little-endian integers
_BIN = (0xC4, 0xC5, 0xC6)  # msgpack bin headers: format 2's values as JSON
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_decode_format_2 = msgspec.msgpack.Decoder(tuple[int, list[tuple], msgspec.Raw]).decode
_encode_json = msgspec.json.Encoder().encode
_ROWS = {tuple: tuple[tuple[int, ...], ...], list: list[list[int]]}  # values as a factory wants
_decode_rows = {kind: msgspec.msgpack.Decoder(rows).decode for kind, rows in _ROWS.items()}
_decode_json_rows = {kind: msgspec.json.Decoder(rows).decode for kind, rows in _ROWS.items()}
_decode_columns = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
_decode_column = msgspec.msgpack.Decoder(list[int]).decode
_decode_json_column = msgspec.json.Decoder(list[int]).decode


def pack_entries(entries: dict[tuple, Sequence[int]], *, key_width: int, big: int) -> bytes:
    """``{key: values}`` (keys: tuples of ``key_width`` str/int items; values: integers of any
    size, as many for every key) as bytes. ``big``, the one column whose integers may not fit
    64 bits, is what format 1 needed to know; format 2 needs neither it nor ``key_width``.

        >>> unpack_entries(pack_entries({("k",): [1, 2**300]}, key_width=1, big=1), key_width=1)
        {('k',): [1, 2037035976334486086268445688409378161051468393665936250636140449354381299763336706183397376]}
    """
    return pack_columns(list(entries), list(entries.values()), key_width=key_width, big=big)


def pack_columns(keys: Iterable[tuple], values: list[Sequence[int]], *, key_width: int,
                 big: int) -> bytes:
    """Like ``pack_entries`` for ``dict(zip(keys, values))``, without building that dict (a
    store packs the entries changed since its last snapshot: their keys, and their values).

        >>> live = {("a",): [1, 5], ("b",): [2, 6]}
        >>> unpack_entries(pack_columns([("b",)], [live[("b",)]], key_width=1, big=1), key_width=1)
        {('b',): [2, 6]}
    """
    return _encode((FORMAT, keys if isinstance(keys, list) else list(keys), _pack_values(values)))


def _pack_values(values: list[Sequence[int]]) -> msgspec.Raw | bytes:
    """msgpack arrays of integers if they all fit 64 bits, else JSON (bytes), of any integers.

        >>> _pack_values([(1, -1), (0, 2**64)])
        b'[[1,-1],[0,18446744073709551616]]'
    """
    try:
        return msgspec.Raw(_encode(values))
    except OverflowError:
        return _encode_json(values)


def pack_key_columns(keys: list[tuple], columns: Sequence[list[int]]) -> bytes:
    """``keys`` (tuples of str/int items) and their values, one list of integers of any size
    per value column, as bytes (format 3): the lists are read as they are, not copied."""
    return _encode((KEY_COLUMNS, keys, list(map(_pack_values, columns))))


def compressed(packed: bytes) -> bytes:
    """``packed`` compressed (zstd, level 1) where it is large; the unpacking functions read
    either. A snapshot holds every segment of an open window and is written whole at every
    epoch, so a segment's bytes cost at each epoch of its window's life, its compression
    once: window segments of keys and integers shrink about 4x, at ~120 ns a key.

        >>> packed = pack_key_columns([("org_001", f"cus_001_{i:04d}", "api_calls") for i in range(500)],
        ...                           ([1] * 500, [10**18] * 500, [0] * 500))
        >>> small = compressed(packed)
        >>> small[0] == COMPRESSED and len(small) * 4 < len(packed), unpack_key_columns(small) == unpack_key_columns(packed)
        (True, True)
    """
    if len(packed) < COMPRESS_FROM:
        return packed
    return bytes((COMPRESSED,)) + len(packed).to_bytes(8, "little") + _ZSTD.compress(packed, asbytes=True)


def _plain(packed: bytes) -> bytes:
    """``packed`` as ``pack_*`` made it (decompressed if ``compressed`` compressed it)."""
    if packed[0] != COMPRESSED:
        return packed
    return _ZSTD.decompress(memoryview(packed)[9:], int.from_bytes(packed[1:9], "little"), asbytes=True)


def unpack_key_columns(packed: bytes, *, key_width: int = 3) -> tuple[list[tuple], list[list[int]]]:
    """The keys and value columns of bytes of any format (``key_width`` for format 1),
    compressed or not."""
    packed = _plain(packed)
    if packed[0] == _FORMAT_2:
        version, keys, values = _decode_format_2(packed)
        if version == KEY_COLUMNS:
            return keys, list(map(_unpack_column, _decode_columns(values)))
    entries = unpack_entries(packed, key_width=key_width, factory=tuple)
    return list(entries), list(map(list, zip(*entries.values())))


def _unpack_column(column: msgspec.Raw) -> list[int]:
    if memoryview(column)[0] in _BIN:
        return _decode_json_column(_decode(column))
    return _decode_column(column)


def unpack_entries(packed: bytes, *, key_width: int, factory: Callable = list) -> dict:
    """What ``pack_entries`` (or ``pack_key_columns``) packed, any format, compressed or not:
    ``{key tuple: factory(values)}`` in the same order."""
    packed = _plain(packed)
    if packed[0] != _FORMAT_2:
        return _unpack_format_1(packed, key_width, factory)
    version, keys, values = _decode_format_2(packed)
    if version == KEY_COLUMNS:
        rows = zip(*map(_unpack_column, _decode_columns(values)))
        return dict(zip(keys, rows if factory is tuple else map(factory, rows)))
    kind = tuple if factory is tuple else list
    if memoryview(values)[0] in _BIN:
        rows = _decode_json_rows[kind](_decode(values))
    else:
        rows = _decode_rows[kind](values)
    return dict(zip(keys, rows if factory in _ROWS else map(factory, rows)))


def _unpack_format_1(packed: bytes, key_width: int, factory: Callable) -> dict:
    """Format 1: flat keys, value columns."""
    flat, columns = _decode(packed)
    names = iter(flat)
    rows = zip(*[_format_1_column(column) for column in columns])
    keys = zip(*[names] * key_width)
    return dict(zip(keys, rows if factory is tuple else map(factory, rows)))


def _format_1_column(column: list | bytes) -> list[int]:
    """A format 1 column's integers: msgpack integers, 32-byte integers, or decimal text."""
    if isinstance(column, bytes):
        width = _FORMAT_1_BYTES
        return [int.from_bytes(column[j:j + width], "little", signed=True)
                for j in range(0, len(column), width)]
    if column and isinstance(column[0], str):
        return [int(text) for text in column]
    return column
