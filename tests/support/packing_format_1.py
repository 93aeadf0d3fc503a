"""What releases before packing format 2 wrote (``state.packing``), written out from its
specification for tests that check old snapshots still resume; imports nothing from the product.

Format 1 is the msgpack array ``[flat key items, columns]``: every key's items in one list, then
one list of integers per value column, the unbounded column as 32-byte little-endian signed
integers, or as decimal text where a value needs more than 256 bits.
"""

from __future__ import annotations

from itertools import chain

import msgspec


def format_1(entries: dict, big: int = 1) -> bytes:
    """``{key tuple: values}`` as format 1 bytes."""
    values = list(entries.values())
    width = len(values[0]) if values else 0
    columns: list = [[value[i] for value in values] for i in range(width)]
    if values:
        sums = columns[big]
        if all(-(2**255) <= total < 2**255 for total in sums):
            columns[big] = b"".join(total.to_bytes(32, "little", signed=True) for total in sums)
        else:
            columns[big] = [str(total) for total in sums]
    return msgspec.msgpack.encode((list(chain.from_iterable(entries)), columns))
