"""Decode and validate one usage event (msgspec), or say exactly why not.

Every message ends as a :class:`UsageEvent` or an :class:`Invalid` with a
reason code from :data:`REASONS`; nothing raises on bad input::

    >>> ok = validate(b'{"transaction_id":"t1","organization_id":"o","external_customer_id":"c",'
    ...               b'"code":"api_calls","timestamp":"2026-01-01T00:00:00Z","value":"1.5"}')
    >>> ok.timestamp_ms, format_scaled(ok.value_scaled)
    (1767225600000, '1.500000000000000000')
    >>> validate(b'{"transaction_id":""}').reason
    'empty_field'
"""

from __future__ import annotations

import decimal
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Optional, Union

import msgspec

VALUE_SCALE = 18
"""Decimal places kept: totals are integers scaled by 10**18 (ClickHouse ``Decimal(38, 18)``)."""
_SCALE_FACTOR = 10**VALUE_SCALE
_MAX_SCALED = 10**38 - 1
_MAX_WHOLE = _MAX_SCALED // _SCALE_FACTOR
_MAX_ID_LENGTH = 256
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_MAX_TIMESTAMP_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z

REASONS = (
    "empty_message",
    "invalid_utf8",
    "malformed_json",
    "not_an_object",
    "missing_field",
    "empty_field",
    "field_too_long",
    "wrong_type",
    "invalid_timestamp",
    "invalid_value",
    "invalid_properties",
)
"""Every reason an input message can be rejected for (the DLQ ``tallyflow.reason`` header)."""

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_ID_LENGTH)]


class UsageEvent(msgspec.Struct, gc=False, rename={"timestamp_ms": "timestamp", "value_scaled": "value"}):
    """A valid event: ids, event time in epoch ms, value scaled by 10**18 (0 when absent).

    Decoded straight from the JSON (``timestamp`` and ``value`` land in
    ``timestamp_ms`` and ``value_scaled``, then are normalised in place), so each
    message costs one object.
    """

    transaction_id: _Id
    organization_id: _Id
    external_customer_id: _Id
    code: _Id
    timestamp_ms: Union[int, datetime]
    properties: dict = {}
    value_scaled: Union[int, Optional[Decimal]] = None


_decoder = msgspec.json.Decoder(UsageEvent)


class Invalid(msgspec.Struct, frozen=True, gc=False):
    """Why a message is not a valid event: a code from REASONS and a human detail."""

    reason: str
    detail: str


_FIELD_AT = re.compile(r"at `\$\.(\w+)`")
_MISSING = re.compile(r"missing required field `(\w+)`")


def validate(raw: bytes | None) -> UsageEvent | Invalid:
    """Decode one Kafka message value into a UsageEvent, or an Invalid naming the reason."""
    if not raw:
        return Invalid("empty_message", "message has no value")
    try:
        event = _decoder.decode(raw)
    except UnicodeDecodeError as err:
        return Invalid("invalid_utf8", str(err))
    except msgspec.ValidationError as err:
        return _classify_validation_error(str(err))
    except msgspec.DecodeError as err:
        return Invalid("malformed_json", str(err))
    timestamp = event.timestamp_ms
    if timestamp.__class__ is not int or not 0 <= timestamp <= _MAX_TIMESTAMP_MS:
        timestamp = _timestamp_ms(timestamp)
        if timestamp.__class__ is Invalid:
            return timestamp
        event.timestamp_ms = timestamp
    value = event.value_scaled
    if value is None:
        event.value_scaled = 0
    elif value.__class__ is int:
        if not -_MAX_WHOLE <= value <= _MAX_WHOLE:
            return Invalid("invalid_value", f"value does not fit Decimal(38, {VALUE_SCALE}): {value}")
        event.value_scaled = value * _SCALE_FACTOR
    else:
        value = scale_decimal(value)
        if value.__class__ is Invalid:
            return value
        event.value_scaled = value
    return event


def _classify_validation_error(message: str) -> Invalid:
    missing = _MISSING.search(message)
    if missing:
        return Invalid("missing_field", message)
    at = _FIELD_AT.search(message)
    field = at.group(1) if at else None
    if field is None:
        return Invalid("not_an_object", message)
    if field == "timestamp":
        return Invalid("invalid_timestamp", message)
    if field == "value":
        return Invalid("invalid_value", message)
    if field == "properties":
        return Invalid("invalid_properties", message)
    if "length >= 1" in message:
        return Invalid("empty_field", message)
    if f"length <= {_MAX_ID_LENGTH}" in message:
        return Invalid("field_too_long", message)
    return Invalid("wrong_type", message)


def _timestamp_ms(timestamp: int | datetime) -> int | Invalid:
    if isinstance(timestamp, datetime):
        if timestamp.tzinfo is None:
            return Invalid("invalid_timestamp", "RFC 3339 timestamp needs an offset (Z or +hh:mm)")
        millis = (timestamp - _EPOCH) // _ONE_MS
    else:
        millis = timestamp
    if not 0 <= millis <= _MAX_TIMESTAMP_MS:
        return Invalid("invalid_timestamp", f"epoch milliseconds out of range: {millis}")
    return millis


_EXACT = decimal.Context(prec=80, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])
"""Scaling context: a value with more significant digits than it keeps raises, never rounds."""
MAX_ADJUSTED = 38 - VALUE_SCALE - 1
"""The largest power of ten that fits Decimal(38, 18): ``value.adjusted()`` above it overflows."""


def scale_decimal(value: Decimal) -> int | Invalid:
    """Turn a Decimal into an integer scaled by 10**18, exactly, or say why it cannot be.

    >>> scale_decimal(Decimal("0.1"))
    100000000000000000
    >>> scale_decimal(Decimal("1e-19")).reason
    'invalid_value'
    """
    if not value.is_finite():
        return Invalid("invalid_value", f"value is not finite: {value}")
    if not value:
        return 0
    if value.adjusted() > MAX_ADJUSTED:
        return Invalid("invalid_value", f"value does not fit Decimal(38, {VALUE_SCALE}): {value}")
    if value.adjusted() < -VALUE_SCALE:
        return Invalid("invalid_value", f"value has more than {VALUE_SCALE} decimal places: {value}")
    try:
        scaled = value.scaleb(VALUE_SCALE, _EXACT)
    except decimal.Inexact:  # more significant digits than Decimal(38, 18) can hold
        return Invalid("invalid_value", f"value has more than {VALUE_SCALE} decimal places: {value}")
    whole = int(scaled)
    if scaled != whole:
        return Invalid("invalid_value", f"value has more than {VALUE_SCALE} decimal places: {value}")
    return whole


def format_scaled(scaled: int) -> str:
    """Render a 10**18-scaled integer as an exact decimal string.

    >>> format_scaled(-1)
    '-0.000000000000000001'
    """
    sign = "-" if scaled < 0 else ""
    whole, fraction = divmod(abs(scaled), _SCALE_FACTOR)
    return f"{sign}{whole}.{fraction:0{VALUE_SCALE}d}"
