"""The live-totals writer's encoding and rounds, against oracles written here.

``reference_value`` and ``reference_key`` follow the module docstrings (exact decimal text with 18
places; ``%``, ``:`` and control characters as ``%XX``), importing nothing from the sinks.
"""

from __future__ import annotations

import json
import time
from decimal import Context, Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from operators.validation import format_scaled
from sinks.redis_sink import RedisTotalsWriter, encode_calls
from support.redis import redis_server  # noqa: F401

FEB_1_2026_MS = 1_769_904_000_000
JAN_1_2026_MS = 1_767_225_600_000


def reference_value(total_scaled: int) -> str:
    text = format(Decimal(total_scaled).scaleb(-18, Context(prec=100)), "f")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction.ljust(18, '0')}"


def reference_key(org: str, customer: str, code: str, period: str) -> str:
    def part(text: str) -> str:
        return "".join(f"%{ord(c):02X}" if c in "%:" or ord(c) < 0x20 or ord(c) == 0x7F else c
                       for c in text)
    return ":".join(["tallyflow", "usage", part(org), part(customer), part(code), period])


@given(st.integers(min_value=-10**40, max_value=10**40)
       | st.sampled_from([0, 1, -1, 10**18 - 1, 10**18, 10**18 + 1, -10**18, -10**18 - 1]))
def test_totals_are_written_as_the_exact_decimal(total_scaled):
    assert format_scaled(total_scaled) == reference_value(total_scaled)


ids = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8)


@settings(max_examples=200)
@given(st.dictionaries(st.tuples(ids, ids, ids, st.sampled_from(["day", "month"])),
                       st.tuples(st.integers(0, 10**12), st.integers(-10**30, 10**30)),
                       max_size=30),
       st.integers(1, 7))
def test_calls_carry_every_total_once_with_its_key_and_ttl(totals, per_call):
    periods = {"day": (FEB_1_2026_MS, "2026-02-01", 4 * 86_400),
               "month": (JAN_1_2026_MS, "2026-01", 100 * 86_400)}
    keyed = {(o, c, k, kind, periods[kind][0]): v for (o, c, k, kind), v in totals.items()}
    calls = [json.loads(call) for call in encode_calls(keyed, per_call)]
    assert all(0 < len(call) <= 4 * per_call for call in calls)
    flat = [item for call in calls for item in call]
    expected = []
    for (org, customer, code, kind, _start), (count, total) in keyed.items():
        _, label, ttl = periods[kind]
        expected += [reference_key(org, customer, code, label), str(count),
                     reference_value(total), ttl]
    assert flat == expected


def test_a_round_writes_everything_pending_pipeline_by_pipeline(redis_server):
    """More totals than one pipeline holds are written in one round, not one pipeline per rest."""
    writer = RedisTotalsWriter(redis_server.url, "0", timeout_s=1.0, max_pipeline=3,
                               min_interval_s=30.0)
    totals = {("o", f"c{i}", "x", "day", FEB_1_2026_MS): (i, i * 10**18) for i in range(1, 11)}
    client = redis_server.client()
    try:
        writer.submit(totals)
        deadline = time.monotonic() + 5
        while len(list(client.scan_iter("tallyflow:usage:*"))) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.pending() == 0
        for i in range(1, 11):
            stored = client.hgetall(f"tallyflow:usage:o:c{i}:x:2026-02-01")
            assert stored == {b"count": str(i).encode(), b"value": f"{i}.{'0' * 18}".encode()}
    finally:
        writer.close(1)


def test_a_resync_in_the_middle_of_a_round_never_writes_an_older_total_last():
    """Redis lost its data (sentinel missing) at a round's first pipeline: the resync queues
    the totals written before, but not over the newer ones still waiting in the same round."""
    import threading

    from sinks.redis_client import Breaker

    writer = RedisTotalsWriter.__new__(RedisTotalsWriter)  # its thread and client left out
    writer.part, writer.max_pipeline, writer.min_interval_s, writer.clock = "0", 1, 0, time.monotonic
    writer._breaker, writer._cond, writer._stopping, writer._draining = Breaker(), threading.Condition(), False, 0
    writer._pending, writer._in_flight, writer._next_prune = {}, 0, time.monotonic() + 3_600
    first, second = ("o", "a", "x", "day", 0), ("o", "b", "x", "day", 0)
    writer._written, writer._written_at = {first: (1, 1), second: (1, 1)}, {first: 0, second: 0}
    redis: dict = {}
    lost = iter([True])  # the first pipeline finds the sentinel missing

    def write(chunk: dict) -> bool:
        redis.update(chunk)
        return next(lost, False)

    writer._write = write
    writer._pending = {first: (2, 2), second: (2, 2)}
    for _ in range(3):  # rounds until nothing is pending
        if writer._pending:
            writer._write_round(writer._take())
    assert redis == {first: (2, 2), second: (2, 2)}
    assert writer._pending == {} and writer._in_flight == 0
