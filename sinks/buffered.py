"""A sink partition that writes in batches bounded by rows and time, and at every epoch.

Bytewax calls ``snapshot()`` at the end of each epoch, before the epoch's
recovery state is committed. Flushing there means nothing the committed state
has consumed can still sit in a buffer: a crash loses no output, and a replay
only rewrites what the sink made idempotent.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from typing import Callable, Generic, TypeVar

from bytewax.outputs import StatefulSinkPartition

X = TypeVar("X")


class BufferedPartition(StatefulSinkPartition[X, None], Generic[X]):
    """Buffers items; ``flush_items`` gets them when the batch is full, when ``max_age_s`` has
    passed since the last write, or when the epoch ends.

    So a partition writes at most once per ``max_age_s`` unless its batches fill up, and rows
    that arrive after a quiet spell go out at once instead of waiting out the interval::

        >>> class Printing(BufferedPartition):
        ...     def flush_items(self, items): print("write", items)
        >>> now = [100.0]
        >>> sink = Printing(max_rows=1_000, max_age_s=2.0, clock=lambda: now[0])
        >>> sink.write_batch([1, 2])          # nothing written for 2 s: at once
        write [1, 2]
        >>> now[0] += 0.5; sink.write_batch([3])   # 0.5 s after the last write: buffered
        >>> now[0] += 1.6; sink.write_batch([4])
        write [3, 4]
    """

    def __init__(self, max_rows: int, max_age_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_rows = max_rows
        self._max_age_s = max_age_s
        self._clock = clock
        self._buffer: list[X] = []
        self._buffered_rows = 0
        self._last_write = float("-inf")

    @abstractmethod
    def flush_items(self, items: list[X]) -> None:
        """Write ``items`` durably or raise; called with at least one item."""

    def rows_in(self, values: list[X]) -> int:
        """How many rows ``values`` hold: one an item, unless a subclass takes batches."""
        return len(values)

    def write_batch(self, values: list[X]) -> None:
        if not values:
            return
        self._buffer.extend(values)
        self._buffered_rows += self.rows_in(values)
        if self._buffered_rows >= self._max_rows or self._clock() - self._last_write >= self._max_age_s:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            items, self._buffer, self._buffered_rows = self._buffer, [], 0
            self.flush_items(items)
            self._last_write = self._clock()

    def snapshot(self) -> None:
        self.flush()
        return None

    def close(self) -> None:
        self.flush()
