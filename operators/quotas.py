"""Quota rules (``QUOTAS_FILE``, TOML) and the crossing test the live totals run on every change.

A rules file holds any number of ``[[quota]]`` tables::

    [[quota]]
    code = "api_calls"      # the event code the rule watches
    period = "day"          # "day" or "month" (UTC, by event time)
    measure = "count"       # "count" (events) or "value" (sum of values)
    threshold = 10000       # alert when the running total first exceeds this (strictly)

``threshold`` is an integer for ``count``; for ``value`` an integer, a decimal (read exactly,
never through a float) or a decimal string, with at most 18 decimal places. A file that cannot
be used stops the flow at start with the line and the problem::

    >>> parse_quotas('[[quota]]\\ncode = "api_calls"\\nperiod = "week"\\nmeasure = "count"\\n'
    ...              'threshold = 10\\n', "q.toml")
    Traceback (most recent call last):
    ...
    operators.quotas.QuotaFileError: q.toml line 3: period must be "day" or "month", got 'week'

    >>> rules = parse_quotas('[[quota]]\\ncode = "x"\\nperiod = "day"\\nmeasure = "value"\\n'
    ...                      'threshold = 2.5\\n')
    >>> [rule.describe() for rule in rules.for_code("x", "day")]
    ['x day value > 2.5']
    >>> [rule.describe() for rule in rules.exceeded("x", "day", count=9, total_scaled=3 * 10**18)]
    ['x day value > 2.5']
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from operators.validation import MAX_ADJUSTED, VALUE_SCALE, Invalid, scale_decimal

PERIODS = ("day", "month")
MEASURES = ("count", "value")
_FIELDS = ("code", "period", "measure", "threshold")
_HEADER = re.compile(r"^\s*\[\[\s*quota\s*\]\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)")


class QuotaFileError(ValueError):
    """``QUOTAS_FILE`` cannot be used; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class QuotaRule:
    """One threshold on one running total; ``threshold_scaled`` is in the measure's own units.

    For ``count`` it is the number of events; for ``value`` the sum scaled by 10**18, like the
    flow's exact sums.
    """

    code: str
    period: str
    measure: str
    threshold_scaled: int
    line: int = 0

    @property
    def threshold_text(self) -> str:
        """The threshold as written in alerts and fences: shortest exact decimal."""
        if self.measure == "count":
            return str(self.threshold_scaled)
        return plain_decimal(self.threshold_scaled)

    def observed(self, count: int, total_scaled: int) -> int:
        return count if self.measure == "count" else total_scaled

    def describe(self) -> str:
        return f"{self.code} {self.period} {self.measure} > {self.threshold_text}"


def plain_decimal(scaled: int) -> str:
    """A 10**18-scaled integer as its shortest exact decimal text.

    >>> plain_decimal(25 * 10**17), plain_decimal(-10**18), plain_decimal(1)
    ('2.5', '-1', '0.000000000000000001')
    """
    sign = "-" if scaled < 0 else ""
    whole, fraction = divmod(abs(scaled), 10**VALUE_SCALE)
    if not fraction:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{fraction:0{VALUE_SCALE}d}".rstrip("0")


@dataclass(frozen=True)
class QuotaRules:
    """All rules, indexed by (code, period) for the per-change lookup."""

    rules: tuple[QuotaRule, ...] = ()
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    by_code: dict = field(default_factory=dict, compare=False, repr=False)
    """``{code: {period: [rules]}}``, for a cheap "is this code watched at all?"."""

    def __post_init__(self) -> None:
        for rule in self.rules:
            self._index.setdefault((rule.code, rule.period), []).append(rule)
            self.by_code.setdefault(rule.code, {})[rule.period] = self._index[(rule.code, rule.period)]

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):
        return iter(self.rules)

    def for_code(self, code: str, period: str) -> list[QuotaRule]:
        return self._index.get((code, period), [])

    def exceeded(self, code: str, period: str, *, count: int, total_scaled: int) -> list[QuotaRule]:
        """The rules of (code, period) whose threshold the running total exceeds."""
        return [rule for rule in self._index.get((code, period), ())
                if rule.observed(count, total_scaled) > rule.threshold_scaled]


def load_quotas(path: str) -> QuotaRules:
    """Read and check the rules file at ``path``."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as err:
        raise QuotaFileError(f"{path}: cannot read the quotas file: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise QuotaFileError(f"{path} line {line}: not UTF-8") from None
    return parse_quotas(text, path)


def parse_quotas(text: str, source: str = "QUOTAS_FILE") -> QuotaRules:
    """Parse and check rules from TOML ``text``; ``source`` names it in errors."""
    try:
        document = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as err:
        where = _TOML_POSITION.search(str(err))
        problem = _TOML_POSITION.sub("", str(err)).strip()
        line = f" line {where.group(1)}, column {where.group(2)}" if where else ""
        raise QuotaFileError(f"{source}{line}: not valid TOML: {problem}") from None
    lines = text.splitlines()
    headers = [i + 1 for i, line in enumerate(lines) if _HEADER.match(line)]
    for key in document:
        if key != "quota":
            raise QuotaFileError(f"{source} line {_top_level_line(lines, key)}: unknown table or "
                                 f"key {key!r}; rules are [[quota]] tables")
    tables = document.get("quota", [])
    if not isinstance(tables, list):
        raise QuotaFileError(f"{source} line {_top_level_line(lines, 'quota')}: "
                             "quota must be an array of tables: write [[quota]]")
    rules, seen = [], {}
    for i, table in enumerate(tables):
        start = headers[i] if i < len(headers) else 1
        end = headers[i + 1] if i + 1 < len(headers) else len(lines) + 1
        rule = _rule(table, source, start, lines[start - 1:end - 1])
        identity = (rule.code, rule.period, rule.measure, rule.threshold_scaled)
        if identity in seen:
            raise QuotaFileError(f"{source} line {start}: the same rule as line {seen[identity]} "
                                 f"({rule.describe()})")
        seen[identity] = start
        rules.append(rule)
    return QuotaRules(tuple(rules))


def _top_level_line(lines: list[str], key: str) -> int:
    """The line where top-level ``key`` is defined (as a key or a table header), else 1."""
    pattern = re.compile(rf"^\s*(\[+\s*{re.escape(key)}\s*[\].]|{re.escape(key)}\s*=)")
    return next((i + 1 for i, line in enumerate(lines) if pattern.match(line)), 1)


def _rule(table: dict, source: str, start: int, block: list[str]) -> QuotaRule:
    def line_of(key: str) -> int:
        for offset, line in enumerate(block):
            match = _KEY.match(line)
            if match and match.group(1) == key:
                return start + offset
        return start

    def fail(key: str | None, problem: str) -> QuotaFileError:
        return QuotaFileError(f"{source} line {line_of(key) if key else start}: {problem}")

    for key in table:
        if key not in _FIELDS:
            raise fail(key, f"unknown field {key!r} in [[quota]] (fields: {', '.join(_FIELDS)})")
    for key in _FIELDS:
        if key not in table:
            raise fail(None, f"[[quota]] is missing {key!r}")
    code, period, measure = table["code"], table["period"], table["measure"]
    if not isinstance(code, str) or not code:
        raise fail("code", f"code must be a non-empty string, got {code!r}")
    if period not in PERIODS:
        raise fail("period", f'period must be "day" or "month", got {period!r}')
    if measure not in MEASURES:
        raise fail("measure", f'measure must be "count" or "value", got {measure!r}')
    threshold = _threshold(table["threshold"], measure)
    if isinstance(threshold, str):
        raise fail("threshold", threshold)
    return QuotaRule(code, period, measure, threshold, start)


def _threshold(raw: object, measure: str) -> int | str:
    """The scaled threshold, or a message saying what is wrong with it."""
    if isinstance(raw, bool):
        return f"threshold must be a number, got {raw!r}"
    if measure == "count":
        if isinstance(raw, int) and raw >= 0:
            return raw
        shown = raw if isinstance(raw, Decimal) else repr(raw)
        return f"a count threshold must be a whole number >= 0, got {shown}"
    if isinstance(raw, (int, Decimal)):
        value = Decimal(raw)
    elif isinstance(raw, str):
        try:
            value = Decimal(raw.strip())
        except InvalidOperation:
            return f"threshold {raw!r} is not a decimal number"
    else:
        return f"threshold must be a number or a decimal string, got {raw!r}"
    if not value.is_finite():
        return f"threshold must be finite, got {raw!r}"
    if value and value.adjusted() > MAX_ADJUSTED:
        return f"threshold {raw} does not fit Decimal(38, {VALUE_SCALE})"
    scaled = scale_decimal(value)  # exact: finite and small enough, so only places can fail
    if isinstance(scaled, Invalid):
        return f"threshold {raw} has more than {VALUE_SCALE} decimal places"
    return scaled
