"""Kafka input whose recovery state is the offset and the partition's watermark.

Each Kafka partition is one Bytewax source partition. A poll of up to
``batch_size`` records is validated and classified in one go
(``operators.intake``) and leaves the source as a single ``IntakeBatch``.

Guarantee: with a Bytewax recovery store, every record is processed exactly
once into state: the resume state is the next offset to read plus the largest
event time seen, snapshotted in the same epoch as the rest of the flow.

    >>> source = UsageSource(["127.0.0.1:9092"], "usage-events", intake_factory=None)
    >>> source.stop_at_end
    False
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from collections.abc import Sequence
from functools import partial
from operator import is_
from typing import Callable, Optional

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import (OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError,
                             TopicPartition)

from operators.telemetry import lag, metrics, tracing
from operators.graceful_stop import stop_requested
from operators.intake import IntakeBatch, IntakeLogic
from sinks.kafka_client import KafkaConnection, KafkaConsumer, as_connection, require_topic

log = logging.getLogger(__name__)

_IDLE_BACKOFF = timedelta(milliseconds=20)

IntakeFactory = Callable[[int, int, Optional[int]], IntakeLogic]
"""Builds the intake for (partition, n_partitions, resumed max event time)."""


def readable_headers(message, topic: str, partition: int) -> list | None:
    """``message.headers()``, or None when they cannot be read, with a warning.

    confluent-kafka turns header names into ``str``; a producer that wrote a name that is
    not UTF-8 makes ``headers()`` raise, and a raise here would stop the flow and replay into
    the same record after every restart. Headers are not part of the input contract (the
    value is), so the record is judged by its value as usual: counted if valid, dead-lettered
    with its reason (without the headers nobody can read) if not.

    >>> class Message:
    ...     def offset(self): return 7
    ...     def headers(self): raise UnicodeDecodeError("utf-8", b"\\xff", 0, 1, "invalid start byte")
    >>> readable_headers(Message(), "usage", 0) is None
    True
    """
    try:
        return message.headers()
    except Exception as err:  # noqa: BLE001 - whatever librdkafka's copy holds, the record goes on
        log.warning("unreadable Kafka headers dropped", extra={
            "topic": topic, "partition": partition, "offset": message.offset(), "error": repr(err)[:200]})
        return None


_NO_ERROR = partial(is_, None)
"""Whether ``Message.error()`` says no error (by identity: ``KafkaError`` cannot be compared with None)."""


class PolledRecords(Sequence):
    """One poll's messages (none with an error) as the intake reads them: columns, read in bulk.

    Offsets and values are read for every message, timestamps when the intake asks; keys and
    headers only for a record that needs them (a dead letter, a traced record), headers once per
    record (:func:`readable_headers`, so unreadable ones warn once). As a sequence it holds each
    record as a :data:`operators.intake.KafkaRecord` tuple, built on access (tracing reads them)::

        >>> from confluent_kafka import Message
        >>> records = PolledRecords([Message(offset=3, key=b"k", value=b"v", headers=[("h", b"1")],
        ...                                  timestamp=(0, -1))], "usage", 0)
        >>> records.offsets, records.letter(0), list(records)
        ([3], (b'k', [('h', b'1')]), [(3, b'k', b'v', [('h', b'1')], None)])
    """

    def __init__(self, messages: list, topic: str, partition: int) -> None:
        self.messages = messages
        self.offsets = [message.offset() for message in messages]  # comprehensions: faster than
        self.values = [message.value() for message in messages]  # map(methodcaller) here
        self._topic, self._partition = topic, partition
        self._headers: dict[int, list | None] = {}

    def times(self) -> list[tuple[int, int]]:
        """Each record's ``(kind, timestamp_ms)``, stored in the log: the same on every replay."""
        return [message.timestamp() for message in self.messages]

    def headers(self, index: int) -> list | None:
        """The record's headers, or None when unreadable (warned once)."""
        if index not in self._headers:
            self._headers[index] = readable_headers(self.messages[index], self._topic, self._partition)
        return self._headers[index]

    def letter(self, index: int) -> tuple:
        """What a dead letter of the record carries from Kafka: ``(key, headers)``."""
        return self.messages[index].key(), self.headers(index)

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, index: int) -> tuple:
        if index.__class__ is slice:
            return [self[i] for i in range(len(self))[index]]
        message = self.messages[index]
        kind, timestamp_ms = message.timestamp()
        return (message.offset(), message.key(), message.value(), self.headers(index % len(self)),
                None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp_ms)


@dataclass(frozen=True)
class PartitionResume:
    """Where a partition resumes: the next offset to read and the max event time seen."""

    next_offset: int
    max_event_ms: int | None


class UsagePartition(StatefulSourcePartition[IntakeBatch, PartitionResume]):
    """Reads one Kafka partition and runs its intake."""

    def __init__(
        self,
        consumer: Consumer,
        topic: str,
        partition: int,
        intake: IntakeLogic,
        resume: PartitionResume | None,
        batch_size: int,
        stop_at_end: bool,
        idle_timeout_s: float | None = None,
    ) -> None:
        self._consumer = consumer
        self._idle_timeout_s = idle_timeout_s
        self._last_record_at = time.monotonic()
        self._idle = False
        self._topic = topic
        self._partition = partition
        self._intake = intake
        self._batch_size = batch_size
        self._stop_at_end = stop_at_end
        self._next_offset = resume.next_offset if resume else OFFSET_BEGINNING
        # asked before the assignment: the query connects the consumer to the broker, and a
        # consumer assigned before it is connected waits ~0.5 s for its first records
        self._end_offset_at_start = self._end_offset() if stop_at_end else None
        self._announced = False
        self._finished = False
        self._awake_at: datetime | None = None
        self._lag_probe = lag.LagProbe(topic, partition)
        self._tracing = tracing.IntakeTracing(topic, partition)
        metrics.declare_partition(partition)
        consumer.assign([TopicPartition(topic, partition, self._next_offset)])

    def _end_offset(self) -> int:
        _low, high = self._consumer.get_watermark_offsets(
            TopicPartition(self._topic, self._partition), timeout=10
        )
        return high

    def next_batch(self) -> list[IntakeBatch]:
        if self._finished or stop_requested():
            raise StopIteration()
        messages = self._consumer.consume(self._batch_size, 0.0)
        reached_end, eof_offset = False, None
        errors = [message.error() for message in messages]
        if not all(map(_NO_ERROR, errors)):  # rare: end of partition, broker trouble
            for error, message in zip(errors, messages):
                if error is None:
                    continue
                if error.code() == KafkaError._PARTITION_EOF:
                    eof_offset = message.offset()
                    reached_end = self._reached_stop_offset(eof_offset)
                    continue
                self._on_error(error)
            messages = [message for error, message in zip(errors, messages) if error is None]
        records = PolledRecords(messages, self._topic, self._partition)
        if records:
            self._next_offset = records.offsets[-1] + 1
            self._last_record_at = time.monotonic()
        self._lag_probe.maybe_record(self._consumer, self._next_offset, eof_offset)
        if reached_end:
            self._finished = True
        went_idle = self._went_idle(bool(records))
        if not records and not reached_end and self._announced and not went_idle:
            self._awake_at = datetime.now(timezone.utc) + _IDLE_BACKOFF
            return []
        self._awake_at = None
        self._announced = True
        return [self._process(records, reached_end)]

    def _process(self, records: PolledRecords, reached_end: bool) -> IntakeBatch:
        """Run the intake over one poll and report it (metrics, status page, sampled traces)."""
        traced = self._tracing.begin(records)
        batch = self._intake.process_columns(records.offsets, records.values, records.times(),
                                             records.letter, at_end=reached_end, idle=self._idle)
        if traced is not None:
            self._tracing.end(batch, traced)
        metrics.record_intake(batch, self._intake.watermark.max_event_ms)
        return batch

    def _went_idle(self, got_records: bool) -> bool:
        """``IDLE_TIMEOUT``: after that long without records (wall clock) this partition
        stops holding back the flow's watermark, until it sends again."""
        if got_records:
            self._idle = False
            return False
        if self._idle or self._idle_timeout_s is None:
            return False
        if time.monotonic() - self._last_record_at >= self._idle_timeout_s:
            self._idle = True
            return True
        return False

    def _reached_stop_offset(self, eof_offset: int) -> bool:
        # The dev broker under-reports end offsets (FIELD-NOTES), so the end is
        # the EOF signal, taken once we are at least at the end seen at start.
        if not self._stop_at_end:
            return False
        return eof_offset >= (self._end_offset_at_start or 0)

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal() or not error.retriable():
            raise RuntimeError(
                f"Kafka error reading {self._topic}[{self._partition}]: {error.str()}"
            )
        log.warning("retriable Kafka error", extra={"topic": self._topic,
                    "partition": self._partition, "error": error.str()})

    def next_awake(self) -> Optional[datetime]:
        return self._awake_at

    def snapshot(self) -> PartitionResume:
        metrics.record_source_snapshot()
        next_offset = self._next_offset if self._next_offset >= 0 else 0
        return PartitionResume(next_offset, self._intake.watermark.max_event_ms)

    def close(self) -> None:
        self._consumer.close()


class UsageSource(FixedPartitionedSource[IntakeBatch, PartitionResume]):
    """All partitions of one Kafka topic, each read by exactly one worker."""

    def __init__(
        self,
        kafka: KafkaConnection | list[str],
        topic: str,
        intake_factory: IntakeFactory | None,
        *,
        batch_size: int = 5_000,
        stop_at_end: bool = False,
        idle_timeout_ms: int | None = None,
        extra_config: dict | None = None,
    ) -> None:
        self.idle_timeout_ms = idle_timeout_ms
        self.kafka = as_connection(kafka)
        self.topic = topic
        self.intake_factory = intake_factory
        self.batch_size = batch_size
        self.stop_at_end = stop_at_end
        self.extra_config = dict(extra_config or {})
        self._partitions: int | None = None  # the topic's partition count, once asked

    def _consumer(self) -> KafkaConsumer:
        config = {
            "group.id": "tallyflow-usage",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
            # librdkafka stops fetching a partition whose queue holds queued.min.messages (100k)
            # and, by default, waits 1 s before asking again: a consumer slower than the broker
            # (catching up on a backlog, as after a restart) drained its queue in ~0.3 s and
            # then sat idle. Asking again after 10 ms keeps it fed.
            "fetch.queue.backoff.ms": 10,
        }
        config.update(self.extra_config)
        return self.kafka.consumer(config)

    def _partition_count(self, consumer: KafkaConsumer) -> int:
        """The topic's partition count, asked once a process (``list_parts``, then each part)."""
        if self._partitions is None:
            self._partitions = require_topic(consumer, self.topic, "USAGE_TOPIC")
        return self._partitions

    def list_parts(self) -> list[str]:
        consumer = self._consumer()
        try:
            return [str(p) for p in range(self._partition_count(consumer))]
        finally:
            consumer.close()

    def build_part(
        self, step_id: str, for_part: str, resume_state: PartitionResume | None
    ) -> UsagePartition:
        partition = int(for_part)
        consumer = self._consumer()
        n_partitions = self._partition_count(consumer)
        max_event_ms = resume_state.max_event_ms if resume_state else None
        intake = self.intake_factory(partition, n_partitions, max_event_ms)
        return UsagePartition(
            consumer, self.topic, partition, intake, resume_state,
            self.batch_size, self.stop_at_end,
            None if self.idle_timeout_ms is None else self.idle_timeout_ms / 1000,
        )
