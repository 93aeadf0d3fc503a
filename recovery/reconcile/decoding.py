"""Reconcile's own reading of a raw Kafka value: a valid event, or None.

Written from the README's input contract, not from the flow's decoder, so a bug in
one is not silently shared by the other. Values are exact ``Decimal``s (JSON numbers
are parsed from their text, never through a float)::

    >>> event = decode(b'{"transaction_id":"t","organization_id":"o","external_customer_id":"c",'
    ...                b'"code":"x","timestamp":"2026-01-01T01:00:00.9999+01:00","value":"1.5"}')
    >>> event.timestamp_ms, event.value
    (1767225600999, Decimal('1.5'))
    >>> decode(b'{"transaction_id":""}') is None
    True

The rules: one JSON object (UTF-8); ``transaction_id``, ``organization_id``,
``external_customer_id``, ``code`` strings of 1 to 256 characters; ``timestamp`` an
integer of epoch milliseconds or an RFC 3339 date-time with an offset (``T``, ``t`` or a
space between date and time, ``Z`` or ``±hh:mm``/``±hhmm``), any sub-millisecond digits
truncated (toward the past), from 1970-01-01 to 2260-12-31T23:59:59.999Z; ``properties``
an object when present; ``value`` absent, ``null``, a JSON number or a string in plain
ASCII decimal or exponent syntax, finite, with at most 18 decimal places once scaled and
fitting ``Decimal(38, 18)``; arrays and objects nested at most 64 deep (the message's
object is level 1); no ``\\u`` escape of a lone UTF-16 surrogate anywhere; no number in
``properties`` that cannot be read exactly (an exponent of 19 digits or more, an integer of
more than 4,300 digits). Unknown fields are ignored, whatever numbers they hold. A field
named twice counts its last value, but every occurrence must have the field's type (a string
of 1 to 256 characters for an id, an integer or a string for ``timestamp``, an object for
``properties``).
"""

from __future__ import annotations

import calendar
import decimal
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal

ID_FIELDS = ("transaction_id", "organization_id", "external_customer_id", "code")
MAX_ID_CHARACTERS = 256
SCALE = 18
_LARGEST_SCALED = 10**38 - 1
_LAST_MS = calendar.timegm((2260, 12, 31, 23, 59, 59)) * 1000 + 999
MAX_DEPTH = 64
_NUMBER_TEXT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):?([0-9]{2}))")
_WIDE = decimal.Context(prec=200, Emax=10**6, Emin=-(10**6))


@dataclass(frozen=True)
class Event:
    """A valid usage event as reconcile sees it (``value`` exact, 0 when absent)."""

    transaction_id: str
    organization_id: str
    external_customer_id: str
    code: str
    timestamp_ms: int
    value: Decimal
    properties: dict = field(default_factory=dict, compare=False)
    value_scaled: int = 0  # the value as a count of 10**-18 (exact: decode checked it fits)


def decode(raw: bytes | None) -> Event | None:
    """The event in ``raw``, or None when it breaks any rule of the input contract."""
    if not raw:
        return None
    try:
        text = raw.decode("utf-8")
        document, tolerant = _read_json(text)
        escaped = "\\u" in text
        if _may_repeat_a_field(raw, escaped):  # read again, keeping every occurrence of each field
            document = _PAIRS_JSON.decode(text)
            if not _every_occurrence_typed(document):
                return None
            tolerant = True
        if escaped:  # an escaped lone surrogate is no character: refused, as the flow does
            json.dumps(document, ensure_ascii=False, default=str).encode("utf-8")
    except (UnicodeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and nesting(document) > MAX_DEPTH:
        return None  # (fewer brackets than that cannot nest that deep)
    ids = [document.get(name) for name in ID_FIELDS]
    if not all(isinstance(v, str) and 1 <= len(v) <= MAX_ID_CHARACTERS for v in ids):
        return None
    timestamp_ms = parse_timestamp(document.get("timestamp"))
    value = parse_value(document.get("value"))
    properties = document.get("properties", {})
    if timestamp_ms is None or value is None or not isinstance(properties, dict):
        return None
    if tolerant and _holds_unreadable(properties):
        return None
    return Event(*ids, timestamp_ms, value, properties, int(value.scaleb(SCALE, _WIDE)))


def nesting(document) -> int:
    """How deep arrays and objects nest in a decoded document (a scalar is 0).

    >>> nesting({"a": [1, {"b": []}]}), nesting("x")
    (4, 0)
    """
    deepest, pending = 0, [(document, 1)]
    while pending:
        node, depth = pending.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class _Unreadable:
    """A JSON number no ``Decimal`` or ``int`` holds exactly: refused where numbers are read."""


_UNREADABLE = _Unreadable()


def _exact_number(text: str) -> Decimal | _Unreadable:
    """A JSON number with a fraction or exponent, exactly; ``_UNREADABLE`` when too large to hold.

    >>> _exact_number("1.50"), _exact_number("1e" + "9" * 20) is _UNREADABLE
    (Decimal('1.50'), True)
    """
    try:
        return Decimal(text)
    except decimal.InvalidOperation:
        return _UNREADABLE


def _exact_integer(text: str) -> int | _Unreadable:
    """A JSON integer; ``_UNREADABLE`` past Python's 4,300-digit limit."""
    try:
        return int(text)
    except ValueError:
        return _UNREADABLE


def _holds_unreadable(node) -> bool:
    """Whether an unreadable number lies anywhere in ``node`` (at most 64 levels: checked)."""
    pending = [node]
    while pending:
        node = pending.pop()
        if node is _UNREADABLE:
            return True
        if isinstance(node, dict):
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return False


_JSON = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)
_TOLERANT_JSON = json.JSONDecoder(parse_float=_exact_number, parse_int=_exact_integer,
                                  parse_constant=_reject_constant)


class _Pairs(dict):
    """A JSON object that also keeps its ``pairs`` as written, repeated names included."""

    pairs: list

    @classmethod
    def of(cls, pairs: list) -> "_Pairs":
        made = cls(pairs)
        made.pairs = pairs
        return made


_PAIRS_JSON = json.JSONDecoder(parse_float=_exact_number, parse_int=_exact_integer,
                               parse_constant=_reject_constant, object_pairs_hook=_Pairs.of)
def _may_repeat_a_field(raw: bytes, escaped: bool) -> bool:
    """Whether ``raw`` might name a known field twice (``escaped``: a ``\\u`` escape could spell one).

    >>> _may_repeat_a_field(b'{"code": "a", "code": "b"}', False)
    True
    """
    return (escaped or raw.count(b'"transaction_id"') > 1 or raw.count(b'"organization_id"') > 1
            or raw.count(b'"external_customer_id"') > 1 or raw.count(b'"code"') > 1
            or raw.count(b'"timestamp"') > 1 or raw.count(b'"properties"') > 1)


def _every_occurrence_typed(document) -> bool:
    """Whether every occurrence of a known field in ``document`` has that field's type.

    >>> _every_occurrence_typed(_PAIRS_JSON.decode('{"timestamp": 1.5, "timestamp": 5}'))
    False
    >>> _every_occurrence_typed(_PAIRS_JSON.decode('{"code": "a", "code": "b", "value": [], "value": 1}'))
    True
    """
    if not isinstance(document, _Pairs):
        return True  # not an object: refused later
    for name, value in document.pairs:
        if name in ID_FIELDS:
            if not (isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARACTERS):
                return False
        elif name == "timestamp":
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                return False
        elif name == "properties":
            if not isinstance(value, dict) or _holds_unreadable(value):
                return False
    return True


def _read_json(text: str) -> tuple[object, bool]:
    """The document, and whether it holds numbers too large to read (then read tolerantly).

    The plain decoder first (fast); a number it cannot hold (``decimal.InvalidOperation``, or
    ``ValueError`` past 4,300 digits) sends the message through the tolerant one, which marks
    such numbers ``_UNREADABLE`` instead of raising, so one in an unknown field is ignored.
    """
    try:
        return _JSON.decode(text), False
    except json.JSONDecodeError:  # malformed: the tolerant reading would fail the same way
        raise
    except (decimal.InvalidOperation, ValueError):  # a number too large (or NaN: raises again)
        return _TOLERANT_JSON.decode(text), True


def parse_timestamp(raw) -> int | None:
    """Epoch milliseconds of an integer or an RFC 3339 text; None when unusable.

    >>> parse_timestamp("1970-01-01T00:00:00.0009Z"), parse_timestamp("1969-12-31T23:59:59.9999995Z")
    (0, None)
    >>> parse_timestamp(1.5), parse_timestamp(True), parse_timestamp("2026-01-01T00:00:00")
    (None, None, None)
    """
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        return None
    millis = raw if isinstance(raw, int) else _rfc3339_ms(raw)
    if millis is None or not 0 <= millis <= _LAST_MS:
        return None
    return millis


def _rfc3339_ms(text: str) -> int | None:
    match = _DATE_TIME.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, zulu, sign, offset_h, offset_m = match.groups()[6:]
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year or 1, month)[1]
            and year >= 1 and hour <= 23 and minute <= 59 and second <= 59):
        return None
    offset_minutes = 0
    if not zulu:
        if int(offset_h) > 23 or int(offset_m) > 59:
            return None
        offset_minutes = (int(offset_h) * 60 + int(offset_m)) * (1 if sign == "+" else -1)
    seconds = calendar.timegm((year, month, day, hour, minute, second)) - offset_minutes * 60
    return seconds * 1000 + int((fraction or "0")[:3].ljust(3, "0"))


def parse_value(raw) -> Decimal | None:
    """The exact value (0 when absent or null); None when it breaks the value rules.

    >>> parse_value("1e2"), parse_value(None), parse_value(" 1"), parse_value("0.0000000000000000001")
    (Decimal('1E+2'), Decimal('0'), None, None)
    """
    if raw is None:
        return Decimal(0)
    if isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        if not _NUMBER_TEXT.fullmatch(raw):
            return None
        try:
            raw = Decimal(raw)
        except decimal.InvalidOperation:  # an exponent of 19 digits or more
            return None
    elif isinstance(raw, int):
        raw = Decimal(raw)
    elif not isinstance(raw, Decimal):
        return None
    return raw if fits_scaled(raw) else None


def fits_scaled(value: Decimal) -> bool:
    """Whether ``value`` is finite, has at most 18 decimal places and fits Decimal(38, 18)."""
    if not value.is_finite():
        return False
    if value.is_zero():
        return True
    if value.adjusted() > 40 or value.adjusted() < -SCALE - 1:
        return False
    scaled = value.scaleb(SCALE, _WIDE)
    return scaled == scaled.to_integral_value() and abs(scaled) <= _LARGEST_SCALED
