"""Aggregations for the billable-metric catalog: one small class each, registered by name.

Values arrive as integers scaled by 10**18 (``operators.validation``), except for
``unique_count``, which counts distinct raw property values. Every aggregation
can merge two partial states, so session windows can merge. Adding a kind is one
class with ``@register``::

    >>> agg = AGGREGATIONS["max"]()
    >>> state = agg.add(agg.add(agg.create(), 5, 1_000), 7, 2_000)
    >>> agg.result(state, window_end_ms=60_000)
    7
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

AGGREGATIONS: dict[str, type["Aggregation"]] = {}
_MS_PER_HOUR = 3_600_000


def register(cls: type["Aggregation"]) -> type["Aggregation"]:
    if cls.name in AGGREGATIONS:
        raise ValueError(f"aggregation {cls.name!r} registered twice")
    AGGREGATIONS[cls.name] = cls
    return cls


class Aggregation(ABC):
    """Folds one window's events into a state; ``result`` is a 10**18-scaled integer."""

    name: str
    reads_text = False  # True: the field's raw text (unique_count), not a number

    @abstractmethod
    def create(self) -> Any: ...

    @abstractmethod
    def add(self, state: Any, value: Any, timestamp_ms: int) -> Any:
        """Fold one event in; may mutate and must return the state."""

    @abstractmethod
    def merge(self, a: Any, b: Any) -> Any:
        """Combine two partial states of adjacent or overlapping sessions."""

    @abstractmethod
    def result(self, state: Any, window_end_ms: int) -> int: ...


@register
class Count(Aggregation):
    name = "count"

    def create(self) -> int:
        return 0

    def add(self, state: int, value: Any, timestamp_ms: int) -> int:
        return state + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, state: int, window_end_ms: int) -> int:
        return state * 10**18


@register
class Sum(Aggregation):
    name = "sum"

    def create(self) -> int:
        return 0

    def add(self, state: int, value: int, timestamp_ms: int) -> int:
        return state + value

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, state: int, window_end_ms: int) -> int:
        return state


@register
class Min(Aggregation):
    name = "min"

    def create(self) -> int | None:
        return None

    def add(self, state: int | None, value: int, timestamp_ms: int) -> int:
        return value if state is None or value < state else state

    def merge(self, a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else min(a, b)

    def result(self, state: int | None, window_end_ms: int) -> int:
        return 0 if state is None else state


@register
class Max(Min):
    name = "max"

    def add(self, state: int | None, value: int, timestamp_ms: int) -> int:
        return value if state is None or value > state else state

    def merge(self, a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else max(a, b)


@register
class UniqueCount(Aggregation):
    """Distinct values of a property (its JSON text), e.g. active users."""

    name = "unique_count"
    reads_text = True

    def create(self) -> set:
        return set()

    def add(self, state: set, value: str, timestamp_ms: int) -> set:
        state.add(value)
        return state

    def merge(self, a: set, b: set) -> set:
        return a | b

    def result(self, state: set, window_end_ms: int) -> int:
        return len(state) * 10**18


@register
class Latest(Aggregation):
    """Value of the latest event by timestamp; ties go to the larger value (replay-stable)."""

    name = "latest"

    def create(self) -> tuple | None:
        return None

    def add(self, state: tuple | None, value: int, timestamp_ms: int) -> tuple:
        candidate = (timestamp_ms, value)
        return candidate if state is None or candidate > state else state

    def merge(self, a: tuple | None, b: tuple | None) -> tuple | None:
        return b if a is None else a if b is None else max(a, b)

    def result(self, state: tuple | None, window_end_ms: int) -> int:
        return 0 if state is None else state[1]


@register
class WeightedSum(Aggregation):
    """Value × hours held: each event sets a level held until the next event or the window end.

    E.g. storage GB-hours from "storage is now N GB" events. The level starts at the
    window's first event. Exact to 18 decimal places (rounded half-even beyond).

    >>> agg = WeightedSum()
    >>> state = agg.add(agg.add(agg.create(), 2 * 10**18, 0), 4 * 10**18, 1_800_000)
    >>> agg.result(state, window_end_ms=3_600_000) == 3 * 10**18   # 2 GB × 0.5 h + 4 GB × 0.5 h
    True
    """

    name = "weighted_sum"

    def create(self) -> list:
        return []

    def add(self, state: list, value: int, timestamp_ms: int) -> list:
        state.append((timestamp_ms, value))
        return state

    def merge(self, a: list, b: list) -> list:
        return a + b

    def result(self, state: list, window_end_ms: int) -> int:
        levels = sorted(state)
        numerator = 0
        for (at, level), (next_at, _) in zip(levels, levels[1:] + [(window_end_ms, 0)]):
            numerator += level * (next_at - at)
        quotient, remainder = divmod(numerator, _MS_PER_HOUR)
        if remainder * 2 > _MS_PER_HOUR or (remainder * 2 == _MS_PER_HOUR and quotient % 2):
            quotient += 1
        return quotient
