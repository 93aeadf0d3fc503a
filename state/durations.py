"""Durations as the settings and the metric catalog write them: ``250ms``, ``30s``, ``1h30m``.

    >>> parse_duration_ms("1h30m")
    5400000
"""

from __future__ import annotations

import re

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class DurationError(ValueError):
    """A text is not a duration; the message quotes it."""


def parse_duration_ms(text: str) -> int:
    """Parse a duration like ``30s``, ``5m``, ``1h30m`` or ``250ms`` into milliseconds.

    >>> parse_duration_ms("0s")
    0
    >>> parse_duration_ms("5 minutes")
    Traceback (most recent call last):
    ...
    state.durations.DurationError: not a duration: '5 minutes' (use e.g. 250ms, 30s, 5m, 1h, 1d)
    """
    cleaned = text.strip().lower()
    pos, total = 0, 0
    for match in _DURATION_PART.finditer(cleaned):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNIT_MS[match.group(2)]
        pos = match.end()
    if not cleaned or pos != len(cleaned):
        raise DurationError(f"not a duration: {text!r} (use e.g. 250ms, 30s, 5m, 1h, 1d)")
    return total
