"""Every way an input message can be rejected, and exact values for the valid ones."""

from decimal import Decimal

import pytest

from operators.validation import REASONS, Invalid, UsageEvent, format_scaled, scale_decimal, validate

BASE = {
    "transaction_id": "t-1",
    "organization_id": "org-1",
    "external_customer_id": "cust-1",
    "code": "api_calls",
    "timestamp": "2026-03-01T12:00:00.250+02:00",
}


def encode(**overrides) -> bytes:
    import json

    fields = {**BASE, **overrides}
    fields = {k: v for k, v in fields.items() if v is not ...}
    return json.dumps(fields).encode()


def test_valid_event_with_rfc3339_offset_and_string_value():
    event = validate(encode(value="12.345"))
    assert isinstance(event, UsageEvent)
    assert event.timestamp_ms == 1772359200250  # 10:00:00.250Z
    assert event.value_scaled == 12_345 * 10**15


def test_epoch_millis_number_value_and_unknown_fields():
    event = validate(encode(timestamp=1700000000123, value=0.1, extra={"x": 1}))
    assert event.timestamp_ms == 1700000000123
    assert event.value_scaled == 10**17  # exact, never via float


@pytest.mark.parametrize("value", [None, ...])
def test_absent_or_null_value_counts_zero(value):
    assert validate(encode(value=value)).value_scaled == 0


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "empty_message"),
        (None, "empty_message"),
        (b'{"transaction_id": "\xff\xfe"}', "invalid_utf8"),
        (b"{not json", "malformed_json"),
        (b'{"value": NaN}', "malformed_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"just a string"', "not_an_object"),
        (encode(code=...), "missing_field"),
        (encode(transaction_id=""), "empty_field"),
        (encode(organization_id="x" * 257), "field_too_long"),
        (encode(external_customer_id=42), "wrong_type"),
        (encode(code=None), "wrong_type"),
        (encode(timestamp="yesterday"), "invalid_timestamp"),
        (encode(timestamp="2026-03-01T12:00:00"), "invalid_timestamp"),
        (encode(timestamp=True), "invalid_timestamp"),
        (encode(timestamp=1.5), "invalid_timestamp"),
        (encode(timestamp=-5), "invalid_timestamp"),
        (encode(value="abc"), "invalid_value"),
        (encode(value="NaN"), "invalid_value"),
        (encode(value="Infinity"), "invalid_value"),
        (encode(value="0.0000000000000000001"), "invalid_value"),
        (encode(value="1e400"), "invalid_value"),
        (encode(value="1e-999999999"), "invalid_value"),
        (encode(value=[1]), "invalid_value"),
        (encode(properties=[1]), "invalid_properties"),
    ],
)
def test_rejection_reasons(raw, reason):
    result = validate(raw)
    assert isinstance(result, Invalid), result
    assert result.reason == reason
    assert result.reason in REASONS
    assert result.detail


def test_256_char_ids_are_fine():
    assert isinstance(validate(encode(organization_id="x" * 256)), UsageEvent)


@pytest.mark.parametrize(
    "text, scaled",
    [
        ("0", 0),
        ("-0.000000000000000001", -1),
        ("99999999999999999999.999999999999999999", 10**38 - 1),
        ("1.500000000000000000000", 15 * 10**17),
        ("1E+2", 100 * 10**18),
        ("1." + "0" * 100, 10**18),  # trailing zeros past the 18th place are not precision
    ],
)
def test_scale_decimal_is_exact(text, scaled):
    assert scale_decimal(Decimal(text)) == scaled
    assert Decimal(format_scaled(scaled)) == Decimal(text)


def test_scale_decimal_rejects_overflow():
    assert isinstance(scale_decimal(Decimal("100000000000000000000")), Invalid)


@pytest.mark.parametrize("text", [
    "1." + "0" * 90 + "1",  # more digits than the scaling context keeps: never rounded to 1
    "0.1" + "0" * 80 + "7",
    "-12345678901234567890." + "0" * 70 + "3",
])
def test_scale_decimal_never_rounds_a_long_value(text):
    result = scale_decimal(Decimal(text))
    assert isinstance(result, Invalid) and result.reason == "invalid_value", result
    assert "decimal places" in result.detail
