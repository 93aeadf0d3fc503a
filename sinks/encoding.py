"""Times as ClickHouse DateTime64(3) text, and the range ClickHouse takes (rows themselves go
out as Arrow columns, ``sinks.columnar``, which clamps to the same range).

    >>> format_datetime64(1_767_225_600_123)
    '2026-01-01 00:00:00.123'
"""

from __future__ import annotations

from functools import lru_cache

from state.utc_calendar import utc_text

DATETIME64_MIN_MS = -2_208_988_800_000  # 1900-01-01 00:00:00.000, ClickHouse's first DateTime64
DATETIME64_MAX_MS = 253_402_300_799_999  # 9999-12-31 23:59:59.999, the last time ClickHouse parses


@lru_cache(maxsize=4096)
def format_datetime64(epoch_ms: int) -> str:
    """Epoch milliseconds as ClickHouse DateTime64(3) text in UTC; never raises.

    Integer calendar arithmetic, so the end of a window or rollup past year 9999 (the day after
    9999-12-31) is a time like any other. A time outside what ClickHouse parses is written at
    the nearest end of that range: only a window's end can get there (event times are
    validated), and it is not part of any row's key.

    >>> format_datetime64(253_402_214_400_000), format_datetime64(253_402_300_800_000)
    ('9999-12-31 00:00:00.000', '9999-12-31 23:59:59.999')
    """
    return utc_text(min(max(epoch_ms, DATETIME64_MIN_MS), DATETIME64_MAX_MS))
