"""The compiled intake (``operators/_fastintake.c``) against the pure-Python intake, batch for batch.

``IntakeLogic.process_columns`` runs the compiled ``scan`` when ``make install`` built it and
the pure-Python loop otherwise. ``scan`` either finishes a message exactly as Python would or
leaves it to Python, so both paths must give equal batches (every on-time event with its
digest, value, watermark and offset; every late record and dead letter) and leave the same
watermark, for any messages in any poll split. The inputs: the intake fuzzer's mutated and
hypothesis-built messages, every field at its limits (timestamps of every RFC 3339 shape and
the accepted range's ends, values of 38 digits, ids of 256 characters), and billing traffic of
the bench's high-cardinality profile.
"""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_intake_fuzz import CATALOG, HOUR, ODD_IDS, ODD_TIMESTAMPS, ODD_VALUES, START_MS, base_event, fuzz_records, mutate

import operators.intake as intake_module
from operators.catalog import Catalog
from operators.intake import IntakeLogic
from state.window_kinds import SlidingWindows, TumblingWindows

COMPILED = intake_module._compiled_scan()
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))

if COMPILED is None and os.environ.get("CI"):
    pytest.fail("operators/_fastintake.c was not built: `make install` builds it", pytrace=False)
pytestmark = pytest.mark.skipif(COMPILED is None, reason="the compiled intake is not built (make install)")


def run_both(make_intake, polls: list[list[tuple]], monkeypatch) -> list:
    """Each poll through a pure-Python intake and a compiled one; assert equal batches and watermarks."""
    pure, compiled = make_intake(), make_intake()
    results = []
    for records in polls:
        monkeypatch.setattr(intake_module, "_fast_scan", None)
        expected = pure.process(records)
        monkeypatch.setattr(intake_module, "_fast_scan", COMPILED)
        got = compiled.process(records)
        assert got == expected
        assert compiled.watermark.max_event_ms == pure.watermark.max_event_ms
        results.append(got)
    return results


def fuzz_intake(shards: int = 4, skew: int | None = HOUR, catalog: Catalog | None = CATALOG,
                windows=TumblingWindows(60_000), lateness: int = 0) -> IntakeLogic:
    return IntakeLogic("usage", 0, 2, shards=shards, windows=windows, max_out_of_orderness_ms=10_000,
                       catalog=catalog, max_future_skew_ms=skew, allowed_lateness_ms=lateness)


def split(records: list, rng: random.Random) -> list[list]:
    """``records`` cut into polls of random sizes (1 to 700)."""
    polls, start = [], 0
    while start < len(records):
        size = rng.randrange(1, 700)
        polls.append(records[start:start + size])
        start += size
    return polls


def test_the_compiled_scan_is_what_the_intake_uses():
    assert intake_module._fast_scan is COMPILED


def test_scan_refuses_columns_shorter_than_the_values():
    """It reads each value's offset and record time by position: a short column is an error, not
    a read past its end."""
    def scan(values, offsets, record_times):
        return COMPILED(values, offsets, 0, record_times, 0, 60_000, 60_000, 0, 0, {}, hash, tuple, None, [[]])

    with pytest.raises(ValueError, match="fewer offsets"):
        scan([b"{}", b"{}"], [0], None)
    with pytest.raises(ValueError, match="record times"):
        scan([b"{}"], [0], [])
    assert scan([b"{}"], [0], [(0, 0)]) == (0, 0)  # matching columns: the message is left to Python


def test_a_build_of_another_version_is_not_used(monkeypatch):
    """A stale build (``make install`` not run since ``operators/_fastintake.c`` changed) is left
    aside: its ``scan`` may take other arguments."""
    from operators import _fastintake
    monkeypatch.setattr(_fastintake, "INTERFACE", intake_module._INTERFACE - 1)
    assert intake_module._compiled_scan() is None


@pytest.mark.parametrize("seed", range(4))
def test_mutated_messages_give_the_same_batches(seed, monkeypatch):
    rng = random.Random(seed)
    records = fuzz_records(rng, 0, 6_000)
    shapes = [dict(), dict(skew=None), dict(catalog=None, shards=1), dict(windows=SlidingWindows(60_000, 20_000),
                                                                          lateness=5_000)]
    results = run_both(lambda: fuzz_intake(**shapes[seed]), split(records, rng), monkeypatch)
    valid = sum(batch.valid_count for batch in results)  # on time, or late once a far-future event passed
    assert valid > 600 and sum(len(batch.dead_letters) for batch in results) > 600  # both kinds reached


def _shaped_timestamp(rng: random.Random, ms: int) -> str:
    """``ms`` as RFC 3339 text of any usual shape: 0 to 12 fraction digits, ``T``/``t``/space,
    ``Z``/``z`` or an offset from -23:59 to +23:59 (the text then names the same instant)."""
    offset_minutes = rng.choice((0, 0, 1, -1, 330, -210, 23 * 60 + 59, -(23 * 60 + 59)))
    local_ms = ms + offset_minutes * 60_000
    seconds, millis = divmod(local_ms, 1000)
    digits = rng.randrange(13)
    fraction = f"{millis:03d}{rng.randrange(10**9):09d}"[:digits]
    if digits and digits < 3:
        fraction = fraction.rstrip("0") or "0"  # fewer digits name the same ms only when the rest are 0
        ms -= millis % 10 ** (3 - len(fraction))
    stamp = time.strftime(f"%Y-%m-%d{rng.choice('Tt ')}%H:%M:%S", time.gmtime(seconds))
    sign = "+" if offset_minutes >= 0 else "-"
    zone = rng.choice(("Z", "z")) if not offset_minutes and rng.random() < 0.7 else \
        f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
    return stamp + (f".{fraction}" if digits else "") + zone


def _plain_event(rng: random.Random, offset: int) -> dict:
    """An event the compiled path finishes: ASCII ids, a usual timestamp, a plain value."""
    event = base_event(rng, offset)
    if isinstance(event["timestamp"], str):
        event["timestamp"] = _shaped_timestamp(rng, START_MS + offset * 20 + rng.randrange(-8_000, 8_000))
    event["properties"] = {"region": rng.choice(("eu", "us")), "n": rng.choice((1, 2.5, [1, {"a": None}]))}
    event["value"] = rng.choice((rng.randrange(10**6), f"{rng.randrange(10**6)}.{rng.randrange(10**6):06d}", None,
                                 "9" * 20 + "." + "9" * 18, 99999999999999.5, 0, "0.000000000000000001"))
    return event


def test_usual_events_are_finished_by_the_compiled_path(monkeypatch):
    """Most of a stream of usual events never reaches the Python path, and gives the same batches."""
    rng = random.Random(7)
    records = [(offset, None, json.dumps(_plain_event(rng, offset)).encode(), None, START_MS + offset * 20)
               for offset in range(5_000)]
    calls = []
    python_span = IntakeLogic._intake_span

    def counted_span(self, *args):
        if intake_module._fast_scan is not None:
            calls.append(args[-3:-1])
        return python_span(self, *args)

    monkeypatch.setattr(IntakeLogic, "_intake_span", counted_span)
    batches = run_both(lambda: fuzz_intake(catalog=None), split(records, rng), monkeypatch)
    assert len(calls) < 150  # the first event, new organizations (20) and late events
    events = [event for batch in batches[1:] for events in batch.events_by_shard.values() for event in events]
    # events of one organization or code share one str (its hash computed once downstream)
    assert len({id(event.organization_id) for event in events}) <= 2 * len({event.organization_id for event in events})
    assert len({id(event.code) for event in events}) <= 2 * len({event.code for event in events})


_LIMIT_TIMESTAMPS = [
    0, 9_183_110_399_999, 9_183_110_400_000, 10**16, 10**17, "1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000Z",
    "1969-12-31T23:59:59.999Z", "1970-01-01T00:00:00+00:01", "1970-01-01T00:01:00+00:01",
    "2260-12-31T23:59:59.999Z", "2260-12-31T23:59:59.9999999999Z", "2261-01-01T00:00:00Z",
    "2260-12-31T23:59:59.999-00:01", "2024-02-29T00:00:00Z", "2100-02-29T00:00:00Z", "2000-02-29T00:00:00Z",
    "2026-04-31T00:00:00Z", "2026-12-31T23:59:60Z", "2026-01-01T24:00:00Z", "2026-01-01T00:60:00Z",
    "2026-01-01T00:00:00.5Z", "2026-01-01T00:00:00.05Z", "2026-01-01T00:00:00.+01:00", "2026-01-01T00:00:00+24:00",
    "2026-01-01T00:00:00+23:60", "2026-01-01T00:00:00-23:59", "2026-01-01T00:00:00+01:00Z", "2026-01-01T00:00:00ZZ",
    "2026-01-01T00:00:00 Z", "2026-1-01T00:00:00Z", "2026-01-01T00:00:00.123456789012345678901234567890Z",
    "2026-01-01T00:00:00.１Z", "2026-01-01x00:00:00Z", "+2026-01-01T00:00:00Z", "2026-01-01T00:00:00z",
    "2026-01-01 00:00:00+05:30", "2026-01-01T00:00:00-0000", 1.0, -0, "0", 1767225600000.0, 17672256000001e-1,
]
_LIMIT_VALUES = [
    0, 1, "0", "00", "0.0", ".5", "5.", ".", "", "1" * 19, "1" * 20, "1" * 21, "9" * 20 + "." + "9" * 18,
    "9" * 21 + "." + "9" * 17, "0" * 30 + "1." + "1" * 18, "1." + "1" * 19, "0." + "0" * 17 + "1", "+1", "-1", "1e3",
    "1E3", " 1", "1 ", "1.2.3", "\u0661", 12.5, 0.000000000000000001, 1e-19, 123456789012345678, 10**19, 10**20,
    10**21, -5, None, True, [], {}, "null", 99999999999999999999.999999999999999999, 100000000000000000000,
]
_LIMIT_IDS = ["a", "a" * 256, "a" * 257, "a:b%c", " ", "~", "\x7f", "\x1f", "é", '"', "\\", "a\u2028", ""]


def test_fields_at_their_limits_give_the_same_batches(monkeypatch):
    rng = random.Random(11)
    records = []
    for offset in range(6_000):
        event = _plain_event(rng, offset)
        draw = rng.randrange(4)
        if draw == 0:
            event["timestamp"] = rng.choice(_LIMIT_TIMESTAMPS)
        elif draw == 1:
            event["value"] = rng.choice(_LIMIT_VALUES)
        elif draw == 2:
            event[rng.choice(("transaction_id", "organization_id", "external_customer_id", "code"))] = rng.choice(_LIMIT_IDS)
        raw = json.dumps(event, ensure_ascii=rng.random() < 0.5).encode()
        if rng.random() < 0.1:  # whitespace around tokens, a repeated field, nesting in properties
            raw = rng.choice((raw.replace(b":", b" :\t", 3).replace(b",", b"\r\n,", 2),
                              raw[:-1] + b',"code":"x"}', raw[:-1] + b',"junk":' + b"[" * 20 + b"]" * 20 + b"}",
                              raw.replace(b'"properties": {', b'"properties": {"d":' + b"{" * 15 + b"}" * 15 + b",", 1)))
        records.append((offset, None, raw, None, rng.choice((None, -1, START_MS + offset * 20, START_MS - HOUR))))
    run_both(fuzz_intake, split(records, rng), monkeypatch)


def test_high_cardinality_traffic_gives_the_same_batches(monkeypatch):
    """The bench's billing-like stream (2% duplicates, malformed and very late events)."""
    from deploy.generator import generate

    rng = random.Random(3)
    records = [(offset, record.key, record.value, None, START_MS) for offset, record in enumerate(generate(
        20_000, seed=5, partitions=1, start_ms=START_MS, organizations=200, customers_per_org=5_000,
        duplicate_share=0.02, malformed_share=0.001, very_late_share=0.001))]
    run_both(lambda: fuzz_intake(shards=16, catalog=None), split(records, rng), monkeypatch)


_ascii_id = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=6) | st.sampled_from(ODD_IDS)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.function_scoped_fixture])
@given(events=st.lists(st.fixed_dictionaries(
    {"transaction_id": _ascii_id, "organization_id": st.sampled_from(("o1", "o2", "o:3")) | _ascii_id,
     "external_customer_id": _ascii_id, "code": st.sampled_from(("api_calls", "storage", "x")),
     "timestamp": st.integers(START_MS - 60_000, START_MS + 600_000) | st.sampled_from(_LIMIT_TIMESTAMPS + ODD_TIMESTAMPS)},
    optional={"value": st.sampled_from(_LIMIT_VALUES + ODD_VALUES) | st.decimals(0, 10**20, places=6).map(str)
              | st.integers(0, 10**25),
              "properties": st.dictionaries(st.sampled_from(("region", "usage", "tier")), st.integers() | st.text(max_size=3)),
              "extra": st.none() | st.integers() | st.lists(st.booleans(), max_size=2)}), min_size=1, max_size=40),
       cuts=st.lists(st.integers(1, 40), max_size=5), seed=st.integers(0, 2**16))
def test_any_usual_or_odd_events_in_any_poll_split_give_the_same_batches(events, cuts, seed, monkeypatch):
    rng = random.Random(seed)
    raws = []
    for event in events:
        raw = json.dumps(event).encode()
        raws.append(raw if rng.random() < 0.8 else mutate(rng, dict(event), raws[-1] if raws else b"{}"))
    records = [(offset, None, raw, None, START_MS) for offset, raw in enumerate(raws)]
    polls, start = [], 0
    for cut in cuts + [len(records)]:
        polls.append(records[start:start + cut])
        start += cut
    run_both(fuzz_intake, [poll for poll in polls if poll], monkeypatch)
