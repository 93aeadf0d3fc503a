"""Decode and validate one usage event (msgspec), or say exactly why not.

Every message ends as a :class:`UsageEvent` or an :class:`Invalid` with a
reason code from :data:`REASONS`; nothing raises on bad input::

    >>> ok = validate(b'{"transaction_id":"t1","organization_id":"o","external_customer_id":"c",'
    ...               b'"code":"api_calls","timestamp":"2026-01-01T00:00:00Z","value":"1.5"}')
    >>> ok.timestamp_ms, format_scaled(ok.value_scaled)
    (1767225600000, '1.500000000000000000')
    >>> validate(b'{"transaction_id":""}').reason
    'empty_field'
    >>> validate(b'{"a":' * 100 + b'1' + b'}' * 100).reason
    'too_deeply_nested'
"""

from __future__ import annotations

import decimal
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Annotated, Iterable, Union

import msgspec

from state.utc_calendar import days_from_civil

VALUE_SCALE = 18
"""Decimal places kept: totals are integers scaled by 10**18 (ClickHouse ``Decimal(38, 18)``)."""
_SCALE_FACTOR = 10**VALUE_SCALE
_MAX_SCALED = 10**38 - 1
_MAX_WHOLE = _MAX_SCALED // _SCALE_FACTOR
_MAX_ID_LENGTH = 256
MAX_TIMESTAMP_MS = 9_183_110_399_999
"""The last accepted event time, 2260-12-31T23:59:59.999Z.

Events from 1970-01-01 to the end of 2260 are accepted. Every value derived from an event
time (window ends, session ends plus lateness, the day and month of rollups and live
totals, the next month's start) then stays below 2262-04-11, where 64-bit nanoseconds
end, and far below 2299-12-31, where ClickHouse ``DateTime64(3)`` ends.
"""
MAX_DEPTH = 64
"""How deeply a message's JSON may nest (the top object is level 1); deeper is ``too_deeply_nested``."""

REASONS = (
    "empty_message",
    "invalid_utf8",
    "malformed_json",
    "too_deeply_nested",
    "not_an_object",
    "missing_field",
    "empty_field",
    "field_too_long",
    "wrong_type",
    "invalid_timestamp",
    "future_timestamp",
    "invalid_value",
    "invalid_properties",
)
"""Every reason an input message can be rejected for (the DLQ ``tallyflow.reason`` header).

``future_timestamp`` is given by the intake (``MAX_FUTURE_SKEW``), the others by :func:`validate`.
"""

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=_MAX_ID_LENGTH)]


class UsageEvent(msgspec.Struct, gc=False, rename={"timestamp_ms": "timestamp", "value_scaled": "value"}):
    """A valid event: ids, event time in epoch ms, value scaled by 10**18 (0 when absent).

    Decoded straight from the JSON (``timestamp`` and ``value`` land in
    ``timestamp_ms`` and ``value_scaled``, then are normalised in place), so each
    message costs one object. Numbers inside ``properties`` are exact ``Decimal``
    values (never floats), integers stay ``int``.
    """

    transaction_id: _Id
    organization_id: _Id
    external_customer_id: _Id
    code: _Id
    timestamp_ms: Union[int, str]
    properties: dict = {}
    value_scaled: msgspec.Raw = None  # read as written: see _raw_value_scaled


def _exact_number(text: str) -> Decimal:
    """A JSON number with a fraction or exponent, as the exact Decimal it writes.

    An exponent beyond what ``Decimal`` can hold (19 digits or more) cannot be read exactly:
    the decoder turns the ValueError into a validation error naming the field.

    >>> _exact_number("12345678.123456789")
    Decimal('12345678.123456789')
    >>> _exact_number("1e" + "9" * 20)
    Traceback (most recent call last):
    ValueError: number out of range: 1e99999999999999999999
    """
    try:
        return Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError(f"number out of range: {text[:64]}") from None


_decoder = msgspec.json.Decoder(UsageEvent, float_hook=_exact_number)


class Invalid(msgspec.Struct, frozen=True, gc=False):
    """Why a message is not a valid event: a code from REASONS and a human detail."""

    reason: str
    detail: str


_FIELD_AT = re.compile(r"at `\$\.(\w+)")  # the field, also when the error lies deeper in it
_MISSING = re.compile(r"missing required field `(\w+)`")


def validate(raw: bytes | None) -> UsageEvent | Invalid:
    """Decode one Kafka message value into a UsageEvent, or an Invalid naming the reason."""
    return validate_each((raw,))[0]


def validate_each(values: Iterable[bytes | None]) -> list[UsageEvent | Invalid]:
    """:func:`validate` of each value, in order: the intake's hot path.

    The usual event (nested less than ``MAX_DEPTH``, decoded at once, a timestamp in epoch ms
    or a usual RFC 3339 shape, a plain unsigned value) is finished here with the loop's locals;
    anything else is passed to :func:`validate_fully`, which gives the same result for every
    message (``tests/test_validation_fast_paths.py`` checks it)::

        >>> [r.reason for r in validate_each([b"", b"[1]"])]
        ['empty_message', 'not_an_object']
    """
    results: list[UsageEvent | Invalid] = []
    append, decode, fully = results.append, _decoder.decode, validate_fully
    second_of, tail_of, last_ms = _second_ms.get, _tail_ms.get, MAX_TIMESTAMP_MS
    unit, unit_of_places, places, max_scaled = _SCALE_FACTOR, _UNIT_OF_PLACES, VALUE_SCALE, _MAX_SCALED
    for raw in values:
        if not raw:
            append(fully(raw))
            continue
        # MAX_DEPTH levels need as many brackets: with no "[" and at most two "{" (looked for
        # with memchr, unlike count; 0x5B is "[", 0x7B "{") the message cannot nest that deep
        brace = raw.find(0x7B, 1)
        if ((0x5B in raw or brace > 0 and raw.find(0x7B, brace + 1) > 0)
                and raw.count(b"{") + raw.count(b"[") > MAX_DEPTH):
            append(fully(raw))
            continue
        try:
            event = decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # ValidationError included
            append(fully(raw))
            continue
        timestamp = event.timestamp_ms
        if timestamp.__class__ is str:  # _fast_rfc3339_ms, its cache hits inlined
            second, tail = second_of(timestamp[:19]), tail_of(timestamp[19:])
            millis = second + tail if second is not None and tail is not None else _fast_rfc3339_ms(timestamp)
            if millis is None or not 0 <= millis <= last_ms:  # any other shape: the full rule
                millis = _timestamp_ms(timestamp)
                if millis.__class__ is Invalid:
                    append(millis)
                    continue
            event.timestamp_ms = millis
        elif not 0 <= timestamp <= last_ms:  # an int out of range
            append(_timestamp_ms(timestamp))
            continue
        value = event.value_scaled
        if value is None:
            event.value_scaled = 0
            append(event)
            continue
        value = bytes(value)
        if value.isdigit() and len(value) < 20:  # the usual small whole number
            event.value_scaled = int(value) * unit
            append(event)
            continue
        # an unsigned plain decimal, quoted or not: ASCII digits and at most one point (a valid
        # JSON string has no unescaped quote inside, so strip takes just its own two)
        whole, _, fraction = value.strip(b'"').partition(b".")
        digits = whole + fraction
        if digits.isdigit() and len(digits) <= 38 and len(fraction) <= places:
            scaled = int(digits) * unit_of_places[len(fraction)]
            if scaled <= max_scaled:
                event.value_scaled = scaled
                append(event)
                continue
        scaled = _raw_value_scaled(value)  # signs, exponents, escapes, too many digits, errors
        if scaled.__class__ is not Invalid:
            event.value_scaled = scaled
            scaled = event
        append(scaled)
    return results


def validate_fully(raw: bytes | None) -> UsageEvent | Invalid:
    """:func:`validate` by the general rule alone, no fast path: every check written out.

    >>> validate_fully(b'{"a":' * 100 + b'1' + b'}' * 100).detail
    'JSON nests deeper than 64 levels'
    """
    if not raw:
        return Invalid("empty_message", "message has no value")
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and json_depth(raw) > MAX_DEPTH:
        return Invalid("too_deeply_nested", f"JSON nests deeper than {MAX_DEPTH} levels")
    try:
        event = _decoder.decode(raw)
    except UnicodeDecodeError as err:
        return Invalid("invalid_utf8", str(err))
    except msgspec.ValidationError as err:
        return _classify_validation_error(str(err))
    except msgspec.DecodeError as err:
        return Invalid("malformed_json", str(err))
    except RecursionError:  # not expected under MAX_DEPTH; never let it out of the step
        return Invalid("too_deeply_nested", "JSON nests too deeply to decode")
    timestamp = _timestamp_ms(event.timestamp_ms)
    if timestamp.__class__ is Invalid:
        return timestamp
    event.timestamp_ms = timestamp
    value = 0 if event.value_scaled is None else _raw_value_scaled(bytes(event.value_scaled))
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


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes) -> int:
    """How deeply ``raw`` nests arrays and objects, brackets inside strings not counted.

    Iterative and linear (no recursion, whatever the input), so it can vet a message
    before a recursive decoder sees it. Unbalanced input is measured as far as it goes.

    >>> json_depth(b'{"a": [1, {"b": "[[[["}]}')
    3
    >>> json_depth(b'[[[')
    3
    """
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    depth = deepest = 0
    for byte in brackets:
        if byte == 0x5B or byte == 0x7B:  # [ {
            depth += 1
            if depth > deepest:
                deepest = depth
        else:
            depth -= 1
    return deepest


_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.([0-9]+))?(?:[Zz]|([+-])([0-9]{2}):?([0-9]{2}))"
)
_DAYS_IN_MONTH = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_fromisoformat = datetime.fromisoformat
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
_days_of_date: dict[str, int | None] = {}


_MINUTE_PREFIX = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}")
_minute_ms: dict[str, int] = {}
"""Epoch ms of each recent valid ``YYYY-MM-DDTHH:MM`` (local time, before the offset)."""
_second_ms: dict[str, int] = {}
"""Epoch ms of each recent valid ``YYYY-MM-DDTHH:MM:SS`` (local time, before the offset)."""
_tail_ms: dict[str, int] = {}
"""What each recent tail of at most 3 fraction digits (``.250+02:00``, ``Z``...) adds, in ms."""
_CACHED = 8192
"""Entries a timestamp cache holds before it starts afresh."""
_SECOND_OF_MINUTE_MS = {f":{second:02d}": second * 1000 for second in range(60)}
_FRACTION_MS = {"": 0, **{f".{ms:03d}"[:digits + 1]: ms - ms % 10 ** (3 - digits)
                          for digits in (1, 2, 3) for ms in range(1000)}}
_OFFSET_MS = {f"{sign}{hours:02d}:{minutes:02d}": (-1 if sign == "+" else 1) * (hours * 60 + minutes) * 60_000
              for sign in "+-" for hours in range(24) for minutes in range(60)}
"""Each ``±hh:mm`` offset with what it adds to local time to give UTC, in ms."""


def _fast_rfc3339_ms(text: str) -> int | None:
    """:func:`rfc3339_ms` of the usual shapes, ``YYYY-MM-DDTHH:MM:SS[.digits](Z|±hh:mm)``; None for the rest.

    The text is cut after the seconds: the second's epoch ms and the tail's share (fraction
    and offset) come from small caches, computed from tables on a miss (a new second costs a
    lookup of its minute). :func:`validate_each` looks the caches up itself and calls this on a
    miss. None means "not this shape": ask :func:`rfc3339_ms`, which also gives the reason of
    an invalid timestamp::

        >>> _fast_rfc3339_ms("2026-03-01T12:00:00.250+02:00"), _fast_rfc3339_ms("2026-01-01T00:00:00Z")
        (1772359200250, 1767225600000)
        >>> _fast_rfc3339_ms("2026-03-01T12:00:00.123456789z"), rfc3339_ms("2026-03-01T12:00:00.123456789z")
        (1772366400123, 1772366400123)
        >>> _fast_rfc3339_ms("2026-02-29T00:00:00Z"), _fast_rfc3339_ms("2026-03-01T12:00:00+0200")
        (None, None)
    """
    second = _second_ms.get(text[:19])
    if second is None:
        minute = _minute_ms.get(text[:16])
        if minute is None:
            minute = _minute_start_ms(text[:16])
        second = _SECOND_OF_MINUTE_MS.get(text[16:19])
        if minute is None or second is None:
            return None
        if len(_second_ms) >= _CACHED:
            _second_ms.clear()
        second = _second_ms[text[:19]] = minute + second
    tail = _tail_ms.get(text[19:])
    if tail is None:
        tail = _tail_share_ms(text[19:])
        if tail is None:
            return None
    return second + tail


def _minute_start_ms(prefix: str) -> int | None:
    """Epoch ms of a ``YYYY-MM-DDTHH:MM`` local minute (cached), None when it is no such minute.

    >>> _minute_start_ms("2026-01-01T00:01"), _minute_start_ms("2026-01-01T24:00")
    (1767225660000, None)
    """
    if _MINUTE_PREFIX.fullmatch(prefix) is None:
        return None
    days = _days_of_date.get(prefix[:10], -1)
    if days == -1:
        days = _date_days(prefix[:10])
    hour, minute = int(prefix[11:13]), int(prefix[14:16])
    if days is None or hour > 23 or minute > 59:
        return None
    if len(_minute_ms) >= _CACHED:
        _minute_ms.clear()
    millis = _minute_ms[prefix] = ((days * 24 + hour) * 60 + minute) * 60_000
    return millis


def _tail_share_ms(tail: str) -> int | None:
    """What ``[.digits](Z|z|±hh:mm)`` adds to its second, in ms (short tails cached); else None.

    >>> _tail_share_ms(".25+02:00"), _tail_share_ms("Z"), _tail_share_ms(".9999999-00:30")
    (-7199750, 0, 1800999)
    >>> _tail_share_ms(".Z"), _tail_share_ms("+24:00"), _tail_share_ms(".1²Z")
    (None, None, None)
    """
    last = tail[-1:]
    if last == "Z" or last == "z":
        offset, fraction = 0, tail[:-1]
    else:
        offset, fraction = _OFFSET_MS.get(tail[-6:]), tail[:-6]
        if offset is None:
            return None
    millis = _FRACTION_MS.get(fraction)
    if millis is None:  # more than 3 digits: the first 3 count, the rest must be digits
        millis, rest = _FRACTION_MS.get(fraction[:4]), fraction[4:]
        if millis is None or len(fraction) < 5 or not (rest.isdigit() and rest.isascii()):
            return None
    if len(fraction) <= 4:  # up to ".fff": a few thousand tails in practice
        if len(_tail_ms) >= _CACHED:
            _tail_ms.clear()
        _tail_ms[tail] = millis + offset
    return millis + offset


def _timestamp_ms(timestamp: int | str) -> int | Invalid:
    if timestamp.__class__ is str:
        millis = rfc3339_ms(timestamp)
        if millis.__class__ is Invalid:
            return millis
    else:
        millis = timestamp
    if not 0 <= millis <= MAX_TIMESTAMP_MS:
        return Invalid("invalid_timestamp",
                       f"epoch milliseconds out of range 0..{MAX_TIMESTAMP_MS} "
                       f"(1970-01-01 to 2260-12-31): {millis}")
    return millis


def rfc3339_ms(text: str) -> int | Invalid:
    """Epoch milliseconds of an RFC 3339 timestamp, digits past the millisecond truncated.

    The fraction is read as digits, never through a float, and cut to the millisecond
    (floor, before and after 1970 alike), so no timestamp moves to the next second, day or
    month by rounding::

        >>> rfc3339_ms("2026-01-31T23:59:59.9999995Z")
        1769903999999
        >>> rfc3339_ms("1969-12-31T23:59:59.9999995Z")
        -1
        >>> rfc3339_ms("2026-03-01T12:00:00.250+02:00")
        1772359200250
        >>> rfc3339_ms("2026-03-01T12:00:00").reason
        'invalid_timestamp'
    """
    match = _RFC3339.fullmatch(text)
    if match is None:
        if _RFC3339.fullmatch(text + "Z"):
            return Invalid("invalid_timestamp", "RFC 3339 timestamp needs an offset (Z or +hh:mm)")
        return Invalid("invalid_timestamp", f"not an RFC 3339 timestamp: {text[:64]!r}")
    try:  # the usual shapes, in C: it keeps 6 fraction digits, truncating the rest
        return (_fromisoformat(text) - _EPOCH) // _ONE_MS
    except ValueError:  # lower-case t/z, +hhmm, no such day: the rule written out
        return _rfc3339_match_ms(text, match)


def _rfc3339_match_ms(text: str, match: re.Match) -> int | Invalid:
    """:func:`rfc3339_ms` written out, for a text that ``_RFC3339`` matched.

    >>> _rfc3339_match_ms(t := "2024-02-29t23:59:59.9999z", _RFC3339.fullmatch(t))
    1709251199999
    >>> _rfc3339_match_ms(t := "2023-02-29T00:00:00Z", _RFC3339.fullmatch(t)).reason
    'invalid_timestamp'
    """
    days = _days_of_date.get(text[:10], -1)
    if days == -1:
        days = _date_days(text[:10])
    hour, minute, second = int(text[11:13]), int(text[14:16]), int(text[17:19])
    if days is None or hour > 23 or minute > 59 or second > 59:
        return Invalid("invalid_timestamp", f"no such date or time: {text[:64]!r}")
    fraction, sign, offset_hours, offset_minutes = match.groups()
    seconds = days * 86_400 + hour * 3600 + minute * 60 + second
    if sign is not None:
        offset_hours, offset_minutes = int(offset_hours), int(offset_minutes)
        if offset_hours > 23 or offset_minutes > 59:
            return Invalid("invalid_timestamp", f"no such offset: {text[:64]!r}")
        offset = offset_hours * 3600 + offset_minutes * 60
        seconds = seconds - offset if sign == "+" else seconds + offset
    return seconds * 1000 + (int(fraction[:3].ljust(3, "0")) if fraction else 0)


def _date_days(date: str) -> int | None:
    """Days since 1970-01-01 of a ``YYYY-MM-DD`` date, None when there is no such day (cached)."""
    year, month, day = int(date[:4]), int(date[5:7]), int(date[8:10])
    leap = month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    days = None
    if 1 <= month <= 12 and 1 <= day <= _DAYS_IN_MONTH[month] + leap:
        days = days_from_civil(year, month, day)
    if len(_days_of_date) >= 4096:
        _days_of_date.clear()
    _days_of_date[date] = days
    return days


_PLAIN_DECIMAL = re.compile(rb"([+-]?)([0-9]{1,20})(?:\.([0-9]{0,18}))?")
_STRICT_DECIMAL = re.compile(rb"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


_UNIT_OF_PLACES = tuple(10 ** (VALUE_SCALE - places) for places in range(VALUE_SCALE + 1))
"""What one unit of the last digit is worth, scaled, for 0..18 decimal places."""


def _raw_value_scaled(raw: bytes) -> int | Invalid:
    """The 10**18-scaled value of a ``value`` field as written in the JSON.

    A JSON number, or a string in strict decimal syntax: ASCII digits, an optional sign,
    point and exponent, nothing else (no ``_``, spaces or other scripts' digits)::

        >>> _raw_value_scaled(b'"12.5"'), _raw_value_scaled(b'-1e-18')
        (12500000000000000000, -1)
        >>> _raw_value_scaled(b'"1_000"').reason, _raw_value_scaled(b'" 1 "').reason
        ('invalid_value', 'invalid_value')
    """
    text = raw[1:-1] if raw[:1] == b'"' else raw
    plain = _PLAIN_DECIMAL.fullmatch(text)
    if plain is not None:  # [sign]digits[.digits] that fits: exact integer arithmetic
        sign, whole, fraction = plain.groups()
        scaled = int(whole) * _SCALE_FACTOR + (int(fraction.ljust(VALUE_SCALE, b"0")) if fraction else 0)
        if scaled > _MAX_SCALED:
            return Invalid("invalid_value", f"value does not fit Decimal(38, {VALUE_SCALE}): "
                                            f"{text.decode()}")
        return -scaled if sign == b"-" else scaled
    if text is raw:
        if raw == b"null":
            return 0
        if raw[:1] not in b"-0123456789":
            return Invalid("invalid_value", f"value must be a number or a numeric string: "
                                            f"{raw[:64].decode(errors='replace')}")
        # else a JSON number, its syntax checked by the decoder
    else:
        if b"\\" in text:  # JSON escapes: read the string as JSON does
            text = msgspec.json.decode(raw).encode("utf-8", "surrogatepass")
        if not _STRICT_DECIMAL.fullmatch(text):
            return Invalid("invalid_value", f"not a decimal number: {raw[:64].decode(errors='replace')}")
    try:
        number = Decimal(text.decode())
    except decimal.InvalidOperation:  # an exponent of 19 digits or more: no Decimal holds it
        return Invalid("invalid_value", f"value does not fit Decimal(38, {VALUE_SCALE}): "
                                        f"{raw[:64].decode(errors='replace')}")
    return scale_decimal(number)


def strict_decimal(text: str) -> Decimal | None:
    """The exact Decimal of a string in strict decimal syntax, else None.

    >>> strict_decimal("12345678.123456789"), strict_decimal("١٢"), strict_decimal("1_000")
    (Decimal('12345678.123456789'), None, None)
    """
    if not text.isascii():
        return None
    encoded = text.encode()
    return Decimal(text) if _STRICT_DECIMAL.fullmatch(encoded) else None


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
    """Render a 10**18-scaled integer as an exact decimal string; one unit or more (most
    totals) is sliced from its digits, twice as fast as dividing.

    >>> format_scaled(-1), format_scaled(12_500_000_000_000_000_000)
    ('-0.000000000000000001', '12.500000000000000000')
    """
    if scaled >= _SCALE_FACTOR:
        digits = str(scaled)
        return f"{digits[:-VALUE_SCALE]}.{digits[-VALUE_SCALE:]}"
    sign = "-" if scaled < 0 else ""
    whole, fraction = divmod(abs(scaled), _SCALE_FACTOR)
    return f"{sign}{whole}.{fraction:0{VALUE_SCALE}d}"
