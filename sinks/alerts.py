"""Quota alerts to Kafka (``ALERTS_TOPIC``), one per crossing, fenced in Redis against replays.

Guarantee: exactly one alert per (customer, code, period, measure, threshold) while Redis keeps
its fence keys; otherwise at-least-once, with a deterministic record key so a consumer can drop
the copy. Why, step by step:

* The live-totals step decides "first crossing" in its snapshotted state, so an epoch that has
  committed never alerts again. Only the uncommitted epoch a crash interrupts is replayed, and
  the replay may detect the same crossing again.
* Every alert is acknowledged by Kafka before its epoch commits (the sink flushes in
  ``snapshot()``), so none is lost.
* The fence: the Redis key ``tallyflow:alert:{org}:{customer}:{code}:{period}:{measure}:{threshold}``
  (every part percent-encoded, ``sinks.redis_client.key_part``); each flush runs the steps below. A replay finds ``sent`` and skips the alert, or
  finds ``pending`` (the crash came between the produce and step 4) and reads the alert's
  partition from the offset noted in the fence to see whether the record is there.

Remaining window: Redis unavailable (or restarted empty) AND a crash before the epoch commits.
Then the replay cannot see the fence and sends the alert again, with the same key. Alerts sent
while Redis is unavailable are not held back (holding them would block the flow): they are
sent unfenced and fenced as ``sent`` once Redis answers again.

    >>> from operators.live_totals import QuotaAlert
    >>> alert = QuotaAlert("org", "cus", "api", "day", "2026-01-31", "count", "100", "101", 0)
    >>> alert_key(alert)
    b'["org","cus","api","2026-01-31","count","100"]'
    >>> fence_key(QuotaAlert("acme", "eu:42", "api", "day", "2026-01-31", "count", "100", "101", 0))
    b'tallyflow:alert:acme:eu%3A42:api:2026-01-31:count:100'
    >>> alert_json(alert)
    b'{"organization_id":"org","external_customer_id":"cus","code":"api","period":"2026-01-31","period_kind":"day","measure":"count","threshold":100,"observed":101,"event_timestamp":"1970-01-01T00:00:00.000Z"}'
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections import OrderedDict

import msgspec
from bytewax.outputs import FixedPartitionedSink
from confluent_kafka import KafkaError, TopicPartition

from operators.live_totals import QuotaAlert
from operators.telemetry import metrics
from sinks.kafka_client import KafkaConnection, as_connection, require_topic
from sinks.buffered import BufferedPartition
from sinks.kafka_output import output_producer
from sinks.redis_client import REDIS_ERRORS, Breaker, connect, redis_key
from state.utc_calendar import utc_text

log = logging.getLogger(__name__)

FENCE_PREFIX = "tallyflow:alert"
FENCE_TTL_S = 40 * 86_400  # longer than any replay; the state fences committed epochs anyway
SENT = b"sent"
PENDING = b"pending:"
MAX_FENCE_DEBT = 100_000


_encoder = msgspec.json.Encoder()


def alert_key(alert: QuotaAlert) -> bytes:
    """The Kafka record key, also the fence's name: the alert's identity as a JSON array."""
    return _encoder.encode(list(alert.identity))


def fence_key(alert: QuotaAlert) -> bytes:
    """The Redis key fencing ``alert``: its identity, each part percent-encoded."""
    return redis_key(FENCE_PREFIX, *alert.identity).encode()


def alert_json(alert: QuotaAlert) -> bytes:
    """The alert record: counts as JSON integers, values as exact decimal strings."""
    number = int if alert.measure == "count" else str
    return _encoder.encode({
        "organization_id": alert.organization_id,
        "external_customer_id": alert.external_customer_id,
        "code": alert.code,
        "period": alert.period,
        "period_kind": alert.period_kind,
        "measure": alert.measure,
        "threshold": number(alert.threshold),
        "observed": number(alert.observed),
        "event_timestamp": utc_text(alert.event_timestamp_ms).replace(" ", "T") + "Z",
    })


class AlertsPartition(BufferedPartition[QuotaAlert]):
    """Fences, sends and confirms alerts; every flush completes before its epoch commits.

    Alerts are rare and urgent, so by default every batch is flushed as it arrives.
    """

    def __init__(self, kafka: KafkaConnection | list[str], topic: str, redis_url: str, *,
                 max_rows: int = 1_000, max_age_s: float = 0.0, scan_timeout_s: float = 30.0) -> None:
        super().__init__(max_rows, max_age_s)
        self._topic = topic
        self._kafka = as_connection(kafka)
        self._scan_timeout_s = scan_timeout_s
        self._producer = output_producer(self._kafka)
        self._offsets = self._kafka.consumer({"group.id": f"tallyflow-alerts-{uuid.uuid4().hex}",
                                              "enable.auto.commit": False})
        self._partitions = self._partition_count()
        self._redis = connect(redis_url, timeout_s=1.0)
        self._breaker = Breaker()
        self._debt: OrderedDict[bytes, None] = OrderedDict()  # fence keys: sent, not yet fenced as sent
        self._failures: list[str] = []

    def _partition_count(self) -> int:
        return require_topic(self._producer, self._topic, "ALERTS_TOPIC")

    def partition_of(self, key: bytes) -> int:
        return zlib.crc32(key) % self._partitions

    def flush(self) -> None:
        super().flush()
        if self._debt and self._breaker.ready():
            self._confirm()

    def flush_items(self, alerts: list[QuotaAlert]) -> None:
        keyed = {alert_key(alert): alert for alert in alerts}
        fence_of = {key: fence_key(alert) for key, alert in keyed.items()}
        # Step 1. Fence: SET NX "pending:<offset>" (the offset no earlier than the record).
        fences = self._fence(keyed, fence_of)
        # Step 2. Skip what a previous attempt sent (the fence says so, or the topic has it).
        to_send = []
        for key, alert in keyed.items():
            state = fences.get(key)
            if state == SENT:
                metrics.record_alert("replay_skipped")
            elif state is not None and state.startswith(PENDING) and self._in_topic(key, state):
                metrics.record_alert("replay_found")
                self._debt[fence_of[key]] = None
            else:
                to_send.append((key, alert))
        # Step 3. Produce; every alert is acknowledged before the epoch may commit.
        self._send(to_send)
        for key, _alert in to_send:
            metrics.record_alert("sent" if key in fences else "sent_unfenced")
            self._debt[fence_of[key]] = None
        # Step 4. Mark them sent (now, or once Redis answers again).
        self._confirm()

    def _fence(self, keyed: dict[bytes, QuotaAlert], fence_of: dict[bytes, bytes]) -> dict[bytes, bytes]:
        """Each alert's fence value (by record key) after SET NX; empty when Redis is unavailable."""
        if not self._breaker.ready():
            return {}
        try:
            hints = self._end_offsets({self.partition_of(key) for key in keyed})
            pipe = self._redis.pipeline(transaction=False)
            for key in keyed:
                hint = PENDING + str(hints[self.partition_of(key)]).encode()
                pipe.set(fence_of[key], hint, nx=True, ex=FENCE_TTL_S)
                pipe.get(fence_of[key])
            replies = pipe.execute()
        except REDIS_ERRORS as err:
            self._redis_failed(err, len(keyed))
            return {}
        self._breaker.succeeded()
        fences = {}
        for i, key in enumerate(keyed):
            created, value = replies[2 * i], replies[2 * i + 1]
            fences[key] = b"new" if created else value
        return fences

    def _end_offsets(self, partitions: set[int]) -> dict[int, int]:
        """A lower bound of the next offset of each partition (never above the true end)."""
        ends = {}
        for partition in partitions:
            _low, high = self._offsets.get_watermark_offsets(
                TopicPartition(self._topic, partition), timeout=10, cached=False)
            ends[partition] = max(high, 0)
        return ends

    def _in_topic(self, key: bytes, fence: bytes) -> bool:
        """Whether the record keyed ``key`` is in its partition at or after the fence's offset."""
        start = int(fence[len(PENDING):] or 0)
        partition = self.partition_of(key)
        consumer = self._kafka.consumer({"enable.partition.eof": True,
                                         "group.id": f"tallyflow-alerts-scan-{uuid.uuid4().hex}",
                                         "enable.auto.commit": False})
        try:
            consumer.assign([TopicPartition(self._topic, partition, start)])
            deadline = time.monotonic() + self._scan_timeout_s
            while time.monotonic() < deadline:
                for message in consumer.consume(1_000, 0.5):
                    error = message.error()
                    if error is None:
                        if message.key() == key:
                            return True
                    elif error.code() == KafkaError._PARTITION_EOF:
                        return False
                    else:
                        raise RuntimeError(f"reading alerts topic {self._topic!r}: {error.str()}")
            raise RuntimeError(f"alerts topic {self._topic!r} partition {partition} did not reach "
                               f"its end within {self._scan_timeout_s:g}s while checking a fence")
        finally:
            consumer.close()

    def _delivered(self, error, message) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")

    def _send(self, to_send: list[tuple[bytes, QuotaAlert]]) -> None:
        if not to_send:
            return
        for key, alert in to_send:
            self._producer.produce(self._topic, value=alert_json(alert), key=key,
                                   partition=self.partition_of(key), on_delivery=self._delivered)
            self._producer.poll(0)
        remaining = self._producer.flush(60)
        if remaining or self._failures:
            failures, self._failures = self._failures, []
            raise RuntimeError(
                f"alerts topic {self._topic!r} did not take {remaining} alerts: {failures[:3]}")

    def _confirm(self) -> None:
        """Fence every sent alert as ``sent``; keeps the debt when Redis is unavailable."""
        if not self._debt or not self._breaker.ready():
            self._bound_debt()
            return
        keys = list(self._debt)  # fence keys
        try:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.set(key, SENT, ex=FENCE_TTL_S)
            pipe.execute()
        except REDIS_ERRORS as err:
            self._redis_failed(err, len(keys))
            self._bound_debt()
            return
        if self._breaker.succeeded():
            log.info("Redis is back for alert fences", extra={"fenced": len(keys)})
        for key in keys:
            self._debt.pop(key, None)

    def _bound_debt(self) -> None:
        while len(self._debt) > MAX_FENCE_DEBT:
            self._debt.popitem(last=False)  # that alert could be sent twice by a replay, no more

    def _redis_failed(self, err: Exception, alerts: int) -> None:
        delay = self._breaker.failed(err)
        log.warning("Redis unavailable for alert fences: alerts are sent unfenced and fenced "
                    "when it returns", extra={"alerts": alerts, "unfenced": len(self._debt),
                                              "retry_in_s": delay, "error": str(err)})

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._offsets.close()
            self._redis.close()


class AlertsSink(FixedPartitionedSink[QuotaAlert, None]):
    """Quota alerts to ``topic``; ``partitions`` independent fenced writers (one producer per worker)."""

    def __init__(self, kafka: KafkaConnection | list[str], topic: str, redis_url: str, *,
                 partitions: int = 1) -> None:
        self.kafka = as_connection(kafka)
        self.topic = topic
        self.redis_url = redis_url
        self.partitions = partitions

    def list_parts(self) -> list[str]:
        return [str(i) for i in range(self.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> AlertsPartition:
        return AlertsPartition(self.kafka, self.topic, self.redis_url)
