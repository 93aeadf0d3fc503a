"""The billable-metric catalog: what is billed, defined in one TOML file (``METRICS_FILE``).

.. code-block:: toml

    [[metric]]
    name = "storage_gb_hours"       # unique; the ``metric`` column of metric_aggregates
    code = "storage_gb"             # which events feed it
    aggregation = "weighted_sum"    # count, sum, min, max, unique_count, latest, weighted_sum
    field = "value"                 # or "properties.<path>"; not used by count
    group_by = ["region"]           # optional property paths
    window = { kind = "tumbling", size = "1h" }   # or sliding (size, slide), session (gap)

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

from dataflows.settings import SettingsError, parse_duration_ms
from operators.aggregations import AGGREGATIONS, Aggregation
from operators.validation import Invalid, scale_decimal, strict_decimal
from operators.windows import WindowKind, window_kind

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,127}$")
_KEYS = {"name", "code", "aggregation", "field", "group_by", "window"}


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

    @property
    def fingerprint(self) -> str:
        """Everything that decides what the metric's state holds; a resume with another fails.

        >>> load_catalog_text('[[metric]]\\nname="gb"\\ncode="s"\\naggregation="max"\\n'
        ...                   'group_by=["region"]\\n').metrics[0].fingerprint
        'code=s aggregation=max field=value group_by=region window=tumbling:60000'
        """
        field = "properties." + ".".join(self.field) if self.field else "value"
        group_by = ",".join(".".join(path) for path in self.group_by)
        return (f"code={self.code} aggregation={self.aggregation.name} field={field} "
                f"group_by={group_by} window={self.windows.fingerprint}")

    def extract(self, value_scaled: int, properties: dict) -> tuple[tuple, object] | None:
        """(group values, the value this metric folds) for one event; None if its field is unusable."""
        group = tuple(_text(_lookup(properties, path)) for path in self.group_by)
        if self.aggregation.name == "count":
            return group, None
        if not self.field:
            if self.aggregation.reads_text:
                return group, str(value_scaled)
            return group, value_scaled
        raw = _lookup(properties, self.field)
        if raw is None:
            return None
        if self.aggregation.reads_text:
            return group, _text(raw)
        return (group, scaled) if (scaled := _scaled(raw)) is not None else None


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
    extra = set(entry) - _KEYS
    if extra:
        fail(f"unknown key(s) {sorted(extra)}; allowed: {sorted(_KEYS)}")
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
    except (SettingsError, ValueError, TypeError) as err:
        fail(f"window: {err}")
    path = () if field == "value" else tuple(field.split(".")[1:])
    return MetricDefinition(name, code, AGGREGATIONS[aggregation_name](), path,
                            tuple(tuple(g.removeprefix("properties.").split(".")) for g in group_by),
                            windows)


def _windows(spec) -> WindowKind:
    if not isinstance(spec, dict):
        raise ValueError("must be a table like { kind = \"tumbling\", size = \"1h\" }")
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
