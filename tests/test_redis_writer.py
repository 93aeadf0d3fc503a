"""The live-totals writer's encoding and rounds, against oracles written here.

``reference_value`` and ``reference_key`` follow the module docstrings (exact decimal text with 18
places; ``%``, ``:`` and control characters as ``%XX``), importing nothing from the sinks.
"""

from __future__ import annotations

import itertools
import os
import time
from decimal import Context, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operators.validation import format_scaled
from operators.live_totals import period_label
from sinks import redis_sink
from sinks.redis_client import key_part
from sinks.redis_sink import RedisTotalsWriter, encode_writes
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
plain_ids = st.text(st.characters(codec="utf-8", blacklist_characters="%:",
                                  blacklist_categories=("Cc",)), min_size=1, max_size=8)
wide_totals = st.integers(-2**130, 2**130) | st.sampled_from(
    [0, -1, 10**18, -10**18, 2**127 - 1, -2**127, 2**127, -2**127 - 1, 2**63, -2**63 - 1,
     2**120 - 1, -2**120 + 1, 2**120, -2**120, 2**90, -2**60])


def parse_commands(payload: bytes) -> list[list[str]]:
    """RESP arrays of bulk strings, read by length (a reference reader written here)."""
    commands, at = [], 0
    while at < len(payload):
        assert payload[at:at + 1] == b"*"
        end = payload.index(b"\r\n", at)
        words, count, at = [], int(payload[at + 1:end]), end + 2
        for _ in range(count):
            assert payload[at:at + 1] == b"$"
            end = payload.index(b"\r\n", at)
            size = int(payload[at + 1:end])
            words.append(payload[end + 2:end + 2 + size].decode())
            assert payload[end + 2 + size:end + 4 + size] == b"\r\n"
            at = end + 4 + size
        commands.append(words)
    return commands


def expected_commands(keyed: dict, per_transaction: int) -> list[list[str]]:
    ttls = {"day": "345600", "month": "8640000"}
    labels = {FEB_1_2026_MS: "2026-02-01", JAN_1_2026_MS: "2026-01"}
    commands = []
    for i, ((org, customer, code, kind, start), (count, total)) in enumerate(keyed.items()):
        if i % per_transaction == 0:
            commands += [["EXEC"], ["MULTI"]] if i else [["MULTI"]]
        key = reference_key(org, customer, code, labels[start])
        commands += [["HSET", key, "count", str(count), "value", reference_value(total)],
                     ["EXPIRE", key, ttls[kind]]]
    return commands + [["EXEC"]] if keyed else commands


def period_keys(totals: dict) -> dict:
    starts = {"day": FEB_1_2026_MS, "month": JAN_1_2026_MS}
    return {(o, c, k, kind, starts[kind]): v for (o, c, k, kind), v in totals.items()}


def pure_encoding(totals: dict, per_transaction: int) -> tuple[bytes, int]:
    compiled, redis_sink._fast_commands = redis_sink._fast_commands, None
    try:
        return encode_writes(totals, per_transaction)
    finally:
        redis_sink._fast_commands = compiled


@settings(max_examples=200)
@given(st.dictionaries(st.tuples(ids, ids, ids, st.sampled_from(["day", "month"])),
                       st.tuples(st.integers(0, 10**12), st.integers(-10**30, 10**30)),
                       max_size=30),
       st.integers(1, 7))
def test_writes_carry_every_total_once_with_its_key_and_ttl(totals, per_transaction):
    keyed = period_keys(totals)
    for payload, replies in (encode_writes(keyed, per_transaction),
                             pure_encoding(keyed, per_transaction)):
        assert parse_commands(payload) == expected_commands(keyed, per_transaction)
        transactions = -(-len(keyed) // per_transaction)
        assert replies == 2 * transactions + 4 * len(keyed)


def compiled_commands():
    """``sinks/_fastresp.c``'s commands; a test of it is skipped where it is not built, and
    fails under CI (env CI), which builds it."""
    if redis_sink._fast_commands is None:
        if os.environ.get("CI"):
            pytest.fail("sinks/_fastresp.c was not built: `make install` builds it", pytrace=False)
        pytest.skip("sinks/_fastresp.c is not built (make install)")
    return redis_sink._fast_commands


def test_a_bytearray_with_a_view_held_is_refused_before_a_total_is_taken():
    """The compiled path resizes the caller's bytearray before it takes a pair: where it
    cannot (a view of it is held), it raises and the iterator has lost nothing."""
    totals = period_keys({("o", "c", "x", "day"): (1, 10**18)})
    entries, out = iter(totals.items()), bytearray(b"x" * 1000)
    with memoryview(out):
        with pytest.raises(BufferError):
            compiled_commands()(entries, "tallyflow:usage:", period_label, redis_sink._TTL_BYTES, 1, 5, out)
    assert list(entries) == list(totals.items())


def test_a_build_of_another_version_is_not_used(monkeypatch):
    """A stale build of ``sinks/_fastresp.c`` is left aside: the writer encodes in pure Python."""
    compiled_commands()
    from sinks import _fastresp
    from state.compiled import compiled_function

    assert compiled_function("sinks._fastresp", redis_sink._INTERFACE, "commands") is _fastresp.commands
    monkeypatch.setattr(_fastresp, "INTERFACE", redis_sink._INTERFACE - 1)
    assert compiled_function("sinks._fastresp", redis_sink._INTERFACE, "commands") is None


@settings(max_examples=300)
@given(st.dictionaries(st.tuples(plain_ids | ids, plain_ids, plain_ids, st.sampled_from(["day", "month"])),
                       st.tuples(st.integers(0, 2**64) | st.integers(-5, 5), wide_totals),
                       max_size=40),
       st.integers(1, 9))
def test_the_compiled_encoding_is_the_pure_one_byte_for_byte(totals, per_transaction):
    """Differential: where ``sinks/_fastresp.c`` encodes a batch, the bytes are the pure path's;
    it declines (None) only ids to percent-encode, counts beyond 64 bits, totals beyond 128."""
    keyed = period_keys(totals)
    out = bytearray(b"left from the pipeline before" * 99)
    compiled = compiled_commands()(iter(keyed.items()), "tallyflow:usage:", period_label,
                                   redis_sink._TTL_BYTES, per_transaction, len(keyed), out)
    declines = any(key_part(o + c + k) != o + c + k or not -2**63 <= n < 2**63 or not -2**127 <= t < 2**127
                   for (o, c, k, _kind, _start), (n, t) in keyed.items())
    assert isinstance(compiled, list) == declines
    if declines:
        assert compiled == list(keyed.items())  # the pairs it took, for the pure path
    else:
        assert (bytes(out), *compiled) == (*pure_encoding(keyed, per_transaction), len(keyed))


@settings(max_examples=200)
@given(st.dictionaries(st.tuples(plain_ids | ids, plain_ids, plain_ids, st.sampled_from(["day", "month"])),
                       st.tuples(st.integers(0, 2**64) | st.integers(-5, 5), wide_totals),
                       max_size=60),
       st.integers(1, 9), st.integers(1, 25))
def test_a_round_encoded_pipeline_by_pipeline_is_its_pipelines_encoded_alone(totals, per_transaction, limit):
    """``encode_pipeline`` over a round's items, ``limit`` totals at a time, compiled where it
    can, into one bytearray, is every pipeline's pure encoding in turn, and takes every total
    once."""
    keyed = period_keys(totals)
    entries, pairs, taken, out = iter(keyed.items()), list(keyed.items()), 0, bytearray()
    while True:
        payload, replies, sent = redis_sink.encode_pipeline(entries, limit, per_transaction, out)
        assert payload is out  # reused from pipeline to pipeline
        assert (bytes(payload), replies) == pure_encoding(dict(pairs[taken:taken + sent]), per_transaction)
        assert sent == min(limit, len(pairs) - taken)
        taken += sent
        if not sent:
            break
    assert taken == len(pairs)


def test_written_totals_read_back_exactly_with_their_ttl(redis_server):
    """Both encodings against a real Redis: hashes as the gateway reads them, TTLs set."""
    totals = {("o", "café", "x", "day", FEB_1_2026_MS): (1, -10**18 - 1),
              ("o", "c:1", "x", "month", JAN_1_2026_MS): (2, 2**127 - 1),
              ("o", "big", "x", "day", FEB_1_2026_MS): (3, 2**130),
              ("o", "zero", "x", "month", JAN_1_2026_MS): (0, 0)}
    client = redis_server.client()
    for compiled in (redis_sink._fast_commands, None):
        client.flushall()
        saved, redis_sink._fast_commands = redis_sink._fast_commands, compiled
        writer = RedisTotalsWriter(redis_server.url, "0", timeout_s=1.0, min_interval_s=0)
        try:
            writer.submit(totals)
            assert writer.drain(10)
        finally:
            writer.close(1)
            redis_sink._fast_commands = saved
        for (org, customer, code, kind, _start), (count, total) in totals.items():
            key = reference_key(org, customer, code, "2026-02-01" if kind == "day" else "2026-01")
            assert client.hgetall(key) == {b"count": str(count).encode(),
                                           b"value": reference_value(total).encode()}
            assert 0 < client.ttl(key) <= (4 if kind == "day" else 100) * 86_400


def test_a_refused_write_keeps_the_totals_pending(redis_server):
    """Redis answers an error (a key of another type): the round fails and is retried, as a
    failed write is, and nothing is lost."""
    client = redis_server.client()
    client.set("tallyflow:usage:o:c:x:2026-02-01", "not a hash")
    writer = RedisTotalsWriter(redis_server.url, "0", timeout_s=1.0, min_interval_s=0)
    try:
        writer.submit({("o", "c", "x", "day", FEB_1_2026_MS): (1, 10**18)})
        assert not writer.drain(1.0) and writer.pending() == 1
        client.delete("tallyflow:usage:o:c:x:2026-02-01")
        assert writer.drain(20)
        assert client.hget("tallyflow:usage:o:c:x:2026-02-01", "count") == b"1"
    finally:
        writer.close(1)


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
    writer._written = redis_sink.WrittenTotals()
    writer._written.record({first: (1, 1), second: (1, 1)}, 0)
    redis: dict = {}
    lost = iter([True])  # the first pipeline finds the sentinel missing

    def write(entries, limit: int) -> tuple[int, bool]:
        chunk = dict(itertools.islice(entries, limit))
        redis.update(chunk)
        return len(chunk), next(lost, False)

    writer._write = write
    writer._pending = {first: (2, 2), second: (2, 2)}
    for _ in range(3):  # rounds until nothing is pending
        if writer._pending:
            writer._write_round(writer._take())
    assert redis == {first: (2, 2), second: (2, 2)}
    assert writer._pending == {} and writer._in_flight == 0


def test_a_round_failing_at_its_second_pipeline_keeps_the_first_known_and_the_rest_pending():
    """Pipelines of 2: the first is written, the second fails: its totals and the rest go back
    to pending, and the first two are known written (a resync would rewrite them)."""
    import threading

    from sinks.redis_client import Breaker

    writer = RedisTotalsWriter.__new__(RedisTotalsWriter)  # its thread and client left out
    writer.part, writer.max_pipeline, writer.min_interval_s, writer.clock = "0", 2, 0, time.monotonic
    writer._breaker, writer._cond, writer._stopping, writer._draining = Breaker(), threading.Condition(), False, 0
    writer._pending, writer._in_flight, writer._next_prune = {}, 0, time.monotonic() + 3_600
    writer._written = redis_sink.WrittenTotals()
    writer._breaker.first_s = 0.0  # no wait before the retry
    keys = [("o", c, "x", "day", 0) for c in "abcde"]
    calls = iter([None, OSError("connection reset")])

    def write(entries, limit: int) -> tuple[int, bool]:
        chunk = dict(itertools.islice(entries, limit))
        if (failure := next(calls, None)) is not None:
            raise failure
        return len(chunk), False

    writer._write = write
    writer._pending = {key: (i, i) for i, key in enumerate(keys)}
    writer._write_round(writer._take())
    assert writer._pending == {key: (i, i) for i, key in enumerate(keys) if i >= 2}
    assert writer._in_flight == 0
    queued: dict = {}
    assert writer._written.queue_missing(queued) == 2 and queued == {keys[0]: (0, 0), keys[1]: (1, 1)}


class ChunkedSocket:
    """Replies handed out in the given pieces, as a socket's recv does."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)

    def recv(self, _size: int) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


def test_replies_are_counted_across_pieces_and_the_first_error_is_raised():
    from redis import ConnectionError, ResponseError

    from sinks.redis_client import _read_lines

    assert _read_lines(ChunkedSocket(b"+OK\r", b"\n:1\r\n*2", b"\r\n:0\r\n:1\r\n"), 5) == (
        b"+OK\r\n:1\r\n*2\r\n:0\r\n:1\r\n")
    assert _read_lines(ChunkedSocket(b"$-1\r\n:1", b"\r\n*-1\r", b"\n"), 3) == b"$-1\r\n:1\r\n*-1\r\n"
    for pieces in ([b"-OOM no\r\n"], [b"+OK\r\n-ERR a", b" b\r\n+QUEUED\r\n"],
                   [b"+OK\r\n+QUEUED\r", b"\n-EXECABORT x\r\n"], [b"$-1\r\n+OK\r\n", b"-ERR a-b\r\n"],
                   [b"+OK\r\n", b"-ERR a", b"-b", b"\r\n-ERR c\r\n"]):
        with pytest.raises(ResponseError) as error:
            _read_lines(ChunkedSocket(*pieces), 10)  # fewer lines come than counted
        assert str(error.value) in {"OOM no", "ERR a b", "EXECABORT x", "ERR a-b"}
    with pytest.raises(ConnectionError):
        _read_lines(ChunkedSocket(b"+OK\r\n"), 2)


def test_a_write_redis_refuses_for_memory_fails_at_once_and_is_retried(redis_server):
    """A transaction refused at queueing (maxmemory) answers fewer lines than counted: the
    round fails on the error, not on a timeout, and succeeds once Redis takes writes again."""
    client = redis_server.client()
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("maxmemory", 1)
    writer = RedisTotalsWriter(redis_server.url, "0", timeout_s=5.0, min_interval_s=0)
    try:
        started = time.monotonic()
        writer.submit({("o", "c", "x", "day", FEB_1_2026_MS): (1, 10**18)})
        assert not writer.drain(1.0) and writer.pending() == 1
        assert "OOM" in writer._breaker.last_error and time.monotonic() - started < 2.0
        client.config_set("maxmemory", 0)
        assert writer.drain(20)
        assert client.hget("tallyflow:usage:o:c:x:2026-02-01", "count") == b"1"
    finally:
        writer.close(1)


written_keys = st.tuples(st.sampled_from(["o", "p"]), st.sampled_from(["a", "b", "c"]),
                         st.just("x"), st.sampled_from(["day", "month"]), st.just(0))


@settings(max_examples=200)
@given(st.lists(st.tuples(st.dictionaries(written_keys, st.tuples(st.integers(0, 9), st.integers(0, 9)),
                                          max_size=4),
                          st.floats(0, 30 * 86_400), st.booleans()), max_size=30),
       st.dictionaries(written_keys, st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=3))
def test_written_totals_keep_the_latest_total_of_every_key_redis_may_hold(steps, pending):
    """Against a time kept per key: a resync queues the latest total of every key written
    less than its TTL ago, skipping pending ones; a key is forgotten only once its TTL passed
    since the last write before the prune that followed it, and never before its TTL."""
    written, now = redis_sink.WrittenTotals(), 0.0
    latest: dict = {}  # key -> (total, written at, stamp: the last write before the next prune)
    unstamped: set = set()
    ever: dict = {}  # key -> its last write, never forgotten
    for batch, step, prune in steps:
        now += step
        if prune:
            for key in unstamped:
                latest[key] = (*latest[key][:2], last_write)
            unstamped.clear()
            latest = {k: v for k, v in latest.items() if v[2] + redis_sink.KEY_TTL_S[k[3]] > now}
            written.prune(now)
        elif batch:
            written.record(batch, now)
            latest.update({key: (total, now, now) for key, total in batch.items()})
            assert written.beyond(batch) == any(key not in batch for key in latest)
            unstamped.update(batch)
            last_write = now
            ever.update(dict.fromkeys(batch, now))
        assert len(written) == len(latest)
        assert {k for k, at in ever.items() if at + redis_sink.KEY_TTL_S[k[3]] > now} <= latest.keys()
    queued = dict(pending)
    assert written.queue_missing(queued) == len(latest.keys() - pending.keys())
    assert queued == {**{key: total for key, (total, _, _) in latest.items()}, **pending}


class Replier:
    """A TCP peer that sends the given pieces, each after its delay, then stays connected."""

    def __init__(self, *timed_pieces: tuple[float, bytes]) -> None:
        import socket
        import threading

        listener = socket.create_server(("127.0.0.1", 0))
        self.sock = socket.create_connection(listener.getsockname(), timeout=3.0)
        self.peer, _ = listener.accept()
        listener.close()
        self.done = threading.Event()

        def send() -> None:
            for delay, piece in timed_pieces:
                time.sleep(delay)
                self.peer.sendall(piece)
            self.done.wait(10)
            self.peer.close()

        threading.Thread(target=send, daemon=True).start()

    def close(self) -> None:
        self.done.set()
        self.sock.close()


def test_replies_awaited_by_their_expected_size_are_all_read_and_an_early_error_raised():
    """Over TCP the reader sleeps until the expected bytes are there (its receive low-water
    mark); replies slower than its longest wait are read all the same, and an error that
    makes them shorter than expected is raised, not waited on until the socket times out."""
    from redis import ResponseError

    from sinks.redis_client import _read_lines

    replies = b"+OK\r\n" + b"+QUEUED\r\n" * 2 + b"*2\r\n:2\r\n:1\r\n"
    slow = Replier((0.0, replies[:7]), (0.12, replies[7:20]), (0.12, replies[20:]))
    try:
        assert _read_lines(slow.sock, 6, len(replies)) == replies
    finally:
        slow.close()
    refused = Replier((0.0, b"+OK\r\n-OOM command not allowed\r\n"))  # then nothing more
    try:
        with pytest.raises(ResponseError, match="OOM"):
            _read_lines(refused.sock, 6, 200_000)
    finally:
        refused.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_expected_reply_size_is_exact_against_redis(redis_server, protocol):
    """What the writer expects of Redis's replies (``reply_size``) is what comes, for new keys
    (HSET adds 2 fields) and rewrites (0); the sentinel's, at least what it expects."""
    from sinks.redis_client import command, raw_connection, send_commands

    connection = raw_connection(f"{redis_server.url}?protocol={protocol}", timeout_s=2.0)
    sentinel = command("SET", f"tallyflow:live:sentinel:{protocol}", "1", "NX")
    totals = {("o", f"c{i}", "x", "day", FEB_1_2026_MS): (i, i * 10**18) for i in range(25)}
    try:
        for per_transaction in (1, 7, 1_000, 1_000):  # the last rewrites every key
            payload, replies = encode_writes(totals, per_transaction)
            size = redis_sink.reply_size(len(totals), per_transaction)
            lines = send_commands(connection, [sentinel, payload], 1 + replies, size)
            assert len(lines) - len(lines[:lines.index(b"\r\n") + 2]) == size
            assert len(lines) >= redis_sink._SENTINEL_REPLY_SIZE + size
    finally:
        connection.disconnect()
