"""Live running totals to Redis hashes, for quota enforcement at an API gateway.

Each total becomes the hash ``tallyflow:usage:{org}:{customer}:{code}:{period}`` with fields
``count`` and ``value`` (an exact decimal string), each id percent-encoded
(``sinks.redis_client.key_part``: ``%`` -> ``%25``, ``:`` -> ``%3A``, control characters ->
``%XX``) so that no two customers share a hash, expiring 4 days (day keys) or 100 days
(month keys) after its last write. Writes are plain commands, ``HSET key count N value V``
and ``EXPIRE key TTL``, a ``MULTI``/``EXEC`` transaction per 1,000 keys (so no key is ever
left without its TTL), all of a round's pipeline in one round trip. The commands are encoded
here (``encode_writes``: compiled, ``sinks/_fastresp.c`` built by ``make install``, with the
same pure-Python rule where it is missing or declines) and their one-line replies counted
and checked for errors as bytes, not parsed one by one, read once they are all there
(``reply_size``) rather than as Redis sends them, a few dozen at a time. Against the Lua script per 1,000 keys
with one JSON argument that this replaced, Redis spends about a quarter less per total (a
script's ``redis.call`` costs more than the command it runs) and the compiled encoding a
fraction of the client's. Every write sends its ``EXPIRE``, a rewrite too: skipping it for a
key written (with a TTL an hour longer) less than an hour before would save Redis about 0.7 of
its 1.6 us a rewrite, but a key Redis lost alone while the sentinel stayed (evicted under
``maxmemory``, deleted, a failover to a replica that lagged) would come back from a bare
``HSET`` with no TTL at all.

Guarantee: exact totals, eventually. Writes are absolute, so writing a total twice, or an old
total before its successor, converges on the latest one, and a replay after a crash rewrites the
same totals; the live-totals step re-emits every total once when it resumes, which covers what
was still unwritten when the process died. After a crash Redis can show totals from the
uncommitted epoch (counted again by the replay) or, briefly, the older committed ones.

Redis down or slow never blocks the flow: a background thread per sink partition writes, and
the partition only hands it totals, coalesced per key (a newer total replaces a pending older
one), and each round of writes takes everything pending and starts at least 1 s after the last
one, so a busy key costs one write per second, not one per batch: live totals lag the flow by
about a second (more while a round of many keys is written, pipeline by pipeline). The pending
set is bounded by the number of live keys, so nothing needs to block or be dropped; when Redis
answers again the thread catches up. A Redis that lost its data (restarted
without persistence, failed over empty) is detected through a per-partition sentinel key, and
the thread then rewrites every total it has written since the process started.

    >>> usage_key(("org", "cus", "api_calls", "day", 1_769_817_600_000))
    'tallyflow:usage:org:cus:api_calls:2026-01-31'
    >>> usage_key(("acme", "eu:42", "api_calls", "month", 1_769_817_600_000))
    'tallyflow:usage:acme:eu%3A42:api_calls:2026-01'
    >>> payload, replies = encode_writes({("o", "c:1", "x", "day", 0): (3, 5 * 10**18)})
    >>> [line for line in payload.split(b"\\r\\n") if line[:1] not in b"*$"]  # without framing
    [b'MULTI', b'HSET', b'tallyflow:usage:o:c%3A1:x:1970-01-01', b'count', b'3', \
b'value', b'5.000000000000000000', b'EXPIRE', b'tallyflow:usage:o:c%3A1:x:1970-01-01', \
b'345600', b'EXEC']
    >>> replies   # +OK, +QUEUED twice, *2 and two integers
    6
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Callable, Iterator

from bytewax.outputs import FixedPartitionedSink

from operators.live_totals import LiveTotals, PeriodKey, period_label
from operators.telemetry import metrics
from operators.validation import format_scaled
from sinks.buffered import BufferedPartition
from sinks.redis_client import (REDIS_ERRORS, Breaker, command, plain, raw_connection, redis_key,
                                 send_commands)
from state.compiled import compiled_function

log = logging.getLogger(__name__)

USAGE_PREFIX = "tallyflow:usage"
SENTINEL_KEY = "tallyflow:live:sentinel:{}"
KEY_TTL_S = {"day": 4 * 86_400, "month": 100 * 86_400}
KEYS_PER_TRANSACTION = 1_000
PRUNE_EVERY_S = 3_600
_MULTI, _EXEC = "*1\r\n$5\r\nMULTI\r\n", "*1\r\n$4\r\nEXEC\r\n"
_TTL_ARGUMENT = {kind: f"${len(str(ttl))}\r\n{ttl}\r\n" for kind, ttl in KEY_TTL_S.items()}
_TTL_BYTES = {kind: argument.encode() for kind, argument in _TTL_ARGUMENT.items()}


Total = tuple  # (count, total_scaled)


def usage_key(key: PeriodKey) -> str:
    """The Redis hash of one live total: ids percent-encoded, then the period label."""
    org, customer, code, kind, start = key
    if plain(org + customer + code):  # nearly always: nothing to encode
        return f"{USAGE_PREFIX}:{org}:{customer}:{code}:{period_label(kind, start)}"
    return redis_key(USAGE_PREFIX, org, customer, code, period_label(kind, start))


_INTERFACE = 3
"""The version of ``sinks/_fastresp.c``'s ``commands`` this module calls (its ``INTERFACE``)."""

_fast_commands = compiled_function("sinks._fastresp", _INTERFACE, "commands")
"""What :func:`encode_pipeline` uses; tests set it to None for the pure path."""


def encode_writes(totals: dict[PeriodKey, Total],
                  per_transaction: int = KEYS_PER_TRANSACTION) -> tuple[bytes, int]:
    """The commands that write ``totals`` (RESP), and how many one-line replies they get:
    ``MULTI``, then ``HSET`` and ``EXPIRE`` per total, ``EXEC``, ``per_transaction`` totals a
    transaction. Key names as ``usage_key`` builds them."""
    payload, replies, _ = encode_pipeline(iter(totals.items()), len(totals), per_transaction)
    return payload, replies


def encode_pipeline(entries: Iterator[tuple[PeriodKey, Total]], limit: int,
                    per_transaction: int = KEYS_PER_TRANSACTION,
                    out: bytearray | None = None) -> tuple[bytes | bytearray, int, int]:
    """:func:`encode_writes` for the next ``limit`` totals of ``entries`` (fewer at their end),
    and how many it took: a round is written a pipeline at a time from its dict's items, none
    copied out. The commands are written into ``out`` where given (and it is returned): a
    writer keeps one from pipeline to pipeline, whose memory stays mapped. The compiled path
    hands back the pairs it took (for this pure path) where one has an id to percent-encode, a
    count beyond 64 bits or a total beyond 128."""
    if _fast_commands is not None:
        into = bytearray() if out is None else out
        encoded = _fast_commands(entries, f"{USAGE_PREFIX}:", period_label, _TTL_BYTES,
                                 per_transaction, limit, into)
        if isinstance(encoded, tuple):
            return (into if out is not None else bytes(into)), *encoded
        chunk = encoded
    else:
        chunk = list(itertools.islice(entries, limit))
    parts: list[str] = []
    labels: dict[str, dict[int, str]] = {"day": {}, "month": {}}
    for first in range(0, len(chunk), per_transaction):
        parts.append(_MULTI)
        for (org, customer, code, kind, start), (count, total) in chunk[first:first + per_transaction]:
            of_kind = labels[kind]
            label = of_kind.get(start) or of_kind.setdefault(start, period_label(kind, start))
            name = (f"{USAGE_PREFIX}:{org}:{customer}:{code}:{label}" if plain(org + customer + code)
                    else redis_key(USAGE_PREFIX, org, customer, code, label))
            size = len(name) if name.isascii() else len(name.encode())
            count_text, value = str(count), format_scaled(total)
            parts.append(f"*6\r\n$4\r\nHSET\r\n${size}\r\n{name}\r\n$5\r\ncount\r\n"
                         f"${len(count_text)}\r\n{count_text}\r\n$5\r\nvalue\r\n${len(value)}\r\n"
                         f"{value}\r\n*3\r\n$6\r\nEXPIRE\r\n${size}\r\n{name}\r\n{_TTL_ARGUMENT[kind]}")
        parts.append(_EXEC)
    # MULTI: +OK; each command: +QUEUED; EXEC: *N and N integers
    transactions = -(-len(chunk) // per_transaction)
    payload = "".join(parts).encode()
    if out is not None:
        out[:] = payload
    return (payload if out is None else out), 2 * transactions + 4 * len(chunk), len(chunk)


def reply_size(totals: int, per_transaction: int = KEYS_PER_TRANSACTION) -> int:
    """The bytes of the replies to :func:`encode_writes`'s commands for ``totals`` totals when
    none is an error: ``+OK`` to ``MULTI``, ``+QUEUED`` to each command, ``EXEC``'s array of
    one-digit integers (HSET's fields added, EXPIRE's 1 or 0).

    >>> reply_size(1) == len(b"+OK\\r\\n" + b"+QUEUED\\r\\n" * 2 + b"*2\\r\\n:2\\r\\n:1\\r\\n")
    True
    """
    size, left = 0, totals
    while left > 0:
        keys = min(left, per_transaction)
        size += 5 + 18 * keys + len(str(2 * keys)) + 3 + 8 * keys
        left -= keys
    return size


_SENTINEL_REPLY_SIZE = 3  # SET NX: +OK, or nil ($-1, or _ in RESP3): the least of them


class WrittenTotals:
    """The latest total written for every key Redis may still hold, for a resync, at one dict
    update per pipeline (not a time per total): the totals written since the last prune are
    kept by key alone, and a prune folds them into the older ones stamped with the last write
    time before it, then forgets every key whose TTL has passed by that stamp. A key is thus
    forgotten at the first prune at least its TTL after its last write and at most two prune
    intervals later (it was one with a time per total): a resync then may rewrite a key that
    expired in Redis that long ago, which gets its TTL again, as before.

        >>> written = WrittenTotals()
        >>> written.record({("o", "c", "x", "day", 0): (1, 1)}, now=10.0)
        >>> written.record({("o", "c", "x", "day", 0): (2, 2)}, now=20.0)
        >>> written.prune(now=30.0); written.prune(now=20.0 + 4 * 86_400 - 1); len(written)
        1
        >>> pending = {}; written.queue_missing(pending), pending
        (1, {('o', 'c', 'x', 'day', 0): (2, 2)})
        >>> written.prune(now=20.0 + 4 * 86_400); len(written)
        0
    """

    def __init__(self) -> None:
        self._recent: dict[PeriodKey, Total] = {}  # written since the last prune
        self._recent_at = 0.0  # the last of those writes
        self._older: dict[PeriodKey, Total] = {}
        self._older_at: dict[PeriodKey, float] = {}  # a time no earlier than each one's write

    def __len__(self) -> int:
        return len(self._older) + sum(key not in self._older for key in self._recent)

    def record(self, batch: dict[PeriodKey, Total], now: float) -> None:
        """``batch`` is in Redis since ``now``."""
        self._recent.update(batch)
        self._recent_at = now

    def beyond(self, batch: dict[PeriodKey, Total]) -> bool:
        """Whether a key outside ``batch``, just recorded, was written (a resync has something
        to rewrite)."""
        return len(self._recent) > len(batch) or not self._older.keys() <= batch.keys()

    def queue_missing(self, pending: dict[PeriodKey, Total]) -> int:
        """Queue in ``pending`` the latest total of every key not pending already; how many."""
        again = 0
        for written in (self._recent, self._older):  # the newer first: it is the one queued
            for key, total in written.items():
                if key not in pending:
                    pending[key] = total
                    again += 1
        return again

    def prune(self, now: float) -> None:
        """Fold the recent totals into the older ones, then forget each key whose TTL passed."""
        self._older.update(self._recent)
        self._older_at.update(dict.fromkeys(self._recent, self._recent_at))
        self._recent = {}
        self._older_at = {key: at for key, at in self._older_at.items()
                          if at + KEY_TTL_S[key[3]] > now}
        self._older = {key: self._older[key] for key in self._older_at}


class RedisTotalsWriter:
    """A thread that writes coalesced totals to Redis, retrying with backoff while it cannot."""

    def __init__(self, url: str, part: str, *, timeout_s: float = 5.0, max_pipeline: int = 10_000,
                 min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.part = part
        self.max_pipeline = max_pipeline
        self.min_interval_s = min_interval_s
        self.clock = clock
        self._redis = raw_connection(url, timeout_s=timeout_s)
        self._breaker = Breaker(clock=clock)
        self._set_sentinel = command("SET", SENTINEL_KEY.format(part), "1", "NX")
        self._cond = threading.Condition()
        self._pending: dict[PeriodKey, Total] = {}
        self._in_flight = 0
        self._stopping = False
        self._draining = 0
        self._next_write_at = 0.0
        self._written = WrittenTotals()  # what Redis holds, for a resync
        self._payload = bytearray()  # a pipeline's commands, its memory kept for the next
        self._next_prune = clock() + PRUNE_EVERY_S
        self._thread = threading.Thread(target=self._run, name=f"redis-totals-{part}", daemon=True)
        self._thread.start()

    def submit(self, totals: dict[PeriodKey, Total]) -> None:
        """Queue ``totals`` (absolute, newer than any pending one); never blocks on Redis."""
        with self._cond:
            self._pending.update(totals)
            metrics.record_live_totals_pending(self.part, len(self._pending))
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._pending) + self._in_flight

    def drain(self, timeout_s: float, *, give_up_if_unavailable: bool = False) -> bool:
        """Wait until everything submitted is in Redis; False if Redis did not take it in time
        (at once, with ``give_up_if_unavailable``, when the last attempt failed)."""
        deadline = self.clock() + timeout_s
        with self._cond:
            self._draining += 1
            self._cond.notify_all()
            try:
                while self._pending or self._in_flight:
                    left = deadline - self.clock()
                    if left <= 0:
                        return False
                    if give_up_if_unavailable and self._breaker.failures and not self._in_flight:
                        return False
                    self._cond.wait(min(left, 0.05))
            finally:
                self._draining -= 1
        return True

    def close(self, drain_timeout_s: float = 10.0) -> None:
        drained = self.drain(drain_timeout_s, give_up_if_unavailable=True)
        if not drained:
            log.warning("Redis did not take every live total before the sink closed; "
                        "the next resume rewrites them", extra={"pending": self.pending(),
                                                                 "part": self.part})
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(5)
        self._redis.disconnect()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._pending or self._resting()):
                    self._cond.wait(self._next_write_at - self.clock() if self._pending else None)
                if self._stopping:
                    return
                batch = self._take()
                self._next_write_at = self.clock() + self.min_interval_s
            self._write_round(batch)

    def _write_round(self, batch: dict[PeriodKey, Total]) -> None:
        """Write ``batch`` in pipelines of ``max_pipeline`` totals, encoded from its items as
        they come; on a failure the unwritten rest goes back to pending."""
        entries, done = iter(batch.items()), 0
        while not self._stopping and done < len(batch):
            try:
                sent, lost_data = self._write(entries, self.max_pipeline)
            except REDIS_ERRORS as err:
                self._record_written(batch, done)
                self._failed(dict(itertools.islice(batch.items(), done, None)), err)
                return
            done += sent
            if self._written_ok(batch, done, sent, lost_data):
                return  # a resync: the rest of the round went back to pending
        if done < len(batch):
            self._record_written(batch, done)  # stopped: what is in Redis is known all the same

    def _resting(self) -> bool:
        """Writes are spaced by ``min_interval_s`` so a busy key is written once per interval."""
        return not self._draining and self.clock() < self._next_write_at

    def _take(self) -> dict[PeriodKey, Total]:
        """A round takes everything pending (a total submitted meanwhile waits for the next)."""
        batch, self._pending = self._pending, {}
        self._in_flight = len(batch)
        return batch

    def _write(self, entries: Iterator[tuple[PeriodKey, Total]], limit: int) -> tuple[int, bool]:
        """One pipelined round trip of the next ``limit`` totals of ``entries``: how many it
        wrote, and True if the sentinel was missing (Redis lost its data)."""
        payload, replies, sent = encode_pipeline(entries, limit, out=self._payload)
        lines = send_commands(self._redis, [self._set_sentinel, payload], 1 + replies,
                              _SENTINEL_REPLY_SIZE + reply_size(sent))
        return sent, lines.startswith(b"+OK\r\n")  # SET NX set it: it was missing

    def _failed(self, batch: dict[PeriodKey, Total], err: Exception) -> None:
        metrics.record_live_totals_redis_error()
        delay = self._breaker.failed(err)
        with self._cond:
            for key, entry in batch.items():
                self._pending.setdefault(key, entry)  # a newer total submitted meanwhile wins
            self._in_flight = 0
            metrics.record_live_totals_pending(self.part, len(self._pending))
            if self._breaker.failures == 1 or self._breaker.failures % 10 == 0:
                log.warning("Redis unavailable for live totals: keeping them until it returns",
                            extra={"part": self.part, "pending": len(self._pending),
                                   "retry_in_s": delay, "error": str(err)})
            self._cond.notify_all()
            retry_at = self.clock() + delay
            while not self._stopping and self.clock() < retry_at:
                self._cond.wait(retry_at - self.clock())

    def _written_ok(self, batch: dict[PeriodKey, Total], done: int, sent: int,
                    lost_data: bool) -> bool:
        """The first ``done`` totals of the round ``batch`` are in Redis, the last ``sent`` of
        them just now. True if Redis had lost its data and every total written before is queued
        again: then the rest of the round (newer totals) went back to pending first, so the
        resync, which skips pending totals, queues no older total behind them."""
        now = self.clock()
        recovered = self._breaker.succeeded()
        metrics.record_live_totals_written(sent)
        with self._cond:
            if done == len(batch) or lost_data:
                self._record_written(batch, done, now)
            resync = lost_data and self._written.beyond(
                dict(itertools.islice(batch.items(), done - sent, done)))
            if resync:
                unwritten = dict(itertools.islice(batch.items(), done, None))
                for key, entry in unwritten.items():
                    self._pending.setdefault(key, entry)  # a newer total submitted meanwhile wins
                self._in_flight -= len(unwritten)
                self._resync(now)
            if now >= self._next_prune:
                self._prune(now)
            self._in_flight -= sent
            metrics.record_live_totals_pending(self.part, len(self._pending))
            self._cond.notify_all()
        if recovered:
            log.info("Redis is back for live totals", extra={"part": self.part})
        return resync

    def _record_written(self, batch: dict[PeriodKey, Total], done: int,
                        now: float | None = None) -> None:
        """The first ``done`` totals of ``batch`` are in Redis: a round is recorded once, when
        it ends (a part of it where it stops early, or for a resync)."""
        if done:
            self._written.record(batch if done == len(batch) else
                                 dict(itertools.islice(batch.items(), done)),
                                 self.clock() if now is None else now)

    def _resync(self, now: float) -> None:
        """Redis lost its data: write again every total it should hold (caller holds the lock)."""
        metrics.record_live_totals_resync()
        again = self._written.queue_missing(self._pending)
        log.warning("Redis lost the live totals (sentinel missing): rewriting them",
                    extra={"part": self.part, "totals": again})

    def _prune(self, now: float) -> None:
        """Forget totals whose Redis key has expired anyway, so memory stays bounded."""
        self._written.prune(now)
        self._next_prune = now + PRUNE_EVERY_S


class RedisTotalsPartition(BufferedPartition[LiveTotals]):
    def __init__(self, writer: RedisTotalsWriter, max_rows: int, max_age_s: float,
                 close_timeout_s: float = 10.0) -> None:
        super().__init__(max_rows, max_age_s)
        self.writer = writer
        self.close_timeout_s = close_timeout_s

    def flush_items(self, items: list[LiveTotals]) -> None:
        for item in items:
            self.writer.submit(item.totals)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.writer.close(self.close_timeout_s)


class RedisTotalsSink(FixedPartitionedSink[LiveTotals, None]):
    """Live totals into Redis, as ``partitions`` independent background writers."""

    def __init__(self, url: str, *, partitions: int = 2, max_rows: int = 100,
                 max_age_s: float = 0.2, close_timeout_s: float = 10.0) -> None:
        self.url = url
        self.partitions = partitions
        self.max_rows = max_rows
        self.max_age_s = max_age_s
        self.close_timeout_s = close_timeout_s

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> RedisTotalsPartition:
        return RedisTotalsPartition(RedisTotalsWriter(self.url, for_part), self.max_rows,
                                    self.max_age_s, self.close_timeout_s)
