"""Window kinds and durations, as reconcile computes them (no flow code).

    >>> Windows("sliding", 60_000, 20_000).starts(65_000)
    [20000, 40000, 60000]
    >>> Windows("session", gap_ms=30_000).last_end(1_000)
    31000
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
GRAIN_MS = {"hour": HOUR_MS, "day": DAY_MS}
_DURATION = re.compile(r"([0-9]+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": HOUR_MS, "d": DAY_MS}


def duration_ms(text: str) -> int:
    """``1h30m`` → 5400000 (the flow's duration syntax, parsed here again).

    >>> duration_ms("1h30m"), duration_ms("250ms")
    (5400000, 250)
    """
    cleaned, total, position = text.strip().lower(), 0, 0
    for match in _DURATION.finditer(cleaned):
        if match.start() != position:
            break
        total += int(match.group(1)) * _UNIT_MS[match.group(2)]
        position = match.end()
    if not cleaned or position != len(cleaned):
        raise ValueError(f"not a duration: {text!r}")
    return total


@dataclass(frozen=True)
class Windows:
    """One window kind: ``tumbling`` (size), ``sliding`` (size, slide) or ``session`` (gap)."""

    kind: str = "tumbling"
    size_ms: int = 60_000
    slide_ms: int | None = None
    gap_ms: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("tumbling", "sliding", "session"):
            raise ValueError(f"WINDOW_KIND: {self.kind!r} is not tumbling, sliding or session")
        if self.kind == "session" and not self.gap_ms:
            raise ValueError("SESSION_GAP: session windows need a gap")
        if self.kind == "sliding" and not self.slide_ms:
            raise ValueError("WINDOW_SLIDE: sliding windows need a slide")
        if self.kind != "session" and self.size_ms <= 0:
            raise ValueError("WINDOW_SIZE: must be longer than 0")

    @property
    def step_ms(self) -> int:
        """Distance between window starts of a fixed kind."""
        return self.slide_ms if self.kind == "sliding" else self.size_ms

    def starts(self, timestamp_ms: int) -> list[int]:
        """Starts of the fixed windows ``[start, start + size)`` holding ``timestamp_ms``, oldest first."""
        step = self.step_ms
        start = timestamp_ms - timestamp_ms % step
        starts = []
        while start > timestamp_ms - self.size_ms:
            starts.append(start)
            start -= step
        return starts[::-1]

    def last_end(self, timestamp_ms: int) -> int:
        """When the last window that can hold the event ends (a session: its own minimal one)."""
        if self.kind == "session":
            return timestamp_ms + self.gap_ms
        return timestamp_ms - timestamp_ms % self.step_ms + self.size_ms
