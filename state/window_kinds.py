"""Which event-time windows an event belongs to.

One class per window kind over a shared base. Times are epoch milliseconds::

    >>> minute = TumblingWindows(60_000)
    >>> minute.window_start(61_500), minute.window_end(60_000)
    (60000, 120000)
    >>> minute.last_end_for(61_500)
    120000
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from state.utc_calendar import month_start_ms, next_month_start_ms


class WindowKind(ABC):
    """Assigns events to windows ``[start, start + size)`` and says when a window ends."""

    name: str

    @abstractmethod
    def starts_for(self, timestamp_ms: int) -> list[int]:
        """Start of every window the event at ``timestamp_ms`` falls in."""

    @abstractmethod
    def window_end(self, start_ms: int) -> int:
        """Exclusive end of the window that starts at ``start_ms``."""

    def last_end_for(self, timestamp_ms: int) -> int:
        """End of the latest-closing window holding ``timestamp_ms``: after it the event is late."""
        return max(self.window_end(start) for start in self.starts_for(timestamp_ms))

    def last_end_steps(self) -> tuple[int, int]:
        """``(step, offset)`` with ``last_end_for(t) == t - t % step + offset`` for every kind
        here, so the intake's per-event loop can inline it.

        >>> kind = SlidingWindows(size_ms=60_000, slide_ms=20_000)
        >>> step, offset = kind.last_end_steps()
        >>> 65_000 - 65_000 % step + offset == kind.last_end_for(65_000)
        True
        """
        raise NotImplementedError(f"{type(self).__name__} has no closed form for last_end_for")

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Identifies the window parameters, so state built with others is never reused."""


class TumblingWindows(WindowKind):
    """Fixed, non-overlapping windows aligned to the epoch."""

    name = "tumbling"

    def __init__(self, size_ms: int) -> None:
        if size_ms <= 0:
            raise ValueError(f"window size must be positive, got {size_ms} ms")
        self.size_ms = size_ms

    def window_start(self, timestamp_ms: int) -> int:
        return timestamp_ms - timestamp_ms % self.size_ms

    def starts_for(self, timestamp_ms: int) -> list[int]:
        return [self.window_start(timestamp_ms)]

    def window_end(self, start_ms: int) -> int:
        return start_ms + self.size_ms

    def last_end_for(self, timestamp_ms: int) -> int:
        return timestamp_ms - timestamp_ms % self.size_ms + self.size_ms

    def last_end_steps(self) -> tuple[int, int]:
        return self.size_ms, self.size_ms

    @property
    def fingerprint(self) -> str:
        return f"tumbling:{self.size_ms}"


class SlidingWindows(WindowKind):
    """Overlapping windows ``[start, start + size)`` whose starts are multiples of ``slide``.

    >>> hopping = SlidingWindows(size_ms=60_000, slide_ms=20_000)
    >>> hopping.starts_for(65_000)
    [20000, 40000, 60000]
    """

    name = "sliding"

    def __init__(self, size_ms: int, slide_ms: int) -> None:
        if size_ms <= 0 or slide_ms <= 0:
            raise ValueError("sliding windows need a positive size and slide")
        if slide_ms > size_ms:
            raise ValueError(f"slide ({slide_ms} ms) longer than the window ({size_ms} ms) would skip events")
        self.size_ms = size_ms
        self.slide_ms = slide_ms

    def starts_for(self, timestamp_ms: int) -> list[int]:
        last = timestamp_ms - timestamp_ms % self.slide_ms
        earliest = timestamp_ms - self.size_ms  # exclusive: a window starting here has ended
        first = last - (last - earliest - 1) // self.slide_ms * self.slide_ms
        return list(range(first, last + 1, self.slide_ms))

    def window_end(self, start_ms: int) -> int:
        return start_ms + self.size_ms

    def last_end_for(self, timestamp_ms: int) -> int:
        return timestamp_ms - timestamp_ms % self.slide_ms + self.size_ms

    def last_end_steps(self) -> tuple[int, int]:
        return self.slide_ms, self.size_ms

    @property
    def fingerprint(self) -> str:
        return f"sliding:{self.size_ms}:{self.slide_ms}"


class SessionWindows(WindowKind):
    """Activity sessions per key: an event within ``gap`` of a session joins it.

    A session spans ``[first event, last event + gap)``. Sessions are data-driven,
    so they live in ``state.sessions.SessionStore``; this class only says when an
    event can no longer join anything (its own minimal session has ended).

    >>> SessionWindows(gap_ms=30_000).last_end_for(1_000)
    31000
    """

    name = "session"

    def __init__(self, gap_ms: int) -> None:
        if gap_ms <= 0:
            raise ValueError(f"session gap must be positive, got {gap_ms} ms")
        self.gap_ms = gap_ms

    def starts_for(self, timestamp_ms: int) -> list[int]:
        return [timestamp_ms]

    def window_end(self, start_ms: int) -> int:
        return start_ms + self.gap_ms

    def last_end_for(self, timestamp_ms: int) -> int:
        return timestamp_ms + self.gap_ms

    def last_end_steps(self) -> tuple[int, int]:
        return 1, self.gap_ms

    @property
    def fingerprint(self) -> str:
        return f"session:{self.gap_ms}"


_DAY_MS = 86_400_000


class CalendarWindows(WindowKind):
    """UTC calendar days or months: a window starts at the first instant of its day or
    month and ends at the first instant of the next (billing periods).

    >>> month = CalendarWindows("month")
    >>> feb_2024 = month.starts_for(1_708_000_000_000)[0]          # 2024-02-15
    >>> feb_2024, (month.window_end(feb_2024) - feb_2024) // 86_400_000
    (1706745600000, 29)
    """

    name = "calendar"
    UNITS = ("day", "month")

    def __init__(self, unit: str) -> None:
        if unit not in self.UNITS:
            raise ValueError(f"calendar windows need unit = \"day\" or \"month\", got {unit!r}")
        self.unit = unit

    def window_start(self, timestamp_ms: int) -> int:
        if self.unit == "day":
            return timestamp_ms - timestamp_ms % _DAY_MS
        return month_start_ms(timestamp_ms)

    def starts_for(self, timestamp_ms: int) -> list[int]:
        return [self.window_start(timestamp_ms)]

    def window_end(self, start_ms: int) -> int:
        if self.unit == "day":
            return start_ms + _DAY_MS
        return next_month_start_ms(start_ms)

    @property
    def fingerprint(self) -> str:
        return f"calendar:{self.unit}"


def window_kind(kind: str, *, size_ms: int, slide_ms: int | None = None,
                gap_ms: int | None = None) -> WindowKind:
    """Build a window kind by name (the ``WINDOW_KIND`` setting and the metric catalog).

    >>> window_kind("sliding", size_ms=60_000, slide_ms=10_000).fingerprint
    'sliding:60000:10000'
    """
    if kind == "tumbling":
        return TumblingWindows(size_ms)
    if kind == "sliding":
        if slide_ms is None:
            raise ValueError("sliding windows need a slide (WINDOW_SLIDE)")
        return SlidingWindows(size_ms, slide_ms)
    if kind == "session":
        if gap_ms is None:
            raise ValueError("session windows need a gap (SESSION_GAP)")
        return SessionWindows(gap_ms)
    raise ValueError(f"unknown window kind {kind!r}: use tumbling, sliding or session")
