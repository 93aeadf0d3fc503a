"""A sink partition that writes in batches bounded by rows and time, and at every epoch.

Bytewax calls ``snapshot()`` at the end of each epoch, before the epoch's
recovery state is committed. Flushing there means nothing the committed state
has consumed can still sit in a buffer: a crash loses no output, and a replay
only rewrites what the sink made idempotent.

Partitions of one sink on one worker may share their buffer (:class:`SharedBuffer`): then
whichever of them flushes writes what all of them hold, in one write per table instead of
one per partition. That stays exact because every partition's ``snapshot()`` flushes the
shared buffer too, so at the end of an epoch nothing any of them was given is left unwritten.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from typing import Callable, Generic, TypeVar

from bytewax.outputs import StatefulSinkPartition

X = TypeVar("X")


class SharedBuffer:
    """Items waiting to be written, and when the last write was; one partition's own, or
    shared by several partitions of one sink (see the module docstring).

    The lock is held while a flush writes, so a partition that flushes (or snapshots) while
    another partition's flush of the same buffer is under way waits for it to finish: when
    its ``flush()`` returns, everything handed over before is written.
    """

    def __init__(self) -> None:
        self.items: list = []
        self.rows = 0
        self.last_write = float("-inf")
        self.lock = threading.RLock()


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

    Partitions given one ``buffer`` write together; either one's snapshot writes both's items::

        >>> shared = SharedBuffer()
        >>> a = Printing(max_rows=1_000, max_age_s=2.0, clock=lambda: now[0], buffer=shared)
        >>> b = Printing(max_rows=1_000, max_age_s=2.0, clock=lambda: now[0], buffer=shared)
        >>> a.write_batch([5]); now[0] += 0.1; b.write_batch([6])
        write [5]
        >>> a.snapshot(); b.snapshot()
        write [6]
    """

    def __init__(self, max_rows: int, max_age_s: float, clock: Callable[[], float] = time.monotonic,
                 buffer: SharedBuffer | None = None) -> None:
        self._max_rows = max_rows
        self._max_age_s = max_age_s
        self._clock = clock
        self._pending = buffer if buffer is not None else SharedBuffer()

    @abstractmethod
    def flush_items(self, items: list[X]) -> None:
        """Write ``items`` durably or raise; called with at least one item."""

    def rows_in(self, values: list[X]) -> int:
        """How many rows ``values`` hold: one an item, unless a subclass takes batches."""
        return len(values)

    def write_batch(self, values: list[X]) -> None:
        if not values:
            return
        pending = self._pending
        with pending.lock:
            pending.items.extend(values)
            pending.rows += self.rows_in(values)
            if pending.rows >= self._max_rows or self._clock() - pending.last_write >= self._max_age_s:
                self.flush_due()

    def flush_due(self) -> None:
        """A batch is full or old: write it. A subclass may let the write run on while the
        worker goes on (``sinks.clickhouse_sink``); :meth:`flush` is the one that waits."""
        self.flush()

    def flush(self) -> None:
        """Write everything buffered, and return once it is written (see :meth:`settle`)."""
        self.hand_over()
        self.settle()

    def settle(self) -> None:
        """Return once every write ``flush_items`` started is done (or raise its error).

        Here ``flush_items`` has written before it returns; a subclass whose writes run on
        waits for them."""

    def hand_over(self) -> None:
        """Give everything buffered to ``flush_items`` (under the buffer's lock)."""
        pending = self._pending
        with pending.lock:
            if pending.items:
                items, pending.items, pending.rows = pending.items, [], 0
                self.flush_items(items)
                pending.last_write = self._clock()

    def snapshot(self) -> None:
        self.flush()
        return None

    def close(self) -> None:
        self.flush()
