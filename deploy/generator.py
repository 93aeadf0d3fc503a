"""Realistic usage traffic: a seeded, deterministic generator and a fast Kafka producer.

:func:`generate` is pure: the same arguments give the same records, byte for byte, without Kafka.
Besides valid events it mixes in the three things the pipeline must survive:

- ``duplicate``: an exact re-send of an event from a little earlier in the stream, half of them
  on the original's partition and half on another one;
- ``malformed``: bytes that are not a valid event (broken JSON, bad UTF-8, wrong types, bad
  timestamps or values...), which must reach the DLQ;
- ``very_late``: a valid event ``very_late_by_ms`` older than the stream position, which must
  reach the late table;
- ``conflicting`` (off by default): a copy of a recent event with the same transaction id but
  re-stamped by up to ``±conflict_shift_ms`` and half the time another value, on a random
  partition: a retry that changed on the way. The README's dedup rule says which copy counts;
- ``reused`` (off by default): a new event that reuses the transaction id of one of the first
  events of the stream; once the stream has run longer than ``DEDUP_HORIZON`` it counts again.

Every record carries an explicit partition (a stable hash of its key, see :func:`partition_for`),
so a duplicate sent elsewhere really lands on another partition than its original.

    >>> records = list(generate(1_000, seed=1, start_ms=1_767_225_600_000))
    >>> len(records), records[0].kind
    (1000, 'event')
    >>> records == list(generate(1_000, seed=1, start_ms=1_767_225_600_000))
    True
"""

from __future__ import annotations

import random
import sys
import time
import zlib
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Callable, Iterable, Iterator, TextIO

import msgspec
from confluent_kafka import KafkaException, Producer

from sinks.kafka_client import KafkaConnection, as_connection

KINDS = ("event", "duplicate", "malformed", "very_late", "conflicting", "reused")
DEFAULT_CODES = ("api_calls", "storage_gb", "compute_seconds", "egress_bytes")

# How far back a duplicate may reach: the original is one of the last N events.
_DUPLICATE_REACH = 256
_EPOCH = datetime(1970, 1, 1)
_REQUIRED = ("transaction_id", "organization_id", "external_customer_id", "code", "timestamp")
_ID_FIELDS = _REQUIRED[:4]
_REGIONS = ("eu-west-1", "eu-central-1", "us-east-1", "us-west-2", "ap-southeast-1")
_PLANS = ("free", "starter", "pro", "enterprise")
_ENDPOINTS = ("/v1/invoices", "/v1/customers", "/v1/events", "/v1/plans")
# (offset in minutes, suffix); "Z" is the most common spelling.
_OFFSETS = ((0, "Z"), (0, "Z"), (0, "Z"), (0, "+00:00"), (120, "+02:00"), (-300, "-05:00"),
            (330, "+05:30"), (-210, "-03:30"), (540, "+09:00"))
# Per code: (largest integer part, decimal scales to pick from). Unknown codes use _DEFAULT_PROFILE.
_PROFILES = {
    "api_calls": (100, (0,)),
    "storage_gb": (500, (2, 6, 9, 18)),
    "compute_seconds": (3_600, (0, 3, 6, 12)),
    "egress_bytes": (100_000_000, (0,)),
}
_DEFAULT_PROFILE = (1_000, (0, 2, 6, 12, 18))

_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True)
class GeneratedRecord:
    """One Kafka record to produce, and why it is in the stream."""

    kind: str  # one of KINDS
    partition: int | None  # explicit partition, or None = by key
    key: bytes | None
    value: bytes  # the exact bytes to produce


def partition_for(key: bytes, partitions: int) -> int:
    """The stable partition of ``key`` (CRC-32 mod ``partitions``), the same in every process."""
    return zlib.crc32(key) % partitions


def generate(
    count: int,
    *,
    seed: int = 0,
    partitions: int = 4,
    organizations: int = 5,
    customers_per_org: int = 20,
    codes: tuple[str, ...] = DEFAULT_CODES,
    start_ms: int,
    span_ms: int = 600_000,
    jitter_ms: int = 5_000,
    duplicate_share: float = 0.05,
    malformed_share: float = 0.01,
    very_late_share: float = 0.001,
    very_late_by_ms: int = 2 * 86_400_000,
    conflicting_share: float = 0.0,
    conflict_shift_ms: int = 90_000,
    reused_share: float = 0.0,
) -> Iterator[GeneratedRecord]:
    """Yield ``count`` records (all kinds together), deterministically for a given ``seed``.

    Record ``i`` sits at stream position ``start_ms + span_ms * i // count``; an event's time is
    that position shifted by up to ``±jitter_ms`` (so events arrive out of order), a very late
    event's time is exactly ``position - very_late_by_ms``.
    """
    _check_arguments(count, partitions, organizations, customers_per_org, codes, span_ms, jitter_ms,
                     (duplicate_share, malformed_share, very_late_share, conflicting_share,
                      reused_share))
    rng = random.Random(seed)
    traffic = _Traffic(rng, partitions, organizations, customers_per_org, codes)
    malformed_until = malformed_share
    very_late_until = malformed_until + very_late_share
    duplicate_until = very_late_until + duplicate_share
    conflicting_until = duplicate_until + conflicting_share
    reused_until = conflicting_until + reused_share
    recent: deque[GeneratedRecord] = deque(maxlen=_DUPLICATE_REACH)
    recent_ms: deque[int] = deque(maxlen=_DUPLICATE_REACH)
    first: list[GeneratedRecord] = []  # the ids ``reused`` takes
    for i in range(count):
        position = start_ms + span_ms * i // count
        draw = rng.random()
        if draw < malformed_until:
            yield traffic.malformed(position)
        elif draw < very_late_until:
            yield traffic.event(position - very_late_by_ms, kind="very_late")
        elif draw < duplicate_until and recent:
            yield traffic.duplicate(rng.choice(recent))
        elif draw < conflicting_until and recent:
            at = traffic.below(len(recent))
            yield traffic.conflicting(recent[at], recent_ms[at], conflict_shift_ms)
        elif draw < reused_until and first:
            yield traffic.reused(first[traffic.below(len(first))], position)
        else:
            timestamp = position + traffic.below(2 * jitter_ms + 1) - jitter_ms
            record = traffic.event(timestamp)
            recent.append(record)
            recent_ms.append(timestamp)
            if len(first) < _DUPLICATE_REACH:
                first.append(record)
            yield record


def _check_arguments(count: int, partitions: int, organizations: int, customers_per_org: int,
                     codes: tuple[str, ...], span_ms: int, jitter_ms: int,
                     shares: tuple[float, ...]) -> None:
    for name, value in (("count", count), ("span_ms", span_ms), ("jitter_ms", jitter_ms)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    for name, value in (("partitions", partitions), ("organizations", organizations),
                        ("customers_per_org", customers_per_org)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not codes or not all(codes):
        raise ValueError("codes must be non-empty strings")
    if any(not 0 <= share <= 1 for share in shares) or sum(shares) > 1:
        raise ValueError(f"shares must lie in [0, 1] and add up to at most 1, got {shares}")


class _Traffic:
    """Draws customers, events and malformed records from one seeded RNG."""

    def __init__(self, rng: random.Random, partitions: int, organizations: int,
                 customers_per_org: int, codes: tuple[str, ...]) -> None:
        self.rng = rng
        self.partitions = partitions
        self.codes = codes
        customers = []
        for org in range(organizations):
            org_id = f"org_{org + 1:03d}"
            for cust in range(customers_per_org):
                cust_id = f"cus_{org + 1:03d}_{cust + 1:04d}"
                key = f"{org_id}:{cust_id}".encode()
                customers.append((org_id, cust_id, key, partition_for(key, partitions)))
        rng.shuffle(customers)
        self.customers = customers
        # A few customers make most of the traffic (Zipf-like), as in real usage.
        weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(customers))]
        total, self.cum_weights = 0.0, []
        for weight in weights:
            total += weight
            self.cum_weights.append(total)

    def pick(self, options: tuple | list):
        """``rng.choice`` at a third of the cost (this is the hot path of a benchmark feed)."""
        return options[int(self.rng.random() * len(options))]

    def below(self, n: int) -> int:
        """A random int in ``[0, n)``; floats are exact enough below 2**52, else getrandbits."""
        return int(self.rng.random() * n) if n < 1 << 52 else self.rng.randrange(n)

    def _customer(self) -> tuple[str, str, bytes, int]:
        index = bisect_right(self.cum_weights, self.rng.random() * self.cum_weights[-1])
        return self.customers[min(index, len(self.customers) - 1)]

    def fields(self, timestamp_ms: int) -> tuple[dict, bytes, int]:
        """A valid event as a dict (``value`` possibly a raw JSON number), its key and partition."""
        rng = self.rng
        org_id, cust_id, key, partition = self._customer()
        code = self.pick(self.codes)
        event: dict = {
            "transaction_id": self.uuid4(),
            "organization_id": org_id,
            "external_customer_id": cust_id,
            "code": code,
            "timestamp": self.timestamp(timestamp_ms),
        }
        properties = self.properties()
        if properties is not None:
            event["properties"] = properties
        draw = rng.random()
        if draw < 0.03:
            event["value"] = None
        elif draw >= 0.08:  # 5 % have no value at all
            text = self.decimal_text(*_PROFILES.get(code, _DEFAULT_PROFILE))
            event["value"] = text if rng.random() < 0.4 else msgspec.Raw(text.encode())
        return event, key, partition

    def event(self, timestamp_ms: int, kind: str = "event") -> GeneratedRecord:
        event, key, partition = self.fields(timestamp_ms)
        return GeneratedRecord(kind, partition, key, _encode(event))

    def duplicate(self, original: GeneratedRecord) -> GeneratedRecord:
        partition = original.partition
        if self.partitions > 1 and self.rng.random() < 0.5:
            partition = (partition + self.rng.randrange(1, self.partitions)) % self.partitions
        return GeneratedRecord("duplicate", partition, original.key, original.value)

    def conflicting(self, original: GeneratedRecord, original_ms: int,
                    shift_ms: int) -> GeneratedRecord:
        """The original's transaction re-stamped (and maybe revalued), on a random partition."""
        event = msgspec.json.decode(original.value)
        event["timestamp"] = self.timestamp(max(0, original_ms + self.below(2 * shift_ms + 1) - shift_ms))
        if self.rng.random() < 0.5:
            event["value"] = self.decimal_text(*_PROFILES.get(event["code"], _DEFAULT_PROFILE))
        return GeneratedRecord("conflicting", self.rng.randrange(self.partitions), original.key,
                               _encode(event))

    def reused(self, original: GeneratedRecord, position_ms: int) -> GeneratedRecord:
        """A new event at ``position_ms`` of the original's customer, reusing its transaction id."""
        old = msgspec.json.decode(original.value)
        event, _key, _partition = self.fields(position_ms)
        for name in ("transaction_id", "organization_id", "external_customer_id"):
            event[name] = old[name]
        return GeneratedRecord("reused", original.partition, original.key, _encode(event))

    def malformed(self, position_ms: int) -> GeneratedRecord:
        event, key, partition = self.fields(position_ms)
        value = self.rng.choice(_MALFORMERS)(self, event, position_ms)
        if self.rng.random() < 0.1:  # some producers send no key at all
            return GeneratedRecord("malformed", self.rng.randrange(self.partitions), None, value)
        return GeneratedRecord("malformed", partition, key, value)

    def timestamp(self, ms: int) -> str | int:
        """Half epoch milliseconds, half RFC 3339 with 'Z' or a numeric offset."""
        rng = self.rng
        if rng.random() < 0.5:
            return ms
        minutes, suffix = self.pick(_OFFSETS)
        fraction = f"{ms % 1000:03d}" + ("000" if rng.random() < 0.1 else "")
        return f"{_iso_seconds(ms - ms % 1000, minutes)}.{fraction}{suffix}"

    def properties(self) -> dict | None:
        draw = self.rng.random()
        if draw < 0.1:
            return None
        if draw < 0.2:
            return {}
        properties = {"region": self.pick(_REGIONS), "plan": self.pick(_PLANS)}
        if draw > 0.85:
            properties["endpoint"] = self.pick(_ENDPOINTS)
        return properties

    def uuid4(self) -> str:
        """A random (version 4, RFC 4122 variant) UUID drawn from the seeded RNG."""
        bits = self.rng.getrandbits(128)
        h = f"{bits:032x}"
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[bits >> 60 & 3]}{h[17:20]}-{h[20:]}"

    def decimal_text(self, largest: int, scales: tuple[int, ...]) -> str:
        """A non-negative decimal in plain notation, made with integer arithmetic only."""
        scale = self.pick(scales)
        return _plain(self.below(largest * 10**scale + 1), scale)


def _plain(units: int, scale: int) -> str:
    """``units * 10**-scale`` written out: ``_plain(12345, 3) == "12.345"``."""
    if scale == 0:
        return str(units)
    digits = str(units).rjust(scale + 1, "0")
    return f"{digits[:-scale]}.{digits[-scale:]}"


@lru_cache(maxsize=4096)  # stream times cluster, so most seconds repeat
def _iso_seconds(ms: int, offset_minutes: int) -> str:
    local = _EPOCH + timedelta(milliseconds=ms - ms % 1000, minutes=offset_minutes)
    return local.strftime("%Y-%m-%dT%H:%M:%S")


# Each malformer turns a valid event into bytes that are not a valid event.
def _truncated(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    text = _encode(event)
    return text[: traffic.rng.randrange(1, len(text) - 1)]


def _not_json(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    tid = event["transaction_id"]
    return traffic.rng.choice((
        b"",
        f"transaction_id={tid};code=api_calls;value=1".encode(),
        f"{{'transaction_id': '{tid}', 'value': 1}}".encode(),  # Python repr, not JSON
        _encode(event)[:-1] + b',"value":NaN}',  # NaN is not a JSON token
        b'"just a string"', b"null", b"42",
    ))


def _not_utf8(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    event["properties"] = {"region": "@@"}
    return _encode(event).replace(b"@@", b"Z\xfcrich")  # Latin-1, not UTF-8


def _array(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    return b"[" + _encode(event) + b"]"


def _missing_field(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    del event[traffic.rng.choice(_REQUIRED)]
    return _encode(event)


def _empty_id(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    event[traffic.rng.choice(_ID_FIELDS)] = ""
    return _encode(event)


def _long_id(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    field = traffic.rng.choice(_ID_FIELDS)
    event[field] = (event[field] * 300)[:300]
    return _encode(event)


def _wrong_type(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    field, bad = traffic.rng.choice((
        ("transaction_id", traffic.rng.randrange(10**9)),
        ("organization_id", None),
        ("code", ["api_calls"]),
        ("timestamp", True),
        ("timestamp", None),
        ("value", True),
        ("value", {"amount": 1}),
        ("properties", "region=eu-west-1"),
        ("properties", ["eu-west-1"]),
    ))
    event[field] = bad
    return _encode(event)


def _bad_timestamp(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    event["timestamp"] = traffic.rng.choice((
        "yesterday", "", "2026-13-45T99:61:00Z", "01/02/2026 10:00:00", "2026-01-01T00:00:05.123+2h",
    ))
    return _encode(event)


def _naive_timestamp(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    event["timestamp"] = f"{_iso_seconds(position_ms, 0)}.{position_ms % 1000:03d}"
    return _encode(event)


def _float_timestamp(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    seconds = _plain(position_ms, 3)  # epoch seconds with a fraction
    event["timestamp"] = msgspec.Raw(traffic.rng.choice((seconds, f"{position_ms}.5")).encode())
    return _encode(event)


def _bad_value(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    event["value"] = traffic.rng.choice(("NaN", "Infinity", "-Infinity", "abc", "", "1,5"))
    return _encode(event)


def _too_precise_value(traffic: _Traffic, event: dict, position_ms: int) -> bytes:
    text = _plain(traffic.rng.randrange(1, 10**27), 25)
    event["value"] = text if traffic.rng.random() < 0.5 else msgspec.Raw(text.encode())
    return _encode(event)


_MALFORMERS: tuple[Callable[[_Traffic, dict, int], bytes], ...] = (
    _truncated, _not_json, _not_utf8, _array, _missing_field, _empty_id, _long_id, _wrong_type,
    _bad_timestamp, _naive_timestamp, _float_timestamp, _bad_value, _too_precise_value,
)


class ProduceError(RuntimeError):
    """Some records were not delivered; the message says how many and the first error."""


def produce(
    kafka: KafkaConnection | str,
    topic: str,
    records: Iterable[GeneratedRecord],
    *,
    rate: float | None = None,
    progress: bool = False,
    total: int | None = None,
    flush_timeout: float = 60.0,
) -> dict[str, int]:
    """Produce ``records`` to ``topic`` in order; return how many of each kind were sent.

    Idempotent producer (no duplicates from retries, order kept per partition). ``rate`` limits
    records per second; ``progress`` draws a bar on stderr (``total`` defaults to ``len(records)``
    when it has one). Raises :class:`ProduceError` after the flush if any delivery failed.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if total is None and hasattr(records, "__len__"):
        total = len(records)  # type: ignore[arg-type]
    failures: list[object] = []
    producer = as_connection(kafka).producer({
        "enable.idempotence": True,
        "linger.ms": 5,
        "batch.num.messages": 10_000,
        "batch.size": 1_000_000,
        "queue.buffering.max.messages": 1_000_000,
        "queue.buffering.max.kbytes": 1_048_576,
        "delivery.report.only.error": True,
        "on_delivery": lambda err, msg: failures.append(err),
    })
    counts = dict.fromkeys(KINDS, 0)
    bar = _ProgressBar(total) if progress else None
    started = time.monotonic()
    sent = 0
    for record in records:
        if rate is not None:
            _pace(producer, started + sent / rate)
        refused = _produce_one(producer, topic, record)
        if refused is not None:
            failures.append(refused)
        counts[record.kind] += 1
        sent += 1
        if sent % 1_000 == 0:
            producer.poll(0)  # serve delivery reports (only failures are reported)
        if bar is not None:
            bar.update(sent)
    unsent = producer.flush(flush_timeout)
    if bar is not None:
        bar.finish(sent)
    if failures or unsent:
        first = failures[0] if failures else f"flush timed out after {flush_timeout:g}s"
        raise ProduceError(
            f"{len(failures) + unsent} of {sent} records to {topic!r} were not delivered; first: {first}"
        )
    return counts


def _produce_one(producer: Producer, topic: str, record: GeneratedRecord) -> str | None:
    """Hand one record to the producer; the reason if it refused it at once (e.g. no such partition)."""
    partition = -1 if record.partition is None else record.partition  # -1: by key
    while True:
        try:
            producer.produce(topic, record.value, record.key, partition)
            return None
        except BufferError:  # local queue full: let deliveries drain
            producer.poll(0.05)
        except KafkaException as err:
            return f"{topic}[{partition}]: {err}"


def _pace(producer: Producer, due: float) -> None:
    delay = due - time.monotonic()
    if delay > 0:
        producer.poll(0)
        time.sleep(delay)


class _ProgressBar:
    """A one-line progress bar on stderr, redrawn at most ten times a second."""

    width = 30

    def __init__(self, total: int | None, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.stream = stream
        self.started = time.monotonic()
        self.drawn_at = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.drawn_at >= 0.1:
            self.drawn_at = now
            self._draw(done, now)

    def finish(self, done: int) -> None:
        self._draw(done, time.monotonic())
        self.stream.write("\n")
        self.stream.flush()

    def _draw(self, done: int, now: float) -> None:
        speed = done / max(now - self.started, 1e-9)
        if self.total:
            filled = min(self.width, self.width * done // self.total)
            line = (f"{100 * done // self.total:3d}% [{'#' * filled}{'.' * (self.width - filled)}] "
                    f"{done:,}/{self.total:,}")
        else:
            line = f"{done:,} records"
        self.stream.write(f"\r{line}  {speed:,.0f} records/s ")
        self.stream.flush()
