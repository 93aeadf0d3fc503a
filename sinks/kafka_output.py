"""Kafka outputs: invalid input to the DLQ topic, late events to ``LATE_TOPIC``.

Guarantee: at-least-once. Every record is acknowledged by Kafka before the
epoch that produced it commits; after a crash, a replay may send some again.
Consumers deduplicate on the ``tallyflow.source.*`` headers (topic, partition,
offset), which name the input record exactly.

    >>> from state.records import DeadLetter
    >>> record = dead_letter_record(DeadLetter(b"k", b"{", [], "malformed_json", "…", "usage", 3, 42))
    >>> record.value, dict(record.headers)["tallyflow.source.offset"]
    (b'{', b'42')
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from bytewax.outputs import FixedPartitionedSink
from confluent_kafka import Producer

from sinks.kafka_client import KafkaConnection, as_connection, require_topic
from sinks.buffered import BufferedPartition
from state.records import DeadLetter, LateRecord


@dataclass(frozen=True)
class OutboundRecord:
    key: bytes | None
    value: bytes | None
    headers: list


MAX_RECORD_BYTES = 1_000_000
"""librdkafka's ``message.max.bytes`` for the output producers, set on purpose.

An input topic may take records as large as the broker allows (about 1 MiB by default, more
if configured), which is more than librdkafka's own default. An output record larger than
:data:`FIT_BYTES` is cut to fit (:func:`fit_record`), so no input record, however large, can
make its dead letter or late event undeliverable. A DLQ or late topic must accept records of
this size (Kafka's default ``max.message.bytes``, 1,048,588, does).
"""
FIT_BYTES = MAX_RECORD_BYTES - 8_192
"""The most key, value and header bytes an output record carries (the rest: record framing)."""
_HEADER_OVERHEAD = 16  # a header's framing in a record batch, generously (varints)


def fit_record(record: OutboundRecord, limit: int = FIT_BYTES) -> OutboundRecord:
    """``record`` if it fits in ``limit`` bytes, else a copy cut to fit, saying what was cut.

    The value keeps its first bytes; ``tallyflow.original.size`` gives its size before the
    cut and ``tallyflow.truncated`` what was cut (``value``, and ``key`` or ``headers`` when
    those alone took more than an eighth of the limit: the key is cut, foreign headers dropped).

    >>> cut = fit_record(OutboundRecord(b"k", b"x" * 5_000, [("tallyflow.reason", b"r")]), 1_000)
    >>> len(cut.value), dict(cut.headers)["tallyflow.original.size"], dict(cut.headers)["tallyflow.truncated"]
    (871, b'5000', b'value')
    >>> fit_record(small := OutboundRecord(None, b"{}", []), 1_000) is small
    True
    """
    key, value, headers = record.key, record.value or b"", record.headers
    if len(key or b"") + len(value) + _headers_size(headers) <= limit:
        return record
    cut = []
    if _headers_size(headers) > limit // 8:
        headers = [h for h in headers if h[0].startswith("tallyflow.")]
        cut.append("headers")
    if key is not None and len(key) > limit // 8:
        key = key[: limit // 8]
        cut.append("key")
    headers = [*headers, ("tallyflow.original.size", str(len(value)).encode())]
    room = limit - len(key or b"") - _headers_size(headers) - _headers_size(
        [("tallyflow.truncated", b"headers,key,value")])
    if len(value) > room:
        value = value[: max(room, 0)]
        cut.append("value")
    headers.append(("tallyflow.truncated", ",".join(cut).encode()))
    return OutboundRecord(key, value, headers)


def _headers_size(headers: list) -> int:
    return sum(len(name.encode()) + len(data or b"") + _HEADER_OVERHEAD for name, data in headers)


def dead_letter_record(letter: DeadLetter) -> OutboundRecord:
    """The original message, untouched, plus headers naming the reason and the source.

    Incoming ``tallyflow.*`` headers are dropped (see ``DeadLetter.dlq_headers``); a message too
    large for the DLQ is cut to fit (:func:`fit_record`).
    """
    return fit_record(OutboundRecord(letter.key, letter.value, letter.dlq_headers()))


def late_event_record(late: LateRecord) -> OutboundRecord:
    """The raw late event, keyed by organization and customer, with the reason and source."""
    key = f"{late.organization_id}:{late.external_customer_id}".encode()
    return fit_record(OutboundRecord(key, late.raw, [
        ("tallyflow.reason", late.reason.encode()),
        ("tallyflow.watermark", str(late.watermark_ms).encode()),
        ("tallyflow.source.topic", late.source_topic.encode()),
        ("tallyflow.source.partition", str(late.source_partition).encode()),
        ("tallyflow.source.offset", str(late.source_offset).encode()),
    ]))


_producers: dict[tuple[int, KafkaConnection], Producer] = {}
_producers_lock = threading.Lock()


def output_producer(kafka: KafkaConnection) -> Producer:
    """This worker's producer for ``kafka``, shared by all its Kafka outputs.

    Idempotent: no duplicates from its retries, order kept per partition. It cannot deliver
    before it holds a producer id, which librdkafka first asks for on a 500 ms timer, so each
    new producer's first flush used to wait about 0.5 s in the worker, once per sink
    partition. One producer per worker, created when a sink lists its partitions at start-up
    and connected at once, pays that once and mostly while the flow starts. Per worker, not
    per process: delivery callbacks run in the thread that polls or flushes, so each
    partition's failures are recorded before its own flush returns.

    Keyed by the OS thread: a Bytewax worker is a thread Python did not start, whose
    ``threading.local`` data does not outlive each call into Python.
    """
    key = (threading.get_ident(), kafka)
    with _producers_lock:
        producer = _producers.get(key)
        if producer is None:
            producer = _producers[key] = kafka.producer({
                "enable.idempotence": True,
                "message.max.bytes": MAX_RECORD_BYTES,  # records are cut to fit: fit_record
                "linger.ms": 5,
                "enable.sparse.connections": False,  # connect now, so the id comes sooner
            })
        return producer


class KafkaOutputPartition(BufferedPartition[OutboundRecord]):
    def __init__(self, producer: Producer, topic: str, max_rows: int, max_age_s: float) -> None:
        super().__init__(max_rows, max_age_s)
        self._producer = producer
        self._topic = topic
        self._failures: list[str] = []

    def _delivered(self, error, message) -> None:
        if error is not None:
            self._failures.append(f"{message.topic()}: {error}")

    def flush_items(self, items: list[OutboundRecord]) -> None:
        for record in items:
            self._producer.produce(
                self._topic, value=record.value, key=record.key,
                headers=record.headers, on_delivery=self._delivered,
            )
            self._producer.poll(0)
        remaining = self._producer.flush(60)
        if remaining or self._failures:
            failures, self._failures = self._failures, []
            raise RuntimeError(
                f"topic {self._topic!r} did not take {remaining} records: {failures[:3]}"
            )


class KafkaOutputSink(FixedPartitionedSink[OutboundRecord, None]):
    """One Kafka topic as ``partitions`` independent, idempotent producers."""

    def __init__(self, kafka: KafkaConnection | list[str], topic: str, *, partitions: int = 2,
                 max_rows: int = 10_000, max_age_s: float = 1.0, setting: str = "the output topic") -> None:
        self.kafka = as_connection(kafka)
        self.setting = setting
        self.topic = topic
        self.partitions = partitions
        self.max_rows = max_rows
        self.max_age_s = max_age_s

    def list_parts(self) -> list[str]:
        producer = output_producer(self.kafka)  # at start-up: it gets its producer id meanwhile
        require_topic(producer, self.topic, self.setting)  # a missing topic stops the flow now
        return [str(i) for i in range(self.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> KafkaOutputPartition:
        producer = output_producer(self.kafka)
        return KafkaOutputPartition(producer, self.topic, self.max_rows, self.max_age_s)
