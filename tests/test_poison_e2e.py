"""Every poison input of issue 12, mixed into normal traffic on the real broker, under SIGKILLs.

The flow must finish; the normal totals (ClickHouse and Redis live totals) must equal an
independent recomputation written here (it imports nothing from ``operators/`` or ``state/``);
each poison record must be in the DLQ with its reason; and the overflow pair (two events of the
largest value in one window) must be counted exactly.
"""

from __future__ import annotations

import decimal
import json
import random
from decimal import Decimal

from confluent_kafka import Producer

from deploy.broker import ensure_topic
from deploy.runner import init_recovery_store
from sinks.clickhouse_backend import connect
from support.crashes import run_with_sigkills
from support.flow import flow_env
from support.kafka import read_all, unique_topic
from support.redis import redis_server  # noqa: F401
from test_exactly_once import FAST_FLOW
from test_redis_keys import gateway_key

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
STEP_MS = 50  # event time advances 50 ms per record: every partition is in order, nothing late
PARTITIONS = 4
DAY_MS = 86_400_000
LARGEST = "99999999999999999999"
EXACT = decimal.Context(prec=100, traps=[decimal.Inexact])

# Ids that a ':'-joined Redis key would confuse, '%' and control characters.
ORGANIZATIONS = ["acme", "acme:eu", "a%3Ab", "a:b", "tab\there", "nul\x00org", "ünï"]
CUSTOMERS = ["eu:42", "42", "eu", "100%", "line\nbreak", "c"]
CODES = ["api_calls", "storage:gb"]


def event_body(txn: str, org: str, customer: str, code: str, timestamp, value: str, **extra) -> dict:
    return {"transaction_id": txn, "organization_id": org, "external_customer_id": customer,
            "code": code, "timestamp": timestamp, "value": value, **extra}


def nested_message(depth: int) -> bytes:
    """A valid event plus an unknown field nested ``depth`` deep (~2 bytes a level)."""
    body = json.dumps(event_body("deep", "acme", "c", "api_calls", START_MS, "1")).encode()
    return body[:-1] + b', "junk": ' + b"[" * depth + b"]" * depth + b"}"


def poison_records(at_ms: int) -> dict[str, tuple[bytes, str]]:
    """Name -> (value, the DLQ reason it must get)."""
    return {
        "deep": (nested_message(1_000), "too_deeply_nested"),
        "big": (b'{"transaction_id":"' + b"9" * 1_100_000, "malformed_json"),  # ~1 MB, unterminated
        "year_9999": (json.dumps(event_body("y9999", "acme", "c", "api_calls",
                                            "9999-12-31T00:00:00Z", "1")).encode(), "invalid_timestamp"),
        "year_2999": (json.dumps(event_body("y2999", "acme", "c", "api_calls",
                                            "2999-06-01T00:00:00Z", "1")).encode(), "invalid_timestamp"),
        # Within the accepted range, but far past its Kafka record's timestamp (MAX_FUTURE_SKEW).
        "year_2200": (json.dumps(event_body("y2200", "acme", "c", "api_calls",
                                            "2200-01-01T00:00:00Z", "1")).encode(), "future_timestamp"),
    }


class Stream:
    """Normal traffic with duplicates, the overflow pair and the poison records, in chunks."""

    def __init__(self, seed: int, chunks: int, per_chunk: int) -> None:
        self.rng = random.Random(seed)
        self.sequence = 0
        self.events: list[tuple] = []  # (org, customer, code, timestamp_ms, value text, txn) as sent
        self.chunks = []
        for i in range(chunks):
            self.chunks.append(self._chunk(per_chunk))
            if i == chunks // 2:
                self._add_overflow_pair(self.chunks[-1])  # event time goes on from the chunk's end
        poison = poison_records(START_MS)
        for i, (name, (value, _reason)) in enumerate(poison.items()):
            chunk = self.chunks[i % chunks]
            position = self.rng.randrange(len(chunk))
            chunk.insert(position, (f"poison-{name}".encode(), value, chunk[position][2],
                                    self.rng.randrange(PARTITIONS)))
        self.poison_reasons = {f"poison-{name}": reason for name, (_v, reason) in poison.items()}

    def _next_time(self) -> int:
        self.sequence += 1
        return START_MS + self.sequence * STEP_MS

    def _record(self, txn: str, org: str, customer: str, code: str, timestamp: int, value: str) -> tuple:
        self.events.append((org, customer, code, timestamp, value, txn))
        body = json.dumps(event_body(txn, org, customer, code, timestamp, value)).encode()
        return txn.encode(), body, timestamp, self.sequence % PARTITIONS

    def _chunk(self, count: int) -> list[tuple]:
        records = []
        for _ in range(count):
            rng = self.rng
            org, customer, code = rng.choice(ORGANIZATIONS), rng.choice(CUSTOMERS), rng.choice(CODES)
            value = f"{rng.randrange(-10**6, 10**9)}.{rng.randrange(10**18):018d}"[: rng.randrange(3, 30)]
            value = value.rstrip(".") or "0"
            txn = f"t{self.sequence}-{rng.getrandbits(32):08x}"
            record = self._record(txn, org, customer, code, self._next_time(), value)
            records.append(record)
            if rng.random() < 0.05:  # an exact re-send, right after: a duplicate, on time
                self.events.append(self.events[-1])
                records.append(record)
        return records

    def _add_overflow_pair(self, chunk: list[tuple]) -> None:
        while (START_MS + (self.sequence + 1) * STEP_MS) % 60_000 > 50_000:
            self._next_time()  # both in one minute window
        for i in range(2):
            chunk.append(self._record(f"whale-{i}", "whale:org", "w%1", "storage:gb", self._next_time(),
                                      LARGEST))


def produce_chunk(bootstrap: str, topic: str, chunk: list[tuple]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                         "message.max.bytes": 2_000_000})
    for key, value, timestamp, partition in chunk:
        producer.produce(topic, value, key, partition=partition, timestamp=timestamp)
    assert producer.flush(60) == 0


def expected_windows(events: list[tuple]) -> dict[tuple, tuple[int, Decimal]]:
    """The oracle: first sighting of each (organization, transaction), summed per minute."""
    seen: set = set()
    windows: dict[tuple, tuple[int, Decimal]] = {}
    for org, customer, code, timestamp, value, txn in events:
        if (org, txn) in seen:
            continue
        seen.add((org, txn))
        key = (org, customer, code, timestamp - timestamp % 60_000)
        count, total = windows.get(key, (0, Decimal(0)))
        windows[key] = (count + 1, EXACT.add(total, Decimal(value)))
    return windows


def stored_windows(url: str) -> dict[tuple, tuple[int, Decimal]]:
    backend = connect(url)
    try:
        _, rows = backend.query(
            "SELECT organization_id, external_customer_id, code, toUnixTimestamp64Milli(window_start), "
            "event_count, total_value FROM usage_aggregates FINAL")
        _, [(late,)] = backend.query("SELECT count() FROM usage_late_events")
    finally:
        backend.close()
    assert late == 0, "every normal event is on time"
    return {(r[0], r[1], r[2], int(r[3])): (int(r[4]), Decimal(r[5])) for r in rows}


def test_poison_inputs_among_normal_traffic_under_sigkills(kafka_broker, chdb_url, redis_server,
                                                           tmp_path, request):
    kills_wanted = request.config.getoption("--kills")
    bootstrap = kafka_broker.bootstrap
    topic, dlq = unique_topic("poison"), unique_topic("dlq")
    ensure_topic(bootstrap, topic, PARTITIONS)
    ensure_topic(bootstrap, dlq, 1)
    stream = Stream(seed=kills_wanted, chunks=kills_wanted + 1, per_chunk=3_000)
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    env = flow_env(bootstrap, topic, dlq, chdb_url, **FAST_FLOW, REDIS_URL=redis_server.url,
                   ROLLUPS="hour,day")

    kills = run_with_sigkills(env, recovery, stream.chunks,
                              lambda chunk: produce_chunk(bootstrap, topic, chunk), kills_wanted,
                              random.Random(kills_wanted), resume_wait_s=(0.2, 1.5))
    assert kills == kills_wanted

    # Normal totals, exact, the overflow pair included.
    expected = expected_windows(stream.events)
    whale = {key: total for key, total in expected.items() if key[0] == "whale:org"}
    assert list(whale.values()) == [(2, Decimal(2 * int(LARGEST)))]
    assert stored_windows(chdb_url) == expected

    # Every poison record is in the DLQ with its reason (at-least-once: copies allowed), no other.
    letters = read_all(bootstrap, dlq, timeout=60)
    reasons = {(m.key().decode(), dict(m.headers())["tallyflow.reason"].decode()) for m in letters}
    assert reasons == set(stream.poison_reasons.items())
    [big] = {dict(m.headers())["tallyflow.original.size"] for m in letters
             if m.key() == b"poison-big"}
    assert int(big) > 1_000_000 > max(len(m.value()) for m in letters)

    # Live totals: each customer's day, under the key a gateway builds, whatever its ids hold.
    days: dict[str, tuple[int, Decimal]] = {}
    for (org, customer, code, start), (count, total) in expected.items():
        key = gateway_key("usage", org, customer, code, period="2026-01-01")
        had = days.get(key, (0, Decimal(0)))
        days[key] = (had[0] + count, EXACT.add(had[1], total))
    client = redis_server.client()
    stored = {}
    for key in client.scan_iter("tallyflow:usage:*:2026-01-01", count=1_000):
        fields = client.hgetall(key)
        stored[key.decode()] = (int(fields[b"count"]), Decimal(fields[b"value"].decode()))
    assert stored == days
