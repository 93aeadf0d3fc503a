"""Fuzzing the intake: no message a producer can send raises, and every one is accounted for.

Two generators feed ``IntakeLogic.process`` in batches, the way the Kafka source does:

* a seeded mutator makes ``FUZZ_MESSAGES`` messages (100,000 by default) from valid events:
  byte flips, truncation, splices, deep nesting, huge numbers, odd Unicode, ids holding ``:``,
  ``%``, U+001F and control characters, wrong types, edge and far-future timestamps, lenient
  numeric strings, random bytes; with record timestamps around, before and far from the event;
* hypothesis builds structured messages (any JSON in any field), ``FUZZ_EXAMPLES`` of them.

For every batch: nothing raises; each record ends exactly once as an on-time event, a late
event or a dead letter (by its offset); every dead letter has a reason from ``REASONS`` and
goes through the DLQ encoding (header stripping, size fitting); every valid event has a
timestamp and value inside the documented ranges. Run more with
``FUZZ_MESSAGES=1000000 FUZZ_EXAMPLES=5000 pytest tests/test_intake_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import random
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operators.catalog import load_catalog_text
from operators.intake import IntakeLogic
from operators.validation import REASONS
from sinks.kafka_output import FIT_BYTES, dead_letter_record, late_event_record
from state.window_kinds import TumblingWindows

MESSAGES = int(os.environ.get("FUZZ_MESSAGES", "100000"))
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
BATCH = 2_000
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
LAST_MS = 9_183_110_399_999  # 2260-12-31T23:59:59.999Z: the README's last accepted event time
MAX_ABS_SCALED = 10**38 - 1  # Decimal(38, 18) scaled by 10**18
HOUR = 3_600_000

CATALOG = load_catalog_text("""
[[metric]]
name = "gb"
code = "storage"
aggregation = "sum"
field = "properties.usage.gb"
group_by = ["region", "tier"]

[[metric]]
name = "regions"
code = "storage"
aggregation = "unique_count"
field = "properties.region"

[[metric]]
name = "peak"
code = "api_calls"
aggregation = "max"
group_by = ["deep"]
""")

ODD_IDS = ["a:b", "a%3Ab", "%", "a\x1fb", "\x1f", "\x00", "\n\r\t", "\u202e\u200b", "é", "𝔘",
           "\U0001F600", ":", "1:", "a" * 256, " ", "\\", '"', "\x7f", "\ufeff", "ǅ"]
ODD_TIMESTAMPS = [
    "1969-12-31T23:59:59.9999995Z", "1970-01-01T00:00:00Z", "2026-01-31T23:59:59.9999995Z",
    "2260-12-31T23:59:59.999999Z", "2261-01-01T00:00:00Z", "9999-12-31T23:59:59.999Z",
    "2024-02-29T12:00:00+23:59", "2023-02-29T12:00:00Z", "2026-01-01t00:00:00z",
    "2026-01-01 00:00:00-0130", "2026-01-01T00:00:00", "2026-13-01T00:00:00Z", "0000-01-01T00:00:00Z",
    "2026-01-01T00:00:00.Z", "２０２６-01-01T00:00:00Z", "", "now", 0, -1, LAST_MS, LAST_MS + 1,
    2**63, -(2**63), 2**64, 1.5, 1e20, True, None, [], {},
]
ODD_VALUES = ["1_000", " 1 ", "١٢", "1e5 ", "+5", ".5", "1.", "-0", "NaN", "-Infinity", "1e400",
              "1e-19", "1e99999999999999999999", "9" * 21, "9" * 5000, "0." + "0" * 17 + "1",
              "99999999999999999999.999999999999999999",
              "\u0031", "", "e", 10**30, -(10**19), 2**64, 1e308, -1e-300, 0.1, True, None, [1], {"v": 1}]


def base_event(rng: random.Random, offset: int) -> dict:
    """A valid event (mostly), varied in every field the intake reads."""
    timestamp = START_MS + offset * 20 + rng.randrange(-8_000, 8_000)  # mostly in order
    event = {
        "transaction_id": f"t{rng.randrange(MESSAGES // 3 + 1)}",
        "organization_id": f"org{rng.randrange(20)}",
        "external_customer_id": f"c{rng.randrange(50)}",
        "code": rng.choice(("api_calls", "storage", "egress")),
        "timestamp": timestamp if rng.random() < 0.5 else _rfc3339(rng, timestamp),
        "value": rng.choice((rng.randrange(1000), f"{rng.randrange(10**6)}.{rng.randrange(10**6):06d}",
                             rng.random() * 100, None)),
        "properties": {"region": rng.choice(("eu", "us", 1.50, 7, None, True)),
                       "usage": {"gb": rng.choice((1, "2.5", 12345678.123456789, "x", None))},
                       "tier": rng.choice(("pro", {"name": "a", "n": [1, 2.5]}, ["x"], 0.1))},
    }
    if rng.random() < 0.1:
        del event["value"]
    return event


def _rfc3339(rng: random.Random, ms: int) -> str:
    """``ms`` as RFC 3339 text, in some offset, with 0 to 9 fraction digits past the millisecond."""
    suffix, offset_s = rng.choice((("Z", 0), ("z", 0), ("+00:00", 0), ("+05:30", 19_800), ("-0800", -28_800)))
    seconds, millis = divmod(ms, 1000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds + offset_s))
    fraction = rng.choice(("", f".{millis:03d}", f".{millis:03d}{rng.randrange(10**6):06d}"))
    return stamp + fraction + suffix


def nest(depth: int, leaf: str) -> str:
    return "[" * depth + leaf + "]" * depth if depth % 2 else '{"k":' * depth + leaf + "}" * depth


def mutate(rng: random.Random, event: dict, previous: bytes) -> bytes:
    """One hostile variation of ``event`` (or of the message before it)."""
    kind = rng.randrange(16)
    fields = list(event) or ["x"]
    if kind == 0:  # odd ids
        event[rng.choice(("transaction_id", "organization_id", "external_customer_id", "code"))] = (
            rng.choice(ODD_IDS) + rng.choice(("", str(rng.randrange(100)))))
    elif kind == 1:
        event["timestamp"] = rng.choice(ODD_TIMESTAMPS)
    elif kind == 2:
        event["value"] = rng.choice(ODD_VALUES)
    elif kind == 3:  # wrong types anywhere
        event[rng.choice(fields)] = rng.choice((None, 1, 1.5, True, [], {}, [1, "a"], {"a": 1}, "s"))
    elif kind == 4:  # a field removed
        event.pop(rng.choice(fields), None)
    elif kind == 5:  # deep nesting in a known or unknown field
        text = json.dumps(event, ensure_ascii=False)
        depth = rng.choice((rng.randrange(1, 70), rng.randrange(60, 3000)))
        target = rng.choice(("junk", "properties", "value", "timestamp"))
        inner = nest(depth, "1") if target != "properties" else '{"deep":' + nest(depth, "1") + "}"
        return (text[:-1] + f', "{target}": {inner}}}').encode()
    elif kind == 6:  # huge numbers as JSON numbers
        big = rng.choice(("9" * rng.randrange(20, 6000), "1e999999999", "-1e-999999999",
                          "1e99999999999999999999", "-1E-99999999999999999999",  # beyond any Decimal
                          "1" + "0" * 400 + ".5", "123456789012345678901234567890.123"))
        text = json.dumps(event)
        return (text[:-1] + f', "{rng.choice(("value", "timestamp", "properties"))}": '
                f'{big if rng.random() < 0.7 else "{" + chr(34) + "n" + chr(34) + ":" + big + "}"}}}').encode()
    elif kind == 7:  # JSON escapes (lone surrogates, escaped digits, NUL) in a key or an id
        text = json.dumps(event)
        before = rng.choice(('"t', ': "t'))  # the first key, or the transaction id's value
        escape = rng.choice(('\\ud800', '\\u0000', '\\udc00\\ud800', '\\u0661'))
        return text.replace(before, before[:-1] + escape + "t", 1).encode()
    raw = json.dumps(event, ensure_ascii=rng.random() < 0.5).encode()
    if kind == 8:  # byte flips
        data = bytearray(raw)
        for _ in range(rng.randrange(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    if kind == 9:  # truncation
        return raw[: rng.randrange(len(raw))]
    if kind == 10:  # splice with the previous message
        return raw[: rng.randrange(len(raw))] + previous[rng.randrange(len(previous) + 1):]
    if kind == 11:  # random bytes, invalid UTF-8, not an object
        return rng.choice((bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))),
                           b"\xff\xfe" + raw, b"[]", b"null", b'"s"', b"1", b" ", b"{}", b"{" * 5000))
    if kind == 12:  # a duplicate key overriding a valid field
        return raw[:-1] + b', "timestamp": ' + json.dumps(rng.choice(ODD_TIMESTAMPS)).encode() + b"}"
    if kind == 13:  # whitespace and a big padding field
        return b" \n" + raw[:-1] + b', "pad": "' + b"x" * (1_100_000 if rng.random() < 0.02 else rng.choice((10, 100_000))) + b'"}'
    return raw  # 14, 15: valid (keeps the stream's watermark and dedup busy)


def fuzz_records(rng: random.Random, first_offset: int, count: int) -> list[tuple]:
    records, previous = [], b"{}"
    for offset in range(first_offset, first_offset + count):
        event = base_event(rng, offset)
        value = mutate(rng, event, previous)
        previous = value
        record_ms = START_MS + offset * 20  # the producer's clock, while the stream is in order
        draw = rng.random()
        if draw < 0.01:
            record_ms = None  # no record timestamp: nothing to compare with
        elif draw < 0.1:
            record_ms = rng.choice((-1, record_ms - rng.randrange(2 * HOUR)))  # a clock behind
        headers = rng.choice((None, [], [("tallyflow.reason", b"forged")], [("x", b"\xff" * 10)]))
        key = rng.choice((None, b"k", bytes(rng.randrange(256) for _ in range(8))))
        records.append((offset, key, value, headers, record_ms))
    return records


def check_batch(intake: IntakeLogic, records: list[tuple]) -> dict:
    """Process ``records``; assert each one is accounted for exactly once. Returns the tally."""
    batch = intake.process(records)
    offsets = [r[0] for r in records]
    on_time = [e.offset for events in batch.events_by_shard.values() for e in events]
    late = [item[2].source_offset for items in batch.late_by_shard.values() for item in items]
    dead = [letter.source_offset for letter in batch.dead_letters]
    assert sorted(on_time + late + dead) == sorted(offsets)
    assert batch.consumed_count == len(records)
    assert batch.valid_count == len(on_time) + len(late)
    for letter in batch.dead_letters:
        assert letter.reason in REASONS, letter.reason
        out = dead_letter_record(letter)
        size = len(out.key or b"") + len(out.value or b"") + sum(len(k) + len(v) for k, v in out.headers)
        assert size <= FIT_BYTES
        assert [v for k, v in out.headers if k.lower() == "tallyflow.reason"] == [letter.reason.encode()]
    for events in batch.events_by_shard.values():
        for event in events:
            assert 0 <= event.timestamp_ms <= LAST_MS and -MAX_ABS_SCALED <= event.value_scaled <= MAX_ABS_SCALED
    for items in batch.late_by_shard.values():
        for _due, _digest, record in items:
            assert 0 <= record.timestamp_ms <= LAST_MS
            out = late_event_record(record)
            size = len(out.key or b"") + len(out.value or b"") + sum(len(k) + len(v) for k, v in out.headers)
            assert size <= FIT_BYTES
    reasons = {}
    for letter in batch.dead_letters:
        reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
    return {"on_time": len(on_time), "late": len(late), "dead": len(dead), **reasons}


def new_intake(partition: int = 0) -> IntakeLogic:
    return IntakeLogic("usage", partition, 2, shards=4, windows=TumblingWindows(60_000),
                       max_out_of_orderness_ms=10_000, catalog=CATALOG, max_future_skew_ms=HOUR)


def test_a_hundred_thousand_mutated_messages_are_each_accounted_for():
    rng = random.Random(20261130)
    tally: dict[str, int] = {}
    for first in range(0, MESSAGES, BATCH):
        intake = new_intake()  # a partition per batch: one event dated 2260 freezes only its own
        records = fuzz_records(rng, first, min(BATCH, MESSAGES - first))
        for name, count in check_batch(intake, records).items():
            tally[name] = tally.get(name, 0) + count
    assert tally["on_time"] + tally["late"] + tally["dead"] == MESSAGES
    # The mutator reaches every outcome and most reasons, so the run tests what it claims to.
    assert tally["on_time"] > MESSAGES // 10 and tally["late"] > 0
    reached = {reason for reason in REASONS if tally.get(reason)}
    assert reached == set(REASONS), set(REASONS) - reached


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.decimals(allow_nan=False, allow_infinity=False).map(str),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=12,
)
_field = st.one_of(st.text(max_size=12), st.sampled_from(ODD_IDS), _json)
_event = st.fixed_dictionaries(
    {},
    optional={"transaction_id": _field, "organization_id": _field, "external_customer_id": _field,
              "code": st.sampled_from(("api_calls", "storage")) | _field,
              "timestamp": st.integers(-(2**64), 2**64) | st.sampled_from(ODD_TIMESTAMPS) | _json,
              "value": st.sampled_from(ODD_VALUES) | _json,
              "properties": st.dictionaries(st.sampled_from(("region", "tier", "usage", "deep")), _json)
              | _json,
              "extra": _json},
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(st.tuples(_event, st.none() | st.integers(-(2**40), 2**42)), min_size=1, max_size=20),
       ensure_ascii=st.booleans())
def test_structured_messages_of_any_shape_are_each_accounted_for(events, ensure_ascii):
    records = [(offset, None, json.dumps(event, ensure_ascii=ensure_ascii).encode(), None, record_ms)
               for offset, (event, record_ms) in enumerate(events)]
    check_batch(new_intake(), records)
