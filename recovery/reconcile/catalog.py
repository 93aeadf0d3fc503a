"""The billable-metric catalog (``METRICS_FILE``) as reconcile reads and folds it.

Reconcile recomputes the plain aggregations of the README — ``count``, ``sum``,
``min``, ``max``, ``latest``, ``unique_count`` and ``weighted_sum`` (level × hours) —
over tumbling, sliding and session windows. A metric using anything else (another
window kind or an option reconcile does not know) is listed as skipped, never guessed::

    >>> metrics, skipped = parse_catalog('[[metric]]\\nname = "peak"\\ncode = "api"\\n'
    ...                                  'aggregation = "max"\\nfield = "properties.ms"\\n')
    >>> metrics[0].value_of(Decimal(0), {"ms": 12}) == 12 * 10**18
    True
    >>> metrics[0].fold([(1_000, 5), (2_000, 12)], window_end_ms=60_000)
    12
    >>> parse_catalog('[[metric]]\\nname = "x"\\ncode = "c"\\naggregation = "sum"\\nrecurring = true\\n')[1]
    ('x',)
"""

from __future__ import annotations

import decimal
import json
import tomllib
from dataclasses import dataclass
from decimal import Decimal

from recovery.reconcile.decoding import SCALE, parse_value
from recovery.reconcile.windows import HOUR_MS, Windows, duration_ms

_ONE = 10**SCALE
_PLAIN_KEYS = {"name", "code", "aggregation", "field", "group_by", "window"}
_FOLDS = ("count", "sum", "min", "max", "latest", "unique_count", "weighted_sum")
_WIDE = decimal.Context(prec=200)


@dataclass(frozen=True)
class MetricSpec:
    """One catalog metric reconcile can recompute."""

    name: str
    code: str
    aggregation: str
    field: tuple[str, ...]  # () = the event's value, else a path inside properties
    group_by: tuple[tuple[str, ...], ...]
    windows: Windows

    def group_key(self, properties: dict) -> str:
        """The ``group_key`` column: the group values as a compact, sorted JSON object."""
        names = [".".join(path) for path in self.group_by]
        values = [_text(_lookup(properties, path)) for path in self.group_by]
        return json.dumps(dict(zip(names, values)), sort_keys=True, separators=(",", ":"))

    def value_of(self, value: Decimal, properties: dict):
        """What the metric folds for one event (None: its field is missing or unusable).

        Numbers come back as integers scaled by 10**18; ``unique_count`` folds a
        property's text (or the scaled value).
        """
        if self.aggregation == "count":
            return 0
        raw = value if not self.field else _lookup(properties, self.field)
        if self.aggregation == "unique_count":
            if raw is None:
                return None
            return _scaled(raw) if not self.field else _text(raw)
        return _scaled(raw)

    def fold(self, events: list[tuple[int, object]], window_end_ms: int) -> int:
        """The scaled result for a window's ``(event time, folded value)`` pairs."""
        values = [value for _ts, value in events]
        if self.aggregation == "count":
            return len(events) * _ONE
        if self.aggregation == "sum":
            return sum(values)
        if self.aggregation == "min":
            return min(values)
        if self.aggregation == "max":
            return max(values)
        if self.aggregation == "latest":
            return max(events)[1]
        if self.aggregation == "unique_count":
            return len(set(values)) * _ONE
        return _level_hours(sorted(events), window_end_ms)


def _level_hours(levels: list[tuple[int, int]], window_end_ms: int) -> int:
    """Σ level × hours held (each until the next event or the window end), half-even to 10**-18."""
    ends = [at for at, _ in levels[1:]] + [window_end_ms]
    level_ms = sum(level * (end - at) for (at, level), end in zip(levels, ends))
    exact = Decimal(level_ms).scaleb(0, _WIDE) / Decimal(HOUR_MS)
    return int(exact.quantize(Decimal(1), rounding=decimal.ROUND_HALF_EVEN, context=_WIDE))


def _lookup(properties: dict, path: tuple[str, ...]):
    node = properties
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _text(value) -> str:
    """A property as text (group keys, ``unique_count``): strings as they are, a number in
    one canonical form however it was written (``1.50``, ``15e-1`` → ``1.5``), objects and
    arrays as compact JSON with sorted keys and their numbers as written.

    >>> _text(Decimal("1.50")), _text(Decimal("1E+2")), _text(7), _text({"b": [True, None], "a": Decimal("0.10")})
    ('1.5', '100', '7', '{"a":0.10,"b":[true,null]}')
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):
        return _canonical_number(value)
    return _compact_json(value)


def _canonical_number(number: Decimal) -> str:
    if not -64 <= number.adjusted() <= 64:
        return str(number)  # tiny or huge: scientific, so the text stays short
    text = format(number, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _compact_json(value) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{_compact_json(k)}:{_compact_json(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_compact_json(item) for item in value) + "]"
    if isinstance(value, Decimal):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _scaled(raw) -> int | None:
    """A number, or a numeric text under the value field's rules, scaled by 10**18."""
    if raw is None:
        return None
    number = parse_value(raw)
    return None if number is None else int(number.scaleb(SCALE, _WIDE))


def read_catalog(path: str) -> tuple[tuple[MetricSpec, ...], tuple[str, ...]]:
    """``METRICS_FILE``: (the metrics reconcile recomputes, the names of those it skips)."""
    with open(path, encoding="utf-8") as handle:
        return parse_catalog(handle.read())


def parse_catalog(text: str) -> tuple[tuple[MetricSpec, ...], tuple[str, ...]]:
    """Like :func:`read_catalog`, from the file's text; ValueError names a broken entry."""
    entries = tomllib.loads(text).get("metric", [])
    metrics, skipped = [], []
    for entry in entries:
        spec = _spec(entry)
        if spec is None:
            skipped.append(str(entry.get("name")))
        else:
            metrics.append(spec)
    return tuple(metrics), tuple(skipped)


def _spec(entry: dict) -> MetricSpec | None:
    name = entry.get("name")
    window = entry.get("window", {"kind": "tumbling", "size": "1m"})
    if (set(entry) - _PLAIN_KEYS or entry.get("aggregation") not in _FOLDS
            or not isinstance(window, dict) or set(window) - {"kind", "size", "slide", "gap"}
            or window.get("kind", "tumbling") not in ("tumbling", "sliding", "session")):
        return None
    field = entry.get("field", "value")
    if field != "value" and not str(field).startswith("properties."):
        raise ValueError(f"METRICS_FILE metric {name!r}: field {field!r} is not value or properties.<path>")
    durations = {key: duration_ms(window[key]) for key in ("size", "slide", "gap") if key in window}
    windows = Windows(window.get("kind", "tumbling"), durations.get("size", 0),
                      durations.get("slide"), durations.get("gap"))
    return MetricSpec(
        str(name), str(entry["code"]), entry["aggregation"],
        () if field == "value" else tuple(field.split(".")[1:]),
        tuple(tuple(g.removeprefix("properties.").split(".")) for g in entry.get("group_by", [])),
        windows)
