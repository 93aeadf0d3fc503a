"""Open windows of one shard: exact count and scaled-integer sum per key and window.

    >>> from operators.windows import TumblingWindows
    >>> store = WindowStore(TumblingWindows(60_000))
    >>> store.add(0, ("org", "cust", "api_calls"), 1_500_000_000_000_000_000)
    >>> [(r.event_count, r.total_scaled) for r in store.emit_closed(closing_ms=60_000, watermark_ms=60_000)]
    [(1, 1500000000000000000)]
    >>> store.open_windows()
    0
"""

from __future__ import annotations

from dataclasses import dataclass

from operators.records import WindowRow
from operators.windows import WindowKind

WindowKey = tuple  # (organization_id, external_customer_id, code)


@dataclass(frozen=True)
class WindowSnapshot:
    """Open windows: ``{start: {key: (count, total_scaled, emitted_count)}}``."""

    fingerprint: str
    windows: dict[int, dict[WindowKey, tuple[int, int, int]]]


class WindowStore:
    """Keeps aggregates until the watermark passes a window's end, then emits its rows.

    Each aggregate is ``[count, total_scaled, emitted_count]``. A row is emitted
    with ``version = count``: counts only grow, so a later emission always
    replaces an earlier one in ClickHouse.
    """

    def __init__(self, windows: WindowKind, resume: WindowSnapshot | None = None,
                 allowed_lateness_ms: int = 0, grain: str = "") -> None:
        self.windows = windows
        self.allowed_lateness_ms = allowed_lateness_ms
        self.grain = grain
        self._open: dict[int, dict[WindowKey, list[int]]] = {}
        if resume is not None:
            if resume.fingerprint != windows.fingerprint:
                raise ValueError(
                    f"window state was built for {resume.fingerprint}, the flow now uses "
                    f"{windows.fingerprint}; start a new recovery store to change windows"
                )
            self._open = {
                start: {key: list(agg) for key, agg in keys.items()}
                for start, keys in resume.windows.items()
            }

    def add(self, start_ms: int, key: WindowKey, value_scaled: int) -> None:
        keys = self._open.get(start_ms)
        if keys is None:
            keys = self._open[start_ms] = {}
        aggregate = keys.get(key)
        if aggregate is None:
            keys[key] = [1, value_scaled, 0]
        else:
            aggregate[0] += 1
            aggregate[1] += value_scaled

    def add_group(self, start_ms: int, key: WindowKey, count: int, total_scaled: int) -> None:
        """Add ``count`` events summing to ``total_scaled`` at once (a batch pre-aggregated)."""
        keys = self._open.get(start_ms)
        if keys is None:
            keys = self._open[start_ms] = {}
        aggregate = keys.get(key)
        if aggregate is None:
            keys[key] = [count, total_scaled, 0]
        else:
            aggregate[0] += count
            aggregate[1] += total_scaled

    def emit_closed(self, closing_ms: int, watermark_ms: int) -> list[WindowRow]:
        """Rows of windows ending at or before ``closing_ms``.

        Windows the real ``watermark_ms`` has passed by more than the allowed
        lateness are forgotten; until then (and when only flushed because the input
        ended) they stay open, so later events correct their rows.
        """
        rows: list[WindowRow] = []
        for start in sorted(self._open):
            end = self.windows.window_end(start)
            if end > closing_ms:
                break
            keys = self._open[start]
            rows.extend(self._rows(start, end, keys, self.grain))
            if end + self.allowed_lateness_ms <= watermark_ms:
                del self._open[start]
        return rows

    @staticmethod
    def _rows(start: int, end: int, keys: dict[WindowKey, list[int]], grain: str) -> list[WindowRow]:
        rows = []
        for (org, customer, code), aggregate in keys.items():
            count, total, emitted = aggregate
            if count != emitted:
                rows.append(WindowRow(org, customer, code, start, end, count, total, count, False, grain))
                aggregate[2] = count
        return rows

    def accepts(self, start_ms: int, watermark_before: int) -> bool:
        """Whether an event seen at ``watermark_before`` still counts in this window."""
        return self.windows.window_end(start_ms) + self.allowed_lateness_ms > watermark_before

    def open_windows(self) -> int:
        return len(self._open)

    def snapshot(self) -> WindowSnapshot:
        return WindowSnapshot(
            self.windows.fingerprint,
            {start: {key: tuple(agg) for key, agg in keys.items()} for start, keys in self._open.items()},
        )


@dataclass(frozen=True)
class StoreRow:
    """A generic aggregate row: key, window, event count, scaled result, version."""

    key: tuple
    start_ms: int
    end_ms: int
    count: int
    result: int
    version: int
    is_deleted: bool = False


@dataclass(frozen=True)
class AggregateSnapshot:
    fingerprint: str
    windows: dict


class AggregateWindowStore:
    """Fixed (tumbling or sliding) windows folding events with any catalog aggregation.

    >>> from operators.aggregations import Max
    >>> from operators.windows import TumblingWindows
    >>> store = AggregateWindowStore(TumblingWindows(60_000), Max())
    >>> store.add(("org", "cust", ()), 1_000, 5, watermark_before=0), store.add(("org", "cust", ()), 2_000, 9, 0)
    (True, True)
    >>> [(r.count, r.result, r.version) for r in store.emit(closing_ms=60_000, watermark_ms=60_000)]
    [(2, 9, 2)]
    """

    def __init__(self, windows: WindowKind, aggregation, allowed_lateness_ms: int = 0,
                 resume: AggregateSnapshot | None = None) -> None:
        self.windows = windows
        self.aggregation = aggregation
        self.allowed_lateness_ms = allowed_lateness_ms
        self._open: dict[int, dict[tuple, list]] = {}
        if resume is not None:
            if resume.fingerprint != self.fingerprint:
                raise ValueError(f"window state was built for {resume.fingerprint}, the flow "
                                 f"now uses {self.fingerprint}; start a new recovery store")
            self._open = {start: {k: list(v) for k, v in keys.items()}
                          for start, keys in resume.windows.items()}

    @property
    def fingerprint(self) -> str:
        return f"{self.windows.fingerprint}:{self.aggregation.name}:{self.allowed_lateness_ms}"

    def add(self, key: tuple, timestamp_ms: int, value, watermark_before: int) -> bool:
        """Fold the event into each of its windows still open; False if none was."""
        agg, lateness, added = self.aggregation, self.allowed_lateness_ms, False
        for start in self.windows.starts_for(timestamp_ms):
            if self.windows.window_end(start) + lateness <= watermark_before:
                continue
            keys = self._open.setdefault(start, {})
            entry = keys.get(key)
            if entry is None:
                entry = keys[key] = [agg.create(), 0, 0]
            entry[0] = agg.add(entry[0], value, timestamp_ms)
            entry[1] += 1
            added = True
        return added

    def emit(self, closing_ms: int, watermark_ms: int) -> list[StoreRow]:
        rows: list[StoreRow] = []
        for start in sorted(self._open):
            end = self.windows.window_end(start)
            if end > closing_ms:
                break
            for key, entry in self._open[start].items():
                if entry[1] != entry[2]:
                    rows.append(StoreRow(key, start, end, entry[1],
                                         self.aggregation.result(entry[0], end), entry[1]))
                    entry[2] = entry[1]
            if end + self.allowed_lateness_ms <= watermark_ms:
                del self._open[start]
        return rows

    def snapshot(self) -> AggregateSnapshot:
        import copy

        return AggregateSnapshot(self.fingerprint, copy.deepcopy(self._open))
