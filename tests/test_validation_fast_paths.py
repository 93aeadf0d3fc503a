"""The intake's fast paths give exactly what the general rule gives, for any message.

``validate_each`` (what the intake runs) finishes the usual event itself: a memchr nesting
pre-check, cached seconds and tails of RFC 3339 timestamps, plain unsigned values parsed
inline. ``validate_fully`` is the general rule with none of that. These tests compare the two on
mutated messages, timestamps and values near every edge: same event fields, or same reason
code and the same detail text. ``_fast_rfc3339_ms`` is also compared with ``rfc3339_ms`` on its
own, and the intake's cached digest prefix with ``transaction_digest``.
"""

from __future__ import annotations

import json
import random

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deploy.generator import generate
from operators import validation
from operators.intake import IntakeLogic
from operators.validation import (Invalid, _fast_rfc3339_ms, rfc3339_ms, validate, validate_each,
                                  validate_fully)
from state.dedup import transaction_digest
from state.window_kinds import TumblingWindows

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
BASE = {"transaction_id": "t-1", "organization_id": "org-1", "external_customer_id": "c-1",
        "code": "api_calls", "timestamp": START_MS}


def same(fast, full) -> bool:
    """Both the same event (every field) or the same rejection (reason and detail)."""
    if fast.__class__ is not full.__class__:
        return False
    if isinstance(fast, Invalid):
        return (fast.reason, fast.detail) == (full.reason, full.detail)
    return all(getattr(fast, name) == getattr(full, name) for name in fast.__struct_fields__)


def assert_same(messages: list) -> None:
    for message, fast in zip(messages, validate_each(messages), strict=True):
        full = validate_fully(message)
        assert same(fast, full), (message, fast, full)
        assert same(validate(message), full), message


def message(**fields) -> bytes:
    return json.dumps({**BASE, **fields}, ensure_ascii=False).encode("utf-8", "surrogatepass")


def raw_message(timestamp: str = str(START_MS), value: str | None = None) -> bytes:
    """A message with ``timestamp`` and ``value`` written as raw JSON text."""
    text = json.dumps(BASE)[:-1].replace(f'"timestamp": {START_MS}', f'"timestamp": {timestamp}')
    if value is not None:
        text += f', "value": {value}'
    return (text + "}").encode("utf-8", "surrogatepass")


# Timestamps: the RFC 3339 shape assembled from parts that reach past every limit.
_YEARS = st.sampled_from(["1969", "1970", "2000", "2024", "2026", "2100", "2260", "2261", "0000", "9999", "197"])
_TWO = st.integers(0, 99).map(lambda n: f"{n:02d}")
_DIGITS = st.text(st.sampled_from("0123456789"), min_size=0, max_size=12)
_ODD_DIGITS = st.text(st.sampled_from("0123456789٣²５"), min_size=1, max_size=4)
_FRACTIONS = st.one_of(st.just(""), _DIGITS.map(lambda d: "." + d), _ODD_DIGITS.map(lambda d: "." + d))
_OFFSETS = st.one_of(
    st.sampled_from(["Z", "z", "", "+00:00", "-00:00", "+05:30", "-03:30", "+23:59", "-23:59", "+24:00",
                     "+05:60", "+0530", "+05", "ZZ", "Z ", "+05:30Z", "UTC", "+٠٥:٣٠"]),
    st.tuples(st.sampled_from("+-"), _TWO, _TWO).map(lambda p: f"{p[0]}{p[1]}:{p[2]}"),
)
_RFC3339_LIKE = st.builds(
    lambda year, month, day, sep, hour, minute, second, fraction, offset:
        f"{year}-{month}-{day}{sep}{hour}:{minute}:{second}{fraction}{offset}",
    _YEARS, st.sampled_from(["01", "02", "03", "12", "13", "00"]),
    st.sampled_from(["01", "28", "29", "30", "31", "32", "00"]), st.sampled_from(["T", "t", " ", "x", "TT"]),
    st.sampled_from(["00", "12", "23", "24"]), st.sampled_from(["00", "30", "59", "60"]),
    st.sampled_from(["00", "07", "59", "60", "6"]), _FRACTIONS, _OFFSETS,
)


def _mutate(text: str, rng: random.Random) -> str:
    position = rng.randrange(len(text) + 1)
    return text[:position] + rng.choice("0159:-+.TZz \u0663") + text[position + rng.randrange(2):]


_TIMESTAMPS = st.one_of(
    _RFC3339_LIKE,
    st.tuples(_RFC3339_LIKE, st.randoms(use_true_random=False)).map(lambda p: _mutate(*p)),
    st.text(max_size=40),
)


@settings(max_examples=3000, deadline=None)
@given(_TIMESTAMPS)
@example("2024-02-29T23:59:59.999999999Z")
@example("2023-02-29T00:00:00Z")
@example("2260-12-31T23:59:59.999Z")
@example("2260-12-31T23:59:59.999-00:01")
@example("1970-01-01T00:00:00+00:01")
@example("1969-12-31T23:59:59.9999995Z")
@example("2026-01-01T00:00:00-00:00")
@example("2026-01-01T00:00:00.Z")
@example("2026-01-01T00:00:00.123٤Z")
def test_fast_timestamps_equal_the_general_parser(text):
    fast = _fast_rfc3339_ms(text)
    full = rfc3339_ms(text)
    assert fast is None or fast == full, (text, fast, full)
    assert_same([message(timestamp=text), message(timestamp=text, value="1.5")])


@settings(max_examples=300, deadline=None)
@given(st.integers(-2, 12) | st.integers(-(10**20), 10**20)
       | st.sampled_from([0, 1, validation.MAX_TIMESTAMP_MS, validation.MAX_TIMESTAMP_MS + 1, -1, 2**63, 2**64]))
def test_epoch_millis_equal_the_general_rule(millis):
    assert_same([message(timestamp=millis), raw_message(f"{millis}.0"), raw_message(f"{millis}e0")])


# Values: signs, digits, points, exponents, quoted or raw, over every limit of Decimal(38, 18).
_VALUE_PARTS = st.builds(
    lambda sign, whole, point, fraction, exponent: f"{sign}{whole}{point}{fraction}{exponent}",
    st.sampled_from(["", "", "-", "+"]),
    st.one_of(st.text(st.sampled_from("0123456789"), max_size=25), st.sampled_from(["0", "1", "9" * 20, "1" + "0" * 20])),
    st.sampled_from(["", ".", "."]),
    st.one_of(st.text(st.sampled_from("0123456789"), max_size=22), st.just("0" * 18 + "1"), st.just("9" * 18)),
    st.sampled_from(["", "", "e3", "E-18", "e-19", "e+2", "e" + "9" * 20]),
)
_ODD_VALUES = st.sampled_from([
    "1e3", "-0", "0.000000000000000001", "0.0000000000000000001", "0.0000000000000000010", "1.0000000000000000000",
    "99999999999999999999.999999999999999999", "100000000000000000000", "0" * 40 + "1.5", ".5", "5.", ".", "",
    "1_000", "١٢", "1.٣", " 1", "1 ", "NaN", "Infinity", "-Infinity", "0x10", "1.2.3", "+.5e-3", "00000",
    "\\u0031", "1\\u002e5", "²", "18446744073709551616",
])


def _as_json(text: str, quoted: bool) -> str:
    """``text`` as a JSON string (its ``\\u`` escapes kept), or as a raw number when it is one."""
    if not quoted:
        try:
            json.loads(text)
            return text
        except ValueError:
            pass
    return f'"{text}"' if "\\u" in text else json.dumps(text)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(_VALUE_PARTS, _ODD_VALUES), st.booleans())
@example("1e3", True)
@example("-0", False)
@example("0.000000000000000001", False)
@example("99999999999999999999.999999999999999999", True)
@example("100000000000000000000.0", False)
def test_values_equal_the_general_rule(text, quoted):
    assert_same([raw_message(value=_as_json(text, quoted))])


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["true", "null", "[1]", "{}", '{"a": 1}', "[]", '"1"', "1", "-1.5", "[[[1]]]"]))
def test_other_json_values_equal_the_general_rule(value):
    assert_same([raw_message(value=value), raw_message(timestamp=value)])


_GENERATED = [record.value for record in generate(3_000, seed=11, start_ms=START_MS, organizations=20,
                                                  customers_per_org=50, malformed_share=0.05,
                                                  very_late_share=0.01)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=0, max_size=3),
                          st.sampled_from(["replace", "insert", "delete"])), max_size=4),
       st.integers(0, len(_GENERATED) - 1))
def test_mutated_generated_messages_equal_the_general_rule(mutations, index):
    raw = bytearray(_GENERATED[index])
    for position, data, kind in mutations:
        at = position % (len(raw) + 1)
        if kind == "replace":
            raw[at:at + len(data)] = data
        elif kind == "insert":
            raw[at:at] = data
        else:
            del raw[at:at + max(len(data), 1)]
    assert_same([bytes(raw), _GENERATED[index]])


def test_generated_traffic_equals_the_general_rule():
    assert_same(_GENERATED)


def test_nesting_at_and_past_the_limit_equals_the_general_rule():
    depth = validation.MAX_DEPTH
    nested = [message(properties=json.loads('{"a":' * n + "1" + "}" * n)) for n in (depth - 2, depth - 1, depth)]
    arrays = [raw_message(value="[" * n + "]" * n) for n in (depth - 2, depth - 1, depth)]
    braces_in_strings = [message(properties={"note": "{" * 100 + "[" * 100})]
    extra = [json.dumps({**BASE, "extra": json.loads("[" * n + "]" * n)}).encode() for n in (62, 63, 64, 70)]
    assert_same(nested + arrays + braces_in_strings + extra + [b" " + message(), b"{}", b"[", b"{", None, b""])


def test_timestamp_caches_start_afresh_and_stay_exact():
    """More distinct seconds and tails than the caches hold: every one still exact."""
    texts = [f"2026-03-{1 + n // 86_400 % 28:02d}T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}"
             f".{n % 1000:03d}{'Z' if n % 3 else '+05:30'}" for n in range(0, 3 * validation._CACHED * 7, 7)]
    assert [_fast_rfc3339_ms(text) for text in texts] == [rfc3339_ms(text) for text in texts]
    assert len(validation._second_ms) <= validation._CACHED and len(validation._tail_ms) <= validation._CACHED


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=20).filter(lambda s: s.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") == s),
       st.text(min_size=1, max_size=20).filter(lambda s: s.encode("utf-8", "surrogatepass").decode("utf-8", "ignore") == s))
def test_cached_digest_prefix_equals_transaction_digest(org, txn):
    intake = IntakeLogic("usage", 0, 1, 3, TumblingWindows(60_000), max_out_of_orderness_ms=0)
    raw = json.dumps({**BASE, "organization_id": org, "transaction_id": txn}).encode()
    for _ in range(2):  # the second time from the cache
        events = [e for events in intake.process([(0, None, raw, None)]).events_by_shard.values() for e in events]
        assert [e.digest for e in events] == [transaction_digest(org, txn)]
