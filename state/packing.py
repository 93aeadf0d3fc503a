"""Keyed aggregates as compact bytes, for snapshots taken at every epoch.

A shard's stores hold a tuple key and a few integers per entry; at one row per event that is
millions of entries, all snapshotted at the end of every epoch. As a dict of tuples each entry
cost ~2.6 µs to build and pickle (700k entries: 1.8 CPU s). Packed as columns it costs
~0.25 µs (format 1 below: ~0.45 µs): keys as msgpack arrays, the small integer columns as
msgpack integers, and the one column of unbounded sums as msgpack integers where they all fit
64 bits, else as 16-byte integers split in two 64-bit words by numpy (sums above 9.2 units of
10**18 do not fit 64 bits), else as decimal text.

    >>> entries = {("o", "c", "x", 0): (2, -10**40), ("o", "d", "x", 60_000): (1, 5)}
    >>> unpack_entries(pack_entries(entries, key_width=4, big=1), key_width=4, factory=tuple) == entries
    True

The bytes are a msgpack array ``[2, keys, columns]`` (format 2). Format 1, which snapshots of
earlier releases hold, is ``[flat keys, columns]``: the keys' items in one flat list, and the
unbounded column as 32-byte integers; ``unpack_entries`` reads both.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Callable, Iterable, Sequence

import msgspec
import numpy as np

FORMAT = 2
_FORMAT_2 = 0x93  # the first byte of format 2 (a 3-item array); format 1 starts 0x92 (2 items)
_WORDS = 16  # an unbounded column's values as signed 128-bit integers (two 64-bit words)
_LOW_WORD = (1 << 64) - 1
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_decode_format_2 = msgspec.msgpack.Decoder(tuple[int, list[tuple], list]).decode


def pack_entries(entries: dict[tuple, Sequence[int]], *, key_width: int, big: int) -> bytes:
    """``{key: values}`` (keys: tuples of ``key_width`` str/int items; values: ints, all of
    one length; column ``big`` may hold integers of any size, the others fit 64 bits) as bytes.

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
    keys = keys if isinstance(keys, list) else list(keys)
    width = len(values[0]) if values else 0
    columns = [list(map(itemgetter(i), values)) for i in range(width)]
    if width:
        columns[big] = _pack_unbounded(columns[big])
    return _encode((FORMAT, keys, columns))


def _pack_unbounded(column: list[int]):
    """msgpack integers if they all fit 64 bits, else little-endian two's complement 16-byte
    integers (low word, then high word), else decimal text.

        >>> _pack_unbounded([-1, 2**64]).hex()
        'ffffffffffffffffffffffffffffffff00000000000000000100000000000000'
        >>> _pack_unbounded([2**127])
        ['170141183460469231731687303715884105728']
    """
    try:
        return msgspec.Raw(_encode(column))
    except OverflowError:
        pass
    values = np.array(column, dtype=object)
    try:
        high = (values >> 64).astype(np.int64)
    except OverflowError:
        return [str(value) for value in column]
    words = np.empty((len(column), 2), dtype=np.uint64)
    words[:, 0] = (values & _LOW_WORD).astype(np.uint64)
    words[:, 1] = high.view(np.uint64)
    return words.tobytes()


def unpack_entries(packed: bytes, *, key_width: int, factory: Callable = list) -> dict:
    """What ``pack_entries`` packed (either format): ``{key tuple: factory(values)}`` in the
    same order."""
    if packed[0] == _FORMAT_2:
        _format, keys, columns = _decode_format_2(packed)
    else:
        flat, columns = _decode(packed)
        names = iter(flat)
        keys = list(zip(*[names] * key_width))
    rows = zip(*[_unpack_column(column, len(keys)) for column in columns])
    if factory is tuple:
        return dict(zip(keys, rows))
    return dict(zip(keys, map(factory, rows)))


def _unpack_column(column: list | bytes, entries: int) -> list[int]:
    """A column's integers: from msgpack integers, decimal text, or fixed-width integers."""
    if isinstance(column, bytes):
        return _fixed_width(column, len(column) // entries) if entries else []
    if column and isinstance(column[0], str):
        return [int(text) for text in column]
    return column


def _fixed_width(column: bytes, width: int) -> list[int]:
    """Little-endian two's complement integers of ``width`` bytes each.

        >>> _fixed_width(_pack_unbounded([-(2**100), 2**64 + 3]), 16) == [-(2**100), 2**64 + 3]
        True
    """
    if width != _WORDS:  # format 1: 32 bytes
        return [int.from_bytes(column[j:j + width], "little", signed=True)
                for j in range(0, len(column), width)]
    words = np.frombuffer(column, dtype="<u8").reshape(-1, 2)
    low, high = words[:, 0].tolist(), words[:, 1].view("<i8").tolist()
    return [(h << 64) + low_word for h, low_word in zip(high, low)]

