"""Exact values and event times as the plain consumers read them (standard library only:
the Quix app imports this under its own venv)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

SCALE = 10**18  # values are summed as integers scaled by 10**18, like the flow


def scaled_value(value: object) -> int:
    """A JSON event ``value`` (None, int, or decimal text) as an exact integer * 10**18.

    >>> scaled_value("1.5"), scaled_value(2), scaled_value(None)
    (1500000000000000000, 2000000000000000000, 0)
    """
    if value is None:
        return 0
    if type(value) is int:
        return value * SCALE
    if type(value) is not str:
        raise ValueError(f"not a number: {value!r}")
    whole, _, fraction = value.partition(".")
    if len(fraction) > 18 or not whole.isdigit() or (fraction and not fraction.isdigit()):
        raise ValueError(f"not a plain decimal: {value!r}")
    return int(whole) * SCALE + (int(fraction.ljust(18, "0")) if fraction else 0)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)


def event_time_ms(timestamp: object) -> int:
    """Epoch ms from an event's ``timestamp`` (epoch ms or RFC 3339 with an offset)."""
    if type(timestamp) is int:
        return timestamp
    if type(timestamp) is not str:
        raise ValueError(f"not a timestamp: {timestamp!r}")
    moment = datetime.fromisoformat(timestamp)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without offset: {timestamp!r}")
    return (moment - _EPOCH) // _ONE_MS
