"""The billable-metric catalog: what is billed, defined in one TOML file (``METRICS_FILE``).

.. code-block:: toml

    [[metric]]
    name = "storage_gb_hours"       # unique; the ``metric`` column of metric_aggregates
    code = "storage_gb"             # which events feed it
    aggregation = "weighted_sum"    # count, sum, min, max, unique_count, latest, weighted_sum
    field = "value"                 # or "properties.<path>"; not used by count
    group_by = ["region"]           # optional property paths
    window = { kind = "tumbling", size = "1h" }   # or sliding (size, slide), session (gap),
                                                  # calendar (unit = "day" | "month", UTC)
    recurring = false               # sum, unique_count, weighted_sum: state carries into the next window
    rounding = { function = "round", precision = 2 }   # optional: round | ceil | floor
    # options of one aggregation (see state.aggregations):
    # weighted_sum: input = "level" | "increment", unit = "hour" | "second" | "period_average"
    # unique_count: operation_field = "properties.operation_type"; latest: negative = "keep" | "zero"

A bad file fails at start-up with the line and the problem::

    >>> try:
    ...     load_catalog_text('[[metric]]\\nname = "x"\\ncode = "c"\\naggregation = "avg"\\n')
    ... except CatalogError as err:
    ...     print(err)
    METRICS_FILE line 1 (metric 'x'): unknown aggregation 'avg'; known: count, latest, max, min, sum, unique_count, weighted_sum
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from decimal import Decimal

import msgspec

from operators.validation import Invalid, scale_decimal, strict_decimal
from state.aggregations import AGGREGATIONS, ROUNDING_FUNCTIONS, Aggregation, round_scaled
from state.durations import parse_duration_ms
from state.window_kinds import CalendarWindows, TumblingWindows, WindowKind, window_kind

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
_KEYS = {"name", "code", "aggregation", "field", "group_by", "window", "recurring", "rounding"}
_OPTION_KEYS = {key for cls in AGGREGATIONS.values() for key in cls.OPTIONS}


class CatalogError(ValueError):
    """The metric catalog cannot be used; the message names the line and the problem."""


@dataclass(frozen=True)
class MetricDefinition:
    name: str
    code: str
    aggregation: Aggregation
    field: tuple[str, ...]  # () = the event's value; else a path inside properties
    group_by: tuple[tuple[str, ...], ...]
    windows: WindowKind
    recurring: bool = False
    rounding: tuple[str, int] | None = None  # (function, precision)
    operation: tuple[str, ...] = ()  # unique_count: path of the add/remove property

    def rounded(self, value_scaled: int) -> int:
        """The reported value: the aggregation's result after the metric's rounding."""
        return value_scaled if self.rounding is None else round_scaled(value_scaled, *self.rounding)

    @property
    def fingerprint(self) -> str:
        """Everything that decides what the metric's state holds; a resume with another fails.

        >>> load_catalog_text('[[metric]]\\nname="gb"\\ncode="s"\\naggregation="max"\\n'
        ...                   'group_by=["region"]\\n').metrics[0].fingerprint
        'code=s aggregation=max field=value group_by=region window=tumbling:60000'
        """
        field = "properties." + ".".join(self.field) if self.field else "value"
        group_by = ",".join(".".join(path) for path in self.group_by)
        recurring = " recurring" if self.recurring else ""
        return (f"code={self.code} aggregation={self.aggregation.fingerprint} field={field} "
                f"group_by={group_by} window={self.windows.fingerprint}{recurring}")

    def extract(self, value_scaled: int, properties: dict) -> tuple[tuple, object] | None:
        """(group values, the value this metric folds) for one event; None if its field is unusable."""
        group = tuple(_text(_lookup(properties, path)) for path in self.group_by)
        if self.aggregation.name == "count":
            return group, None
        if not self.field:
            if self.aggregation.reads_text:
                return self._with_operation(group, str(value_scaled), properties)
            return group, value_scaled
        raw = _lookup(properties, self.field)
        if raw is None:
            return None
        if self.aggregation.reads_text:
            return self._with_operation(group, _text(raw), properties)
        return (group, scaled) if (scaled := _scaled(raw)) is not None else None

    def _with_operation(self, group: tuple, text: str, properties: dict) -> tuple[tuple, object] | None:
        """unique_count with ``operation_field``: ``(text, "add" | "remove")``, a missing one adds.

        >>> seats = load_catalog_text('[[metric]]\\nname="s"\\ncode="c"\\naggregation="unique_count"\\n'
        ...     'field="properties.user"\\noperation_field="properties.op"\\n').metrics[0]
        >>> [seats.extract(0, {"user": "ann", **op}) for op in ({}, {"op": "remove"}, {"op": "swap"})]
        [((), ('ann', 'add')), ((), ('ann', 'remove')), None]
        """
        if not self.operation:
            return group, text
        operation = _lookup(properties, self.operation)
        if operation not in (None, "add", "remove"):
            return None
        return group, (text, operation or "add")


@dataclass(frozen=True)
class Catalog:
    metrics: tuple[MetricDefinition, ...] = ()

    def for_code(self, code: str) -> list[tuple[int, MetricDefinition]]:
        return [(i, m) for i, m in enumerate(self.metrics) if m.code == code]

    @property
    def codes(self) -> frozenset[str]:
        return frozenset(m.code for m in self.metrics)


def load_catalog(path: str | None) -> Catalog:
    if not path:
        return Catalog()
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise CatalogError(f"METRICS_FILE {path!r}: {err.strerror}") from None
    return load_catalog_text(text)


def load_catalog_text(text: str) -> Catalog:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise CatalogError(f"METRICS_FILE: {err}") from None
    lines = [n for n, line in enumerate(text.splitlines(), 1) if line.strip().startswith("[[metric]]")]
    entries = document.get("metric", [])
    unknown_top = set(document) - {"metric"}
    if unknown_top:
        raise CatalogError(f"METRICS_FILE: unknown section(s) {sorted(unknown_top)}; use [[metric]]")
    metrics, names = [], set()
    for index, entry in enumerate(entries):
        line = lines[index] if index < len(lines) else 0
        metric = _metric(entry, line)
        if metric.name in names:
            raise CatalogError(f"METRICS_FILE line {line}: metric name {metric.name!r} is used twice")
        names.add(metric.name)
        metrics.append(metric)
    return Catalog(tuple(metrics))


def _metric(entry: dict, line: int) -> MetricDefinition:
    name = entry.get("name")
    where = f"METRICS_FILE line {line} (metric {name!r})"

    def fail(problem: str):
        raise CatalogError(f"{where}: {problem}")

    if not isinstance(name, str) or not _NAME.match(name):
        fail("needs a name of letters, digits, _ . - (at most 128)")
    extra = set(entry) - _KEYS - _OPTION_KEYS
    if extra:
        fail(f"unknown key(s) {sorted(extra)}; allowed: {sorted(_KEYS | _OPTION_KEYS)}")
    code = entry.get("code")
    if not isinstance(code, str) or not code:
        fail("needs the event code it meters (code = \"…\")")
    aggregation_name = entry.get("aggregation")
    if aggregation_name not in AGGREGATIONS:
        fail(f"unknown aggregation {aggregation_name!r}; known: {', '.join(sorted(AGGREGATIONS))}")
    field = entry.get("field", "value")
    if not isinstance(field, str) or not (field == "value" or field.startswith("properties.")):
        fail(f"field must be \"value\" or \"properties.<path>\", got {field!r}")
    group_by = entry.get("group_by", [])
    if not isinstance(group_by, list) or not all(isinstance(g, str) and g for g in group_by):
        fail("group_by must be a list of property paths")
    try:
        windows = _windows(entry.get("window", {"kind": "tumbling", "size": "1m"}))
    except (ValueError, TypeError) as err:
        fail(f"window: {err}")
    path = () if field == "value" else tuple(field.split(".")[1:])
    try:
        aggregation = AGGREGATIONS[aggregation_name](**_options(entry, aggregation_name))
        recurring = _recurring(entry.get("recurring", False), aggregation, windows)
        rounding = _rounding(entry["rounding"]) if "rounding" in entry else None
    except (ValueError, TypeError) as err:
        fail(str(err))
    operation = getattr(aggregation, "operation_field", None)
    return MetricDefinition(name, code, aggregation, path,
                            tuple(tuple(g.removeprefix("properties.").split(".")) for g in group_by),
                            windows, recurring, rounding,
                            tuple(operation.split(".")[1:]) if operation else ())


def _options(entry: dict, aggregation_name: str) -> dict[str, str]:
    """The aggregation's own options (``input``, ``unit``, ``negative``, ...), checked."""
    allowed = AGGREGATIONS[aggregation_name].OPTIONS
    options = {}
    for key in sorted(_OPTION_KEYS & set(entry)):
        owners = sorted(n for n, cls in AGGREGATIONS.items() if key in cls.OPTIONS)
        if key not in allowed:
            raise ValueError(f"{key} applies to {', '.join(owners)} only, not to {aggregation_name}")
        value, values = entry[key], allowed[key]
        if values is None:
            if not isinstance(value, str) or not value.startswith("properties.") or value == "properties.":
                raise ValueError(f"{key} must be \"properties.<path>\", got {value!r}")
        elif value not in values:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, values))}, got {value!r}")
        options[key] = value
    return options


def _recurring(value, aggregation: Aggregation, windows: WindowKind) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"recurring must be true or false, got {value!r}")
    if value and not aggregation.RECURS:
        kinds = ", ".join(sorted(n for n, cls in AGGREGATIONS.items() if cls.RECURS))
        raise ValueError(f"recurring applies to {kinds} only, not to {aggregation.name}")
    if value and not isinstance(windows, (TumblingWindows, CalendarWindows)):
        raise ValueError(f"recurring needs tumbling or calendar windows, not {windows.name} ones")
    return value


def _rounding(spec) -> tuple[str, int]:
    """``{ function = "round" | "ceil" | "floor", precision = N }`` (precision 0 if left out)."""
    if not isinstance(spec, dict) or set(spec) - {"function", "precision"}:
        raise ValueError("rounding must be a table like { function = \"round\", precision = 2 }")
    function, precision = spec.get("function"), spec.get("precision", 0)
    if function not in ROUNDING_FUNCTIONS:
        raise ValueError(f"rounding function must be one of {', '.join(ROUNDING_FUNCTIONS)}, "
                         f"got {function!r}")
    if isinstance(precision, bool) or not isinstance(precision, int) or not -18 <= precision <= 18:
        raise ValueError(f"rounding precision must be an integer from -18 to 18, got {precision!r}")
    return function, precision


def _windows(spec) -> WindowKind:
    if not isinstance(spec, dict):
        raise ValueError("must be a table like { kind = \"tumbling\", size = \"1h\" }")
    if spec.get("kind") == "calendar":
        if set(spec) - {"kind", "unit"}:
            raise ValueError("calendar windows take only a unit: { kind = \"calendar\", unit = \"month\" }")
        return CalendarWindows(spec.get("unit"))
    duration = lambda key: parse_duration_ms(spec[key]) if key in spec else None  # noqa: E731
    return window_kind(spec.get("kind", "tumbling"), size_ms=duration("size") or 0,
                       slide_ms=duration("slide"), gap_ms=duration("gap"))


def _lookup(properties: dict, path: tuple[str, ...]):
    node = properties
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


_encode_group_json = msgspec.json.Encoder(order="sorted", decimal_format="number").encode


def _text(value) -> str:
    """A property's text for group keys and ``unique_count``: strings as they are, numbers exact.

    A number reads the same however it was written (``1.50``, ``1.5`` and ``15e-1`` are one
    group); objects and arrays are compact JSON with sorted keys and their numbers as written.
    Never raises: a message nests at most ``MAX_DEPTH`` levels (validation).

    >>> _text(Decimal("12345678.123456789")), _text(Decimal("1.50")), _text(Decimal("1E+2")), _text(7)
    ('12345678.123456789', '1.5', '100', '7')
    >>> _text({"b": [True, None], "a": Decimal("0.10")})
    '{"a":0.10,"b":[true,null]}'
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, float):
        return _decimal_text(Decimal(repr(value)))
    return _encode_group_json(value).decode()


def _decimal_text(number: Decimal) -> str:
    if not number.is_finite() or not -64 <= number.adjusted() <= 64:
        return str(number)  # tiny or huge: scientific, so the text stays short
    text = format(number, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _scaled(raw) -> int | None:
    """The 10**18-scaled value of a property, exact, or None when it is not a usable number.

    Numbers arrive as ``int`` or exact ``Decimal`` (never float); strings must be in strict
    decimal syntax, like ``value``:

    >>> _scaled(Decimal("12345678.123456789")), _scaled("2.5"), _scaled("1_000"), _scaled(True)
    (12345678123456789000000000, 2500000000000000000, None, None)
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        number = Decimal(raw)
    elif isinstance(raw, Decimal):
        number = raw
    elif isinstance(raw, str):
        number = strict_decimal(raw)
    elif isinstance(raw, float):
        number = Decimal(repr(raw))
    else:
        return None
    if number is None:
        return None
    scaled = scale_decimal(number)
    return None if isinstance(scaled, Invalid) else scaled
