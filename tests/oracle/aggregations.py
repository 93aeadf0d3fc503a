"""The catalog's aggregations (their defaults), folded the plain way: an oracle importing no
product code. Values are exact: numbers are scaled integers (10**-18 units), as the flow's;
``unique_count`` values are texts.

    >>> S = 10**18
    >>> fold("weighted_sum", [(0, 10 * S), (1_800_000, 20 * S), (2_700_000, 5 * S)], 3_600_000) == 1125 * S // 100
    True
    >>> fold("latest", [(9, 2 * S), (9, 4 * S), (5, 7 * S)], 10) == 4 * S   # ties: the larger value
    True
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, localcontext

ONE = 10**18
HOUR_MS = 3_600_000


def fold(name: str, events: list[tuple[int, object]], window_end_ms: int) -> int:
    """The result of aggregation ``name`` over ``events`` ((timestamp_ms, value)) of one window
    that ends at ``window_end_ms`` (a level is held until then)."""
    values = [value for _ts, value in events]
    if name == "count":
        return len(events) * ONE
    if name == "sum":
        return sum(values)
    if name == "min":
        return min(values)
    if name == "max":
        return max(values)
    if name == "unique_count":
        return len(set(values)) * ONE
    if name == "latest":
        return max(events)[1]  # latest timestamp; at a tie the larger value
    if name == "weighted_sum":
        return _level_hours(sorted(events), window_end_ms)
    raise ValueError(f"the oracle knows no aggregation {name!r}")


def _level_hours(points: list[tuple[int, int]], window_end_ms: int) -> int:
    """Σ level × time held (from each event to the next, the last to the window end), in hours."""
    held = sum(level * (until - since)
               for (since, level), (until, _next) in zip(points, points[1:] + [(window_end_ms, 0)]))
    with localcontext() as exact:
        exact.prec = 100
        return int((Decimal(held) / HOUR_MS).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
