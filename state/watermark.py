"""Event-time watermarks: per Kafka partition, and the minimum over partitions.

No wall clock is involved, so a replay of the same input moves the same
watermarks past the same events::

    >>> wm = PartitionWatermark(max_out_of_orderness_ms=10_000)
    >>> wm.observe(100_000); wm.current
    90000
    >>> tracker = FlowWatermark()
    >>> tracker.report(partition=0, n_partitions=2, watermark=90_000, at_end=False)
    >>> tracker.current == NO_WATERMARK   # partition 1 not heard from yet
    True
    >>> tracker.report(partition=1, n_partitions=2, watermark=50_000, at_end=False)
    >>> tracker.current
    50000
"""

from __future__ import annotations

from dataclasses import dataclass, field

NO_WATERMARK = -(2**63)
"""The watermark before anything is known: no window can close."""

END_OF_STREAM = 2**63 - 1
"""The watermark once every partition has reached its end (stop-at-end mode)."""


class PartitionWatermark:
    """Max event time seen on one partition, minus the allowed out-of-orderness."""

    def __init__(self, max_out_of_orderness_ms: int, max_event_ms: int | None = None) -> None:
        self.max_out_of_orderness_ms = max_out_of_orderness_ms
        self.max_event_ms = max_event_ms

    def observe(self, timestamp_ms: int) -> None:
        if self.max_event_ms is None or timestamp_ms > self.max_event_ms:
            self.max_event_ms = timestamp_ms

    @property
    def current(self) -> int:
        if self.max_event_ms is None:
            return NO_WATERMARK
        return self.max_event_ms - self.max_out_of_orderness_ms


class WatermarkRegression(RuntimeError):
    """A partition's watermark went backwards: source and keyed state resumed from different epochs."""


@dataclass
class FlowWatermark:
    """The flow's watermark as one shard sees it: the minimum over all partitions.

    A partition not yet heard from holds it back. ``closing`` is the
    watermark windows close at: :data:`END_OF_STREAM` once every partition
    is at its end, while ``current`` stays the real event-time watermark.
    """

    n_partitions: int = 0
    partitions: dict[int, int] = field(default_factory=dict)
    at_end: set[int] = field(default_factory=set)
    idle: set[int] = field(default_factory=set)

    def report(self, partition: int, n_partitions: int, watermark: int, at_end: bool,
               idle: bool = False) -> None:
        self.n_partitions = max(self.n_partitions, n_partitions)
        previous = self.partitions.get(partition, NO_WATERMARK)
        if watermark < previous:
            raise WatermarkRegression(
                f"partition {partition} reports watermark {watermark} after {previous}: its source "
                "resumed from older state than this shard's. The recovery store is inconsistent "
                "(a partition file missing or not shared by every process); counts would be wrong, "
                "so the flow stops. Restore the store's files, or start a new store and ClickHouse tables."
            )
        self.partitions[partition] = watermark
        (self.at_end.add if at_end else self.at_end.discard)(partition)
        (self.idle.add if idle else self.idle.discard)(partition)

    @property
    def current(self) -> int:
        """Min over partitions; idle ones (``IDLE_TIMEOUT``) do not hold it back.

        When every partition is idle, the minimum over those that ever sent an event.
        """
        if self.n_partitions == 0 or len(self.partitions) < self.n_partitions:
            return NO_WATERMARK
        active = [wm for p, wm in self.partitions.items() if p not in self.idle]
        if active:
            return min(active)
        # Everything is idle: progress up to the slowest partition that ever sent an event.
        heard = [wm for wm in self.partitions.values() if wm != NO_WATERMARK]
        return min(heard) if heard else NO_WATERMARK

    def resumed(self) -> "FlowWatermark":
        """The state a new execution starts from: watermarks kept, end and idle flags not.

        "At its end" and "idle" describe one execution. Kept across a restart, a
        partition that finished the last run would count as finished before it has
        re-read its (possibly new) input, and windows — and the dedup decision of
        late copies — would close early.
        """
        return FlowWatermark(self.n_partitions, dict(self.partitions))

    def copy(self) -> "FlowWatermark":
        return FlowWatermark(self.n_partitions, dict(self.partitions), set(self.at_end), set(self.idle))

    @property
    def closing(self) -> int:
        if self.n_partitions and len(self.at_end) >= self.n_partitions:
            return END_OF_STREAM
        return self.current
