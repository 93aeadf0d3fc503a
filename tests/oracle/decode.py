"""The README's input contract, decoded the plain way: an oracle that imports no product code.

``decode(value)`` gives a :class:`Decoded` event or the reason the README names for sending the
message to the DLQ ("Input, and what bad input gets"). Written from the README with the
standard library (``json`` with exact decimals, a regular expression for RFC 3339), not from
``operators/validation.py``::

    >>> decode(b'{"transaction_id":"t","organization_id":"o","external_customer_id":"c",'
    ...        b'"code":"x","timestamp":"2026-01-01T01:00:00.5+01:00","value":"1.25"}')
    Decoded(organization_id='o', external_customer_id='c', code='x', transaction_id='t', timestamp_ms=1767225600500, value=Decimal('1.25'))
    >>> [decode(raw) for raw in (b"", b"[1]", b'{"a": 1', b"\\xff")]
    ['empty_message', 'not_an_object', 'malformed_json', 'invalid_utf8']
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation, localcontext
from typing import NamedTuple

MAX_DEPTH = 64
MAX_ID_CHARACTERS = 256
LAST_MS = 9_183_110_399_999  # 2260-12-31T23:59:59.999Z
DECIMAL_PLACES = 18
INTEGER_DIGITS = 20  # Decimal(38, 18)
IDS = ("transaction_id", "organization_id", "external_customer_id", "code")
_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:?\d{2})")
_STRICT_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class Decoded(NamedTuple):
    organization_id: str
    external_customer_id: str
    code: str
    transaction_id: str
    timestamp_ms: int
    value: Decimal


def decode(value: bytes | None) -> Decoded | str:
    """The event in ``value``, or the DLQ reason (a string)."""
    if not value:
        return "empty_message"
    if _depth(value) > MAX_DEPTH:
        return "too_deeply_nested"
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return "invalid_utf8"
    try:
        message = json.loads(text, parse_float=_number, parse_int=_integer, parse_constant=_no_constant,
                             object_pairs_hook=_Object)
        json.dumps(message, ensure_ascii=False, default=repr).encode("utf-8")  # no lone surrogate
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        return "malformed_json"
    if not isinstance(message, dict):
        return "not_an_object"
    return _event(message)


class _Object(dict):
    """A JSON object; ``pairs`` keeps every name as written, a name given twice included."""

    def __init__(self, pairs: list) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class _TooLarge:
    """A JSON number no Decimal or int can hold (exponent of 19+ digits, int over 4,300 digits)."""


def _number(text: str):
    try:
        return Decimal(text)
    except InvalidOperation:
        return _TooLarge()


def _integer(text: str):
    try:
        return int(text)
    except ValueError:
        return _TooLarge()


def _holds_too_large(node) -> bool:
    if isinstance(node, _TooLarge):
        return True
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    return any(_holds_too_large(child) for child in children)


def _depth(raw: bytes) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


def _event(message: dict) -> Decoded | str:
    # A field named twice counts its last value, but each occurrence must have the field's type.
    for name, given in message.pairs:
        if name in IDS and not (isinstance(given, str) and given):
            return "wrong_type" if not isinstance(given, str) else "empty_field"
        if name in IDS and len(given) > MAX_ID_CHARACTERS:
            return "field_too_long"
        if name == "timestamp" and (isinstance(given, bool) or not isinstance(given, (int, str))):
            return "invalid_timestamp"
        if name == "properties" and (not isinstance(given, dict) or _holds_too_large(given)):
            return "invalid_properties"
    for name in IDS + ("timestamp",):
        if name not in message:
            return "missing_field"
    for name in IDS:
        if not isinstance(message[name], str):
            return "wrong_type"
        if message[name] == "":
            return "empty_field"
        if len(message[name]) > MAX_ID_CHARACTERS:
            return "field_too_long"
    timestamp = _timestamp_ms(message["timestamp"])
    if timestamp is None:
        return "invalid_timestamp"
    if "properties" in message and (not isinstance(message["properties"], dict)
                                    or _holds_too_large(message["properties"])):
        return "invalid_properties"
    amount = _value(message.get("value"))
    if amount is None:
        return "invalid_value"
    return Decoded(message["organization_id"], message["external_customer_id"], message["code"],
                   message["transaction_id"], timestamp, amount)


def _timestamp_ms(timestamp) -> int | None:
    if isinstance(timestamp, bool):
        return None
    if isinstance(timestamp, int):
        millis = timestamp
    elif isinstance(timestamp, str):
        millis = _rfc3339_ms(timestamp)
        if millis is None:
            return None
    else:
        return None
    return millis if 0 <= millis <= LAST_MS else None


def _rfc3339_ms(text: str) -> int | None:
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    try:
        moment = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second),
                          tzinfo=timezone.utc)
    except ValueError:
        return None
    offset_minutes = 0
    if offset not in ("Z", "z"):
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        offset_minutes = sign * (int(digits[:2]) * 60 + int(digits[2:]))
    millis = int((moment - datetime(1970, 1, 1, tzinfo=timezone.utc)).total_seconds()) * 1000
    millis += int((fraction or ".0")[1:4].ljust(3, "0"))  # cut past the millisecond, never rounded
    return millis - offset_minutes * 60_000


def _value(value) -> Decimal | None:
    if value is None:
        return Decimal(0)
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):
        return None
    if isinstance(value, str):
        if not _STRICT_DECIMAL.fullmatch(value):
            return None
        try:
            value = Decimal(value)
        except InvalidOperation:
            return None
    amount = Decimal(value)
    if not amount.is_finite():
        return None
    with localcontext() as exact:
        exact.prec = 200
        if abs(amount) >= Decimal(10) ** INTEGER_DIGITS:
            return None
        if amount % Decimal(1).scaleb(-DECIMAL_PLACES) != 0:
            return None  # more than 18 decimal places
    return amount
