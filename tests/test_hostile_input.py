"""Hostile input at the intake (issue 12): every message ends valid, late or dead-lettered.

Each test here is a regression for one way a producer could stop the flow or
blur two transactions; the expected values are written out by hand.
"""

import json

from operators.intake import IntakeLogic
from state.dedup import transaction_digest
from state.window_kinds import TumblingWindows

MINUTE = 60_000


def event(org="org", txn="t1", timestamp=1_000_000, **extra) -> bytes:
    return json.dumps({"transaction_id": txn, "organization_id": org, "external_customer_id": "c",
                       "code": "api_calls", "timestamp": timestamp, **extra}).encode()


def intake(**options) -> IntakeLogic:
    return IntakeLogic("usage", 0, 1, shards=1, windows=TumblingWindows(MINUTE),
                       max_out_of_orderness_ms=0, **options)


def test_digest_separates_ids_that_contain_the_old_separator():
    assert transaction_digest("a\x1fb", "c") != transaction_digest("a", "b\x1fc")
    assert transaction_digest("a:1", "2") != transaction_digest("a", "1:2")
    assert transaction_digest("1:a", "") != transaction_digest("", "1:a")


def test_intake_digest_is_transaction_digest_for_any_characters():
    pairs = [("a\x1fb", "c"), ("a", "b\x1fc"), ("1:", "x"), ("é%3A", "\u2028"), ("org", "t1")]
    records = [(i, None, event(org, txn), None) for i, (org, txn) in enumerate(pairs)]
    batch = intake().process(records)
    digests = [e.digest for e in batch.events_by_shard[0]]
    assert digests == [transaction_digest(org, txn) for org, txn in pairs]
    assert len(set(digests)) == len(pairs)


# --- deep nesting (issue 12 item 1) ------------------------------------------

from datetime import datetime, timezone  # noqa: E402
from decimal import Decimal  # noqa: E402

import pytest  # noqa: E402

from operators.catalog import load_catalog_text  # noqa: E402
from operators.validation import MAX_DEPTH, Invalid, UsageEvent, validate  # noqa: E402

SCALE = 10**18


def nested(depth: int, leaf: str = "1") -> str:
    """``depth`` levels of arrays and objects around ``leaf`` (the outermost is level 1)."""
    text = leaf
    for level in range(depth):
        text = f'{{"k":{text}}}' if level % 2 else f"[{text}]"
    return text


def with_raw_field(name: str, json_text: str, **fields) -> bytes:
    body = event(**fields).decode()
    return (body[:-1] + f',"{name}":{json_text}}}').encode()


def test_an_unknown_field_nested_1000_deep_goes_to_the_dlq():
    raw = with_raw_field("junk", nested(1000))
    assert len(raw) < 8_000
    result = validate(raw)
    assert isinstance(result, Invalid) and result.reason == "too_deeply_nested"
    batch = intake().process([(7, b"k", raw, [])])
    assert [(d.reason, d.source_offset) for d in batch.dead_letters] == [("too_deeply_nested", 7)]


def test_depth_limit_is_exact_and_ignores_brackets_inside_strings():
    assert isinstance(validate(with_raw_field("junk", nested(MAX_DEPTH - 1))), UsageEvent)
    assert validate(with_raw_field("junk", nested(MAX_DEPTH))).reason == "too_deeply_nested"
    assert isinstance(validate(event(note="[{" * 5000)), UsageEvent)


GROUPED = load_catalog_text('[[metric]]\nname = "n"\ncode = "api_calls"\naggregation = "count"\n'
                            'group_by = ["deep"]\n')


@pytest.mark.parametrize("depth", [40, 900])
def test_deep_properties_with_a_catalog_never_raise(depth):
    raw = event(properties={"deep": 0}).replace(b'"deep": 0', f'"deep": {nested(depth)}'.encode())
    batch = intake(catalog=GROUPED).process([(0, None, raw, None)])
    if depth < MAX_DEPTH:
        [counted] = batch.events_by_shard[0]
        [(_index, (group,), _value)] = counted.metric_values
        assert group.count("[") + group.count("{") == depth
    else:
        assert [d.reason for d in batch.dead_letters] == ["too_deeply_nested"]


# --- strict numeric strings, exact property numbers (issue 12) ---------------

@pytest.mark.parametrize("text", ["1_000", " 1 ", "1 ", "١٢", "1e5 ", "+", "-", ".", "e5", "0x10",
                                  "1,5", "½", "１", "Infinity", "-NaN", "1e", ""])
def test_numeric_strings_outside_strict_decimal_syntax_are_invalid(text):
    assert validate(event(value=text)).reason == "invalid_value"


@pytest.mark.parametrize("text, scaled", [
    ("+5", 5 * SCALE), ("1.", SCALE), (".5", SCALE // 2), ("-1e3", -1000 * SCALE),
    ("00012.50", 125 * SCALE // 10), ("1E-18", 1), ("99999999999999999999", (10**20 - 1) * SCALE),
])
def test_strict_decimal_strings_are_exact(text, scaled):
    assert validate(event(value=text)).value_scaled == scaled


def test_an_escaped_numeric_string_reads_as_its_characters():
    raw = event(value="X").replace(b'"X"', b'"\\u0031\\u0032"')
    assert validate(raw).value_scaled == 12 * SCALE
    arabic = event(value="X").replace(b'"X"', b'"\\u0661"')
    assert validate(arabic).reason == "invalid_value"


SUMMED = load_catalog_text('[[metric]]\nname = "gb"\ncode = "api_calls"\naggregation = "sum"\n'
                           'field = "properties.gb"\ngroup_by = ["tier"]\n')


@pytest.mark.parametrize("number_text, scaled, tier_text, group", [
    ("12345678.123456789", 12345678123456789 * 10**9, "1.50", "1.5"),
    ("0.000000000000000001", 1, "2", "2"),
    ("98765432109876543.21", 9876543210987654321 * 10**16, '{"b":1.10,"a":"x"}', '{"a":"x","b":1.10}'),
])
def test_property_numbers_keep_their_exact_decimal_value_to_the_catalog(number_text, scaled,
                                                                      tier_text, group):
    raw = (event()[:-1] + f', "properties": {{"gb": {number_text}, "tier": {tier_text}}}}}'
           .encode())
    batch = intake(catalog=SUMMED).process([(0, None, raw, None)])
    [counted] = batch.events_by_shard[0]
    assert counted.metric_values == [(0, (group,), scaled)]


def test_property_numeric_strings_follow_the_strict_syntax_too():
    raw = event(properties={"gb": "1_000", "tier": "a"})
    batch = intake(catalog=SUMMED).process([(0, None, raw, None)])
    assert batch.events_by_shard[0][0].metric_values == [] and batch.metric_field_missing == 1

# A number whose exponent has 19 digits or more is valid JSON that no Decimal can hold (Python's
# decimal raises InvalidOperation); one in `value` or `properties` used to raise out of validate.
HUGE_EXPONENT = "1e" + "9" * 20


@pytest.mark.parametrize("where, written, reason", [
    ("value", HUGE_EXPONENT, "invalid_value"),
    ("value", f'"{HUGE_EXPONENT}"', "invalid_value"),
    ("value", "-" + HUGE_EXPONENT.replace("e", "e-"), "invalid_value"),
    ("properties", f'{{"gb": {HUGE_EXPONENT}}}', "invalid_properties"),
    ("properties", f'{{"tier": [1, {{"x": -{HUGE_EXPONENT}}}]}}', "invalid_properties"),
    ("properties", '{"gb": 1' + "0" * 4_400 + "}", "invalid_properties"),  # past msgspec's int range
    ("timestamp", HUGE_EXPONENT, "invalid_timestamp"),
    ("junk", HUGE_EXPONENT, None),  # unknown fields are ignored, whatever they hold
    ("junk", "9" * 5_000, None),
], ids=["value", "value-text", "value-negative", "property", "property-deep", "property-int-4401-digits",
        "timestamp", "unknown", "unknown-int-5000-digits"])
def test_numbers_no_decimal_can_hold_are_dead_lettered_not_raised(where, written, reason):
    raw = event(txn="huge")[:-1] + f', "{where}": {written}}}'.encode()
    batch = intake(catalog=SUMMED).process([(0, None, raw, None)])
    if reason is None:
        assert [e.transaction_id for e in batch.events_by_shard[0]] == ["huge"]
    else:
        assert [d.reason for d in batch.dead_letters] == [reason]


# --- timestamps: truncated to the millisecond, accepted 1970..2260 ------------

def ms(text: str) -> int:
    """The oracle: Python's datetime, milliseconds by integer arithmetic on microseconds."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400_000_000 + delta.seconds * 1_000_000 + delta.microseconds) // 1000


@pytest.mark.parametrize("text, expected", [
    ("2026-01-31T23:59:59.9999995Z", "2026-01-31T23:59:59.999Z"),
    ("2026-12-31T23:59:59.99999999999Z", "2026-12-31T23:59:59.999Z"),
    ("2026-03-01T00:00:00.0009Z", "2026-03-01T00:00:00.000Z"),
    ("2026-03-01T01:00:00.1239+01:00", "2026-03-01T00:00:00.123Z"),
    ("2024-02-29t23:59:59.5z", "2024-02-29T23:59:59.500Z"),
    ("2026-03-01 00:00:00.25-0130", "2026-03-01T01:30:00.250Z"),
])
def test_sub_millisecond_digits_are_truncated_never_rounded(text, expected):
    assert validate(event(timestamp=text)).timestamp_ms == ms(expected)


@pytest.mark.parametrize("text", [
    "1969-12-31T23:59:59.9999995Z", "1969-12-31T23:59:59.999Z", "1970-01-01T00:30:00+01:00",
    "2261-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z", "2023-02-29T00:00:00Z", "2026-04-31T00:00:00Z",
    "2026-01-01T24:00:00Z", "2026-01-01T00:00:60Z", "2026-01-01T00:00:00+24:00", "2026-01-01T00:00Z",
    "0000-01-01T00:00:00Z", "２０２６-01-01T00:00:00Z", "2026-01-01T00:00:00.Z",
])
def test_timestamps_outside_1970_to_2260_or_not_rfc3339_are_invalid(text):
    assert validate(event(timestamp=text)).reason == "invalid_timestamp"


def test_the_accepted_range_ends_with_2260():
    last = ms("2260-12-31T23:59:59.999Z")
    assert validate(event(timestamp="2260-12-31T23:59:59.999999Z")).timestamp_ms == last
    assert validate(event(timestamp=last)).timestamp_ms == last
    assert validate(event(timestamp=last + 1)).reason == "invalid_timestamp"
    assert validate(event(timestamp=0)).timestamp_ms == 0
    assert validate(event(timestamp=-1)).reason == "invalid_timestamp"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from operators.validation import _RFC3339, _rfc3339_match_ms, rfc3339_ms  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2300, 1, 1)),
       digits=st.text("0123456789", max_size=12), offset_minutes=st.integers(-23 * 60 - 59, 23 * 60 + 59),
       separator=st.sampled_from("Tt "), zulu=st.booleans(), colon=st.booleans())
def test_both_timestamp_readers_agree_with_the_oracle(moment, digits, offset_minutes, separator,
                                                      zulu, colon):
    """The fast reader (datetime.fromisoformat) and the written-out rule give one answer."""
    sign = "-" if offset_minutes < 0 else "+"
    hours, minutes = divmod(abs(offset_minutes), 60)
    offset = "Z" if zulu else f"{sign}{hours:02d}{':' if colon else ''}{minutes:02d}"
    fraction = f".{digits}" if digits else ""
    text = moment.strftime(f"%Y-%m-%d{separator}%H:%M:%S") + fraction + offset
    expected = ms(moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{digits[:6]}" if digits else "") + "+00:00")
    expected -= 0 if zulu else (-1 if sign == "-" else 1) * (hours * 3600 + minutes * 60) * 1000
    assert rfc3339_ms(text) == expected
    assert _rfc3339_match_ms(text, _RFC3339.fullmatch(text)) == expected


# --- MAX_FUTURE_SKEW: event time against the Kafka record's timestamp --------

HOUR = 3_600_000
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def test_events_too_far_ahead_of_their_record_timestamp_go_to_the_dlq():
    logic = intake(max_future_skew_ms=HOUR)
    batch = logic.process([
        (0, b"k", event(txn="edge", timestamp=START_MS + HOUR), [], START_MS),     # exactly 1 h: fine
        (1, b"k", event(txn="ahead", timestamp=START_MS + HOUR + 1), [], START_MS),
        (2, b"k", event(txn="no-ts", timestamp=START_MS + 9 * HOUR), [], None),  # nothing to compare
    ])
    assert [(d.source_offset, d.reason) for d in batch.dead_letters] == [(1, "future_timestamp")]
    assert "MAX_FUTURE_SKEW" in batch.dead_letters[0].detail
    assert [e.transaction_id for e in batch.events_by_shard[0]] == ["edge", "no-ts"]
    assert batch.valid_count == 2 and batch.consumed_count == 3


def test_one_event_dated_far_ahead_does_not_freeze_its_partition():
    """Issue 12 item 5: an event dated 2200 jumped the watermark; every later event was late."""
    logic = intake(max_future_skew_ms=HOUR)
    far = int(datetime(2200, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
    first = logic.process([(0, None, event(txn="a", timestamp=START_MS), None, START_MS),
                           (1, None, event(txn="far", timestamp=far), None, START_MS + 1)])
    second = logic.process([(2, None, event(txn="b", timestamp=START_MS + 61_000), None, START_MS + 61_000)])
    assert [d.reason for d in first.dead_letters] == ["future_timestamp"]
    assert logic.watermark.max_event_ms == START_MS + 61_000
    assert [e.transaction_id for e in second.events_by_shard[0]] == ["b"] and not second.late_by_shard


def test_max_future_skew_off_keeps_far_future_events():
    logic = intake(max_future_skew_ms=None)
    batch = logic.process([(0, None, event(timestamp=START_MS + 100 * HOUR), None, START_MS)])
    assert batch.valid_count == 1 and not batch.dead_letters


# --- end to end: the real broker, the real flow ------------------------------

from confluent_kafka import Producer  # noqa: E402

from deploy.broker import ensure_topic  # noqa: E402
from deploy.runner import run_flow  # noqa: E402
from sinks.clickhouse_backend import connect  # noqa: E402
from sinks.kafka_output import FIT_BYTES  # noqa: E402
from support.flow import flow_env, read_output  # noqa: E402
from support.kafka import read_all, unique_topic  # noqa: E402

BIG = b'{"transaction_id":"' + b"9" * 1_200_000  # an invalid record of 1.2 MB (unterminated)


@pytest.mark.integration
def test_hostile_records_reach_the_dlq_and_the_flow_counts_the_rest(kafka_broker, chdb_url, tmp_path):
    catalog_file = tmp_path / "metrics.toml"
    catalog_file.write_text('[[metric]]\nname = "gb"\ncode = "storage"\naggregation = "sum"\n'
                            'field = "properties.gb"\ngroup_by = ["tier"]\n')
    exact = b'{"gb": 12345678.123456789, "tier": 1.50}'
    topic, dlq_topic = unique_topic("usage"), unique_topic("dlq")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    ensure_topic(kafka_broker.bootstrap, dlq_topic, 1)
    far = int(datetime(2200, 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
    sent = [  # (value, record timestamp, headers)
        (event(txn="a", timestamp=START_MS + 10_000), START_MS + 10_000, []),
        (event(txn="far", timestamp=far), START_MS + 20_000,
         [("tallyflow.reason", b"forged"), ("Tallyflow.Source.Offset", b"0"), ("trace", b"kept")]),
        (BIG, START_MS + 30_000, []),
        (event(txn="b", timestamp=START_MS + 70_000), START_MS + 70_000, []),
        (with_raw_field("junk", nested(1000), txn="deep"), START_MS + 71_000, []),
        (event(org="a\x1fb", txn="c", timestamp=START_MS + 72_000), START_MS + 72_000, []),
        (event(org="a", txn="b\x1fc", timestamp=START_MS + 73_000), START_MS + 73_000, []),
        (event(txn="gb1", code="storage", timestamp=START_MS + 74_000, properties="P").replace(
            b'"P"', exact), START_MS + 74_000, []),
        (event(txn="gb2", code="storage", timestamp=START_MS + 75_000, properties="P").replace(
            b'"P"', exact.replace(b"1.50", b"15e-1")), START_MS + 75_000, []),
    ]
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap, "message.max.bytes": 2_000_000})
    for value, timestamp, headers in sent:
        producer.produce(topic, value, b"key", partition=0, timestamp=timestamp, headers=headers)
    assert producer.flush(30) == 0

    run_flow(flow_env(kafka_broker.bootstrap, topic, dlq_topic, chdb_url,
                      METRICS_FILE=str(catalog_file)), timeout=300)

    counts = {(org, code, start - START_MS): count for (org, _c, code, start), (count, _t)
              in read_output(chdb_url).aggregates.items()}
    assert counts == {("org", "api_calls", 0): 1, ("org", "api_calls", 60_000): 1,
                      ("a\x1fb", "api_calls", 60_000): 1, ("a", "api_calls", 60_000): 1,
                      ("org", "storage", 60_000): 2}
    backend = connect(chdb_url)
    try:
        _, rows = backend.query("SELECT group_key, event_count, toString(value) FROM metric_aggregates FINAL")
    finally:
        backend.close()
    # Every digit of the property survives, and 1.50 and 15e-1 are one group.
    assert [tuple(r) for r in rows] == [('{"tier":"1.5"}', 2, "24691356.246913578")]
    letters = {int(dict(m.headers())["tallyflow.source.offset"]): m
               for m in read_all(kafka_broker.bootstrap, dlq_topic)}
    reasons = {offset: dict(m.headers())["tallyflow.reason"] for offset, m in letters.items()}
    assert reasons == {1: b"future_timestamp", 2: b"malformed_json", 4: b"too_deeply_nested"}
    forged = letters[1].headers()
    assert [h for h in forged if h[0].lower().startswith("tallyflow.reason")] == [
        ("tallyflow.reason", b"future_timestamp")]
    assert ("trace", b"kept") in forged and letters[1].value() == sent[1][0]
    big = letters[2]
    assert big.value() == BIG[: len(big.value())] and len(big.value()) > FIT_BYTES - 2_000
    assert dict(big.headers())["tallyflow.original.size"] == str(len(BIG)).encode()
    assert dict(big.headers())["tallyflow.truncated"] == b"value"


# --- headers librdkafka cannot hand to Python --------------------------------

from recovery.kafka_source import UsagePartition  # noqa: E402


class _Message:
    """A consumed record; ``headers()`` raises like confluent-kafka's for a name that is not UTF-8."""

    def __init__(self, offset: int, value: bytes, headers_error: bool):
        self._offset, self._value, self._headers_error = offset, value, headers_error

    def error(self):
        return None

    def offset(self):
        return self._offset

    def key(self):
        return b"k"

    def value(self):
        return self._value

    def timestamp(self):
        return 1, START_MS + self._offset

    def headers(self):
        if self._headers_error:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return [("trace", b"kept")]


class _Consumer:
    def __init__(self, messages):
        self._messages = messages

    def assign(self, partitions):
        pass

    def consume(self, count, timeout):
        messages, self._messages = self._messages, []
        return messages

    def get_watermark_offsets(self, partition, timeout=None, cached=False):
        return 0, 3


def test_a_record_whose_headers_cannot_be_read_is_judged_by_its_value():
    messages = [_Message(0, event(txn="a", timestamp=START_MS), headers_error=True),
                _Message(1, b"{oops", headers_error=True),
                _Message(2, b"{oops", headers_error=False)]
    source = UsagePartition(_Consumer(messages), "usage", 0, intake(), None, batch_size=10,
                            stop_at_end=False)
    [batch] = source.next_batch()
    assert [e.transaction_id for e in batch.events_by_shard[0]] == ["a"]
    assert [(d.source_offset, d.reason, d.headers) for d in batch.dead_letters] == [
        (1, "malformed_json", []), (2, "malformed_json", [("trace", b"kept")])]


# --- the flow, reconcile and the README agree on hostile messages -------------

from oracle.decode import decode as readme_decode  # noqa: E402
from recovery.reconcile.decoding import decode as reconcile_decode  # noqa: E402

HOSTILE = {  # name -> what is spliced into a valid event (before its closing brace)
    "lone surrogate in an id": b', "organization_id": "\\ud800"',
    "lone surrogate in an unknown field": b', "junk": "a\\udc00"',
    "lone surrogate in a key": b', "\\ud800": 1',
    "lone surrogate in properties": b', "properties": {"tier": "\\ud800"}',
    "an escaped surrogate pair": b', "organization_id": "\\ud83d\\ude00"',
    "an escaped backslash before u": b', "organization_id": "\\\\ud800"',
    "a huge exponent in value": b', "value": 1e99999999999999999999',
    "a huge exponent in a value string": b', "value": "-1e99999999999999999999"',
    "a huge exponent in properties": b', "properties": {"gb": [1e99999999999999999999]}',
    "a huge exponent in an unknown field": b', "junk": 1e99999999999999999999',
    "an int of 4,301 digits in properties": b', "properties": {"gb": ' + b"9" * 4_301 + b"}",
    "an int of 4,301 digits in an unknown field": b', "junk": ' + b"9" * 4_301,
    "an int of 4,300 digits in properties": b', "properties": {"gb": ' + b"9" * 4_300 + b"}",
    "null properties": b', "properties": null',
    "NaN in an unknown field": b', "junk": NaN',
    # A field named twice: the last value counts, but every occurrence must have the field's type.
    "a float timestamp given before an integer one": b', "timestamp": 1.5, "timestamp": 1000000',
    "an escaped name repeating timestamp": b', "time\\u0073tamp": 1.5, "timestamp": 1000000',
    "an id given first as a number": b', "organization_id": 7, "organization_id": "org"',
    "an id given first empty": b', "code": "", "code": "api_calls"',
    "properties given first as a list": b', "properties": [], "properties": {}',
    "properties given first with a huge number": b', "properties": {"a": 1e99999999999999999999}, "properties": {}',
    "a value given first as text": b', "value": "x", "value": 1',
    "a timestamp given first out of range": b', "timestamp": "2999-01-01T00:00:00Z", "timestamp": 1000000',
}


@pytest.mark.parametrize("name", HOSTILE)
def test_the_flow_reconcile_and_the_readme_oracle_read_hostile_messages_alike(name):
    raw = event(txn=name)[:-1] + HOSTILE[name] + b"}"
    flow = validate(raw)
    readme = readme_decode(raw)
    flow_reason = flow.reason if isinstance(flow, Invalid) else "valid"
    assert flow_reason == (readme if isinstance(readme, str) else "valid")
    assert (reconcile_decode(raw) is not None) == (flow_reason == "valid")
