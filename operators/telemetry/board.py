"""The in-process figures behind the status page (``/status.json``).

    >>> board = StatusBoard(clock=lambda: 1_000.0)
    >>> board.consumed(0, 500); board.invalid("malformed_json", 2); board.watermark(0, 90_000, 100_000)
    >>> board.consumer_lag(0, -3)   # the dev broker under-reports end offsets: clamped at 0
    >>> status = board.status()
    >>> status["totals"]["consumed"], status["totals"]["invalid"], status["partitions"][0]["lag"]
    (500, 2, 0)
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable


@dataclass
class PartitionStatus:
    consumed: int = 0
    lag: int | None = None
    watermark_ms: int | None = None
    max_event_ms: int | None = None


class StatusBoard:
    """The small in-process state behind ``/status.json``; thread-safe, wall clock injected.

    :meth:`tick` (once a second, from the HTTP server's sampler thread) keeps the history the
    sparklines draw: events per second, rows per second, total lag.
    """

    def __init__(self, clock: Callable[[], float] = time.time, history: int = 180) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.started_s = clock()
        self.totals = Counter()  # consumed, valid, duplicates, late, windows_closed, sink_retries
        self.invalid_by_reason: Counter = Counter()
        self.rows_by_table: Counter = Counter()
        self.partitions: dict[int, PartitionStatus] = {}
        self.last_write: tuple[float, str, int, float] | None = None  # (at, table, rows, seconds)
        self.last_snapshot: tuple[float, float] | None = None  # (at, seconds)
        self.recent_traces: deque[str] = deque(maxlen=10)
        self._history: deque[tuple[float, int, int, int]] = deque(maxlen=history + 1)

    def _partition(self, partition: int) -> PartitionStatus:
        status = self.partitions.get(partition)
        if status is None:
            status = self.partitions[partition] = PartitionStatus()
        return status

    def consumed(self, partition: int, n: int) -> None:
        with self._lock:
            self.totals["consumed"] += n
            self._partition(partition).consumed += n

    def add(self, name: str, n: int) -> None:
        with self._lock:
            self.totals[name] += n

    def invalid(self, reason: str, n: int) -> None:
        with self._lock:
            self.invalid_by_reason[reason] += n

    def sink_write(self, table: str, rows: int, seconds: float) -> None:
        with self._lock:
            self.rows_by_table[table] += rows
            self.last_write = (self._clock(), table, rows, seconds)

    def snapshot_taken(self, seconds: float | None) -> None:
        """A snapshot was taken now; ``seconds`` is its duration (None: keep the last known)."""
        with self._lock:
            if seconds is None:
                seconds = self.last_snapshot[1] if self.last_snapshot else 0.0
            self.last_snapshot = (self._clock(), seconds)

    def watermark(self, partition: int, watermark_ms: int, max_event_ms: int) -> None:
        with self._lock:
            status = self._partition(partition)
            status.watermark_ms, status.max_event_ms = watermark_ms, max_event_ms

    def consumer_lag(self, partition: int, lag: int) -> None:
        with self._lock:
            self._partition(partition).lag = max(0, lag)

    def trace_started(self, trace_id: str) -> None:
        with self._lock:
            self.recent_traces.appendleft(trace_id)

    def watermarks(self) -> list[tuple[int, int, int]]:
        """(partition, watermark, delay behind the newest event this process has seen)."""
        with self._lock:
            known = [(p, s.watermark_ms, s.max_event_ms) for p, s in self.partitions.items()
                     if s.watermark_ms is not None]
        if not known:
            return []
        newest = max(m for _p, _w, m in known)
        return [(p, w, max(0, newest - w)) for p, w, _m in known]

    def lags(self) -> list[tuple[int, int]]:
        with self._lock:
            return [(p, s.lag) for p, s in self.partitions.items() if s.lag is not None]

    def tick(self) -> None:
        with self._lock:
            lag = sum(s.lag or 0 for s in self.partitions.values())
            rows = sum(self.rows_by_table.values())
            self._history.append((self._clock(), self.totals["consumed"], rows, lag))

    def status(self) -> dict:
        """Everything ``/status.json`` serves, as plain JSON-able values."""
        delays = {p: d for p, _w, d in self.watermarks()}
        now = self._clock()
        with self._lock:
            history = list(self._history)
            partitions = [
                {"partition": p, "consumed": s.consumed, "lag": s.lag, "watermark_ms": s.watermark_ms,
                 "watermark_delay_ms": delays.get(p), "max_event_ms": s.max_event_ms}
                for p, s in sorted(self.partitions.items())
            ]
            totals = {
                "consumed": self.totals["consumed"], "valid": self.totals["valid"],
                "invalid": sum(self.invalid_by_reason.values()), "duplicates": self.totals["duplicates"],
                "late": self.totals["late"], "windows_closed": self.totals["windows_closed"],
                "rows_written": sum(self.rows_by_table.values()),
                "sink_retries": self.totals["sink_retries"],
                "metric_field_missing": self.totals["metric_field_missing"],
            }
            invalid = dict(sorted(self.invalid_by_reason.items()))
            rows = dict(sorted(self.rows_by_table.items()))
            last_write, last_snapshot = self.last_write, self.last_snapshot
            traces = list(self.recent_traces)
        series = _rates(history)
        return {
            "now_ms": int(now * 1000),
            "uptime_s": round(now - self.started_s, 1),
            "totals": totals,
            "invalid_by_reason": invalid,
            "rows_by_table": rows,
            "rates": {"events_per_s": _recent_rate(history, 1), "rows_per_s": _recent_rate(history, 2)},
            "lag_total": sum(p["lag"] or 0 for p in partitions),
            "partitions": partitions,
            "sink": None if last_write is None else {
                "last_write_ms": int(last_write[0] * 1000), "age_s": round(now - last_write[0], 1),
                "table": last_write[1], "rows": last_write[2], "seconds": round(last_write[3], 4)},
            "snapshot": None if last_snapshot is None else {
                "last_ms": int(last_snapshot[0] * 1000), "age_s": round(now - last_snapshot[0], 1),
                "seconds": round(last_snapshot[1], 4)},
            "history": series,
            "recent_traces": traces,
        }


def _rates(history: list[tuple[float, int, int, int]]) -> dict:
    t, events, rows, lag = [], [], [], []
    for (t0, c0, r0, _l0), (t1, c1, r1, l1) in zip(history, history[1:]):
        span = max(t1 - t0, 1e-3)
        t.append(int(t1 * 1000))
        events.append(round((c1 - c0) / span, 1))
        rows.append(round((r1 - r0) / span, 1))
        lag.append(l1)
    return {"t_ms": t, "events_per_s": events, "rows_per_s": rows, "lag": lag}


def _recent_rate(history: list, column: int, seconds: float = 5.0) -> float:
    if len(history) < 2:
        return 0.0
    last = history[-1]
    first = next((h for h in history if last[0] - h[0] <= seconds), history[0])
    if first is last:
        first = history[-2]
    return round((last[column] - first[column]) / max(last[0] - first[0], 1e-3), 1)
