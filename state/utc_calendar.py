"""UTC calendar arithmetic on epoch milliseconds, in integers: valid for every ``int``.

``datetime`` stops at year 9999, so a month or day boundary computed from an event near the end
of the accepted range (the day after 9999-12-31, the month after December 9999) raised. These
functions use the proleptic Gregorian calendar on plain integers (days since 1970-01-01, as in
Howard Hinnant's ``days_from_civil``/``civil_from_days``), so they never raise for an integer
time, and agree with ``datetime`` wherever it exists::

    >>> civil_from_days(0), civil_from_days(-1), civil_from_days(2_932_896)
    ((1970, 1, 1), (1969, 12, 31), (9999, 12, 31))
    >>> utc_text(253_402_300_800_000)   # 10000-01-01: past datetime, still a date
    '10000-01-01 00:00:00.000'
    >>> month_start_ms(253_402_300_799_999) == days_from_civil(9999, 12, 1) * DAY_MS
    True
    >>> next_month_start_ms(253_402_300_799_999) == 253_402_300_800_000
    True
"""

from __future__ import annotations

DAY_MS = 86_400_000


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days from 1970-01-01 to ``year-month-day`` (proleptic Gregorian; month 1..12).

    >>> days_from_civil(2026, 1, 31), days_from_civil(2000, 3, 1)
    (20484, 11017)
    >>> days_from_civil(1970, 1, 1), days_from_civil(1969, 12, 31)
    (0, -1)
    """
    if not 1 <= month <= 12:
        raise ValueError(f"month must be 1..12, got {month}")
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146_097 + day_of_era - 719_468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """``(year, month, day)`` of the day ``days`` after 1970-01-01.

    >>> civil_from_days(20484), civil_from_days(11016)
    ((2026, 1, 31), (2000, 2, 29))
    """
    days += 719_468
    era = days // 146_097
    day_of_era = days - era * 146_097
    year_of_era = (day_of_era - day_of_era // 1_460 + day_of_era // 36_524
                   - day_of_era // 146_096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = shifted_month + (3 if shifted_month < 10 else -9)
    return year_of_era + era * 400 + (month <= 2), month, day


def day_start_ms(timestamp_ms: int) -> int:
    """The start of the UTC day holding ``timestamp_ms``.

    >>> day_start_ms(-1)
    -86400000
    """
    return timestamp_ms - timestamp_ms % DAY_MS


def date_text(timestamp_ms: int) -> str:
    """``YYYY-MM-DD`` of the UTC day holding ``timestamp_ms`` (more digits past year 9999).

    >>> date_text(1_769_817_600_000)
    '2026-01-31'
    """
    year, month, day = civil_from_days(timestamp_ms // DAY_MS)
    return f"{year:04d}-{month:02d}-{day:02d}"


def month_of(timestamp_ms: int) -> tuple[int, int]:
    """``(year, month)`` of the UTC month holding ``timestamp_ms``.

    >>> month_of(1_769_904_000_000 - 1), month_of(1_769_904_000_000)
    ((2026, 1), (2026, 2))
    """
    year, month, _day = civil_from_days(timestamp_ms // DAY_MS)
    return year, month


def month_start_ms(timestamp_ms: int) -> int:
    """The start of the UTC month holding ``timestamp_ms``.

    >>> month_start_ms(1_769_904_000_000 - 1)
    1767225600000
    """
    year, month = month_of(timestamp_ms)
    return days_from_civil(year, month, 1) * DAY_MS


def next_month_start_ms(timestamp_ms: int) -> int:
    """The start of the UTC month after the one holding ``timestamp_ms``.

    >>> next_month_start_ms(1_767_225_600_000)   # 2026-01 -> 2026-02-01
    1769904000000
    """
    year, month = month_of(timestamp_ms)
    return days_from_civil(year + (month == 12), month % 12 + 1, 1) * DAY_MS


def utc_text(timestamp_ms: int) -> str:
    """``YYYY-MM-DD HH:MM:SS.mmm`` in UTC (ClickHouse ``DateTime64(3)`` text).

    >>> utc_text(0), utc_text(-1)
    ('1970-01-01 00:00:00.000', '1969-12-31 23:59:59.999')
    """
    millis = timestamp_ms % DAY_MS
    seconds, ms = divmod(millis, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{date_text(timestamp_ms)} {hour:02d}:{minute:02d}:{second:02d}.{ms:03d}"
