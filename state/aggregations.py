"""Aggregations for the billable-metric catalog: one small class each, registered by name.

Values arrive as integers scaled by 10**18 (``operators.validation``), except for
``unique_count``, which counts distinct raw property values. Every aggregation
can merge two partial states, so session windows can merge. Adding a kind is one
class with ``@register``; its options (``OPTIONS``) are keyword arguments named as
in ``METRICS_FILE``::

    >>> agg = AGGREGATIONS["max"]()
    >>> state = agg.add(agg.add(agg.create(), 5, 1_000), 7, 2_000)
    >>> agg.result(state, window_end_ms=60_000)
    7

Recurring metrics (``recurring = true``) use three more methods of the kinds that
can recur (``RECURS``): ``carry`` turns a window's whole state into the state its
successor starts from, ``is_empty`` says whether a carried state still bills
anything, and ``merge`` folds the carried state into the successor's own events.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

AGGREGATIONS: dict[str, type["Aggregation"]] = {}
_MS_PER_HOUR = 3_600_000
_ONE = 10**18


def register(cls: type["Aggregation"]) -> type["Aggregation"]:
    if cls.name in AGGREGATIONS:
        raise ValueError(f"aggregation {cls.name!r} registered twice")
    AGGREGATIONS[cls.name] = cls
    return cls


class Aggregation(ABC):
    """Folds one window's events into a state; ``result`` is a 10**18-scaled integer."""

    name: str
    reads_text = False  # True: the field's raw text (unique_count), not a number
    RECURS = False  # True: ``recurring = true`` may carry this kind's state into the next window
    OPTIONS: dict[str, tuple[str, ...] | None] = {}  # option → allowed values (None: a property path)

    @abstractmethod
    def create(self) -> Any: ...

    @abstractmethod
    def add(self, state: Any, value: Any, timestamp_ms: int) -> Any:
        """Fold one event in; may mutate and must return the state."""

    @abstractmethod
    def merge(self, a: Any, b: Any) -> Any:
        """Combine two partial states of adjacent or overlapping sessions; mutates neither."""

    @abstractmethod
    def result(self, state: Any, window_end_ms: int, window_start_ms: int | None = None) -> int: ...

    @property
    def fingerprint(self) -> str:
        """The kind and the options that change what its state means (not output-only ones)."""
        return self.name

    def carry(self, state: Any, window_end_ms: int) -> Any:
        """The state the next window starts from (recurring metrics)."""
        raise NotImplementedError(f"{self.name} does not recur")

    def is_empty(self, state: Any) -> bool:
        """Whether a carried state bills nothing, so a window with no event needs no row."""
        raise NotImplementedError(f"{self.name} does not recur")


@register
class Count(Aggregation):
    name = "count"

    def create(self) -> int:
        return 0

    def add(self, state: int, value: Any, timestamp_ms: int) -> int:
        return state + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, state: int, window_end_ms: int, window_start_ms: int | None = None) -> int:
        return state * _ONE


@register
class Sum(Aggregation):
    """Sum of the values; recurring, the running sum of every event so far (Lago's recurring sum).

    >>> agg = Sum()
    >>> carried = agg.carry(agg.add(agg.create(), 5 * 10**18, 0), window_end_ms=60_000)
    >>> agg.result(agg.merge(carried, agg.add(agg.create(), 10**18, 61_000)), 120_000) // 10**18
    6
    """

    name = "sum"
    RECURS = True

    def create(self) -> int:
        return 0

    def add(self, state: int, value: int, timestamp_ms: int) -> int:
        return state + value

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, state: int, window_end_ms: int, window_start_ms: int | None = None) -> int:
        return state

    def carry(self, state: int, window_end_ms: int) -> int:
        return state

    def is_empty(self, state: int) -> bool:
        return state == 0


@register
class Min(Aggregation):
    name = "min"

    def create(self) -> int | None:
        return None

    def add(self, state: int | None, value: int, timestamp_ms: int) -> int:
        return value if state is None or value < state else state

    def merge(self, a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else min(a, b)

    def result(self, state: int | None, window_end_ms: int, window_start_ms: int | None = None) -> int:
        return 0 if state is None else state


@register
class Max(Min):
    name = "max"

    def add(self, state: int | None, value: int, timestamp_ms: int) -> int:
        return value if state is None or value > state else state

    def merge(self, a: int | None, b: int | None) -> int | None:
        return b if a is None else a if b is None else max(a, b)


_ADD, _REMOVE = 0, 1  # at equal timestamps the remove is the later operation


@register
class UniqueCount(Aggregation):
    """Distinct values of a property (its JSON text), e.g. active users.

    With ``operation_field`` (Lago's ``operation_type``) each value arrives as
    ``(text, "add" | "remove")``; the last operation per value wins (by timestamp,
    a remove after an add at the same instant) and the result counts the values
    whose last operation is an add::

        >>> seats = UniqueCount(operation_field="properties.operation_type")
        >>> state = seats.create()
        >>> for ts, op in [(1, "add"), (2, "remove"), (3, "add"), (3, "remove")]:
        ...     state = seats.add(state, ("ann", op), ts)
        >>> seats.add(state, ("bob", "add"), 2) and seats.result(state, 10) // 10**18
        1
    """

    name = "unique_count"
    reads_text = True
    RECURS = True
    OPTIONS = {"operation_field": None}

    def __init__(self, operation_field: str | None = None) -> None:
        self.operation_field = operation_field

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:ops" if self.operation_field else self.name

    def create(self) -> set | dict:
        return {} if self.operation_field else set()

    def add(self, state, value, timestamp_ms: int):
        if not self.operation_field:
            state.add(value)
            return state
        text, operation = value
        last = (timestamp_ms, _REMOVE if operation == "remove" else _ADD)
        if last > state.get(text, (-(2**63), _ADD)):
            state[text] = last
        return state

    def merge(self, a, b):
        if not self.operation_field:
            return a | b
        merged = dict(a)
        for text, last in b.items():
            if text not in merged or last > merged[text]:
                merged[text] = last
        return merged

    def result(self, state, window_end_ms: int, window_start_ms: int | None = None) -> int:
        return self._active(state) * _ONE

    def _active(self, state) -> int:
        if not self.operation_field:
            return len(state)
        return sum(1 for _ts, operation in state.values() if operation == _ADD)

    def carry(self, state, window_end_ms: int):
        if not self.operation_field:
            return set(state)
        return {text: last for text, last in state.items() if last[1] == _ADD}

    def is_empty(self, state) -> bool:
        return self._active(state) == 0


@register
class Latest(Aggregation):
    """Value of the latest event by timestamp; ties go to the larger value (replay-stable).

    ``negative = "zero"`` reports a negative latest value as 0 (Lago)::

        >>> Latest(negative="zero").result((5, -3 * 10**18), window_end_ms=10)
        0
    """

    name = "latest"
    OPTIONS = {"negative": ("keep", "zero")}

    def __init__(self, negative: str = "keep") -> None:
        self.negative = negative

    def create(self) -> tuple | None:
        return None

    def add(self, state: tuple | None, value: int, timestamp_ms: int) -> tuple:
        candidate = (timestamp_ms, value)
        return candidate if state is None or candidate > state else state

    def merge(self, a: tuple | None, b: tuple | None) -> tuple | None:
        return b if a is None else a if b is None else max(a, b)

    def result(self, state: tuple | None, window_end_ms: int, window_start_ms: int | None = None) -> int:
        value = 0 if state is None else state[1]
        return max(value, 0) if self.negative == "zero" else value


@register
class WeightedSum(Aggregation):
    """A level held over time: Σ level × time held, per hour, per second or per period.

    ``input = "level"`` (default): each event sets the level, held from the event
    until the next one or the window end; the level starts at the window's first
    event. ``input = "increment"`` (Lago): each event adds its value to the level,
    which starts at 0 (or at the carried level of a recurring metric); events at
    the same instant add up. ``unit`` divides Σ level × milliseconds by an hour
    (default: GB-hours), a second, or the window's own length (``period_average``,
    Lago's time-weighted average). Exact to 18 decimal places (half-even beyond).

    >>> agg = WeightedSum()
    >>> state = agg.add(agg.add(agg.create(), 2 * 10**18, 0), 4 * 10**18, 1_800_000)
    >>> agg.result(state, window_end_ms=3_600_000) == 3 * 10**18   # 2 GB × 0.5 h + 4 GB × 0.5 h
    True
    >>> lago = WeightedSum(input="increment", unit="period_average")
    >>> state = lago.add(lago.add(lago.create(), 2 * 10**18, 0), 4 * 10**18, 1_800_000)
    >>> lago.result(state, window_end_ms=3_600_000, window_start_ms=0) == 4 * 10**18  # 2 then 6
    True
    """

    name = "weighted_sum"
    RECURS = True
    OPTIONS = {"input": ("level", "increment"), "unit": ("hour", "second", "period_average")}
    _UNIT_MS = {"hour": _MS_PER_HOUR, "second": 1_000}

    def __init__(self, input: str = "level", unit: str = "hour") -> None:
        self.input = input
        self.unit = unit

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:increment" if self.input == "increment" else self.name

    def create(self) -> list:
        return []

    def add(self, state: list, value: int, timestamp_ms: int) -> list:
        state.append((timestamp_ms, value))
        return state

    def merge(self, a: list, b: list) -> list:
        return a + b

    def result(self, state: list, window_end_ms: int, window_start_ms: int | None = None) -> int:
        points = sorted(state)
        if window_start_ms is None:
            window_start_ms = points[0][0] if points else window_end_ms
        numerator = 0
        for level, held_from, held_to in self._levels(points, window_end_ms):
            numerator += level * (max(held_to, window_start_ms) - max(held_from, window_start_ms))
        divisor = self._UNIT_MS.get(self.unit) or max(window_end_ms - window_start_ms, 1)
        return _divide_half_even(numerator, divisor)

    def _levels(self, points: list, window_end_ms: int):
        """``(level, from, to)`` for each stretch between consecutive points."""
        level, increment = 0, self.input == "increment"
        ends = [at for at, _ in points[1:]] + [window_end_ms]
        for (at, value), next_at in zip(points, ends):
            level = level + value if increment else value
            yield level, at, next_at

    def _final_level(self, state: list) -> int:
        points = sorted(state)
        if self.input == "increment":
            return sum(value for _at, value in points)
        return points[-1][1] if points else 0

    def carry(self, state: list, window_end_ms: int) -> list:
        """The level at the window end, as one point just before the next window starts."""
        level = self._final_level(state)
        return [(window_end_ms - 1, level)] if level else []

    def is_empty(self, state: list) -> bool:
        return self._final_level(state) == 0


def _divide_half_even(numerator: int, divisor: int) -> int:
    """``numerator / divisor`` rounded to an integer, ties to even.

    >>> _divide_half_even(5, 2), _divide_half_even(7, 2), _divide_half_even(-5, 2)
    (2, 4, -2)
    """
    quotient, remainder = divmod(numerator, divisor)
    if remainder * 2 > divisor or (remainder * 2 == divisor and quotient % 2):
        quotient += 1
    return quotient


ROUNDING_FUNCTIONS = ("round", "ceil", "floor")


def round_scaled(value: int, function: str, precision: int) -> int:
    """Round a 10**18-scaled value to ``precision`` decimals (negative: tens, hundreds...).

    ``round`` takes ties away from zero, as Lago does (Ruby's ``BigDecimal#round``);
    ``ceil`` goes towards +∞ and ``floor`` towards −∞. Exact: integer arithmetic only.

    >>> S = 10**18
    >>> [round_scaled(123_456 * S // 1000, f, 2) // (S // 100) for f in ("round", "ceil", "floor")]
    [12346, 12346, 12345]
    >>> round_scaled(-25 * S // 10, "round", 0) // S, round_scaled(25 * S // 10, "round", 0) // S
    (-3, 3)
    """
    if function not in ROUNDING_FUNCTIONS:
        raise ValueError(f"rounding function must be one of {ROUNDING_FUNCTIONS}, got {function!r}")
    if not -18 <= precision <= 18:
        raise ValueError(f"rounding precision must be between -18 and 18, got {precision}")
    step = 10 ** (18 - precision)
    quotient, remainder = divmod(value, step)  # floor division: remainder >= 0
    if function == "ceil" and remainder:
        quotient += 1
    elif function == "round" and (remainder * 2 > step or (remainder * 2 == step and value > 0)):
        quotient += 1
    return quotient * step
