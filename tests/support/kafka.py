"""A real dev broker for tests, and a reader that trusts partition EOF, not end offsets.

Tansu reports a wrong high watermark (FIELD-NOTES.md), so :func:`read_all` stops at librdkafka's
partition-EOF signal, which arrives after the real last record.
"""

from __future__ import annotations

import time
import uuid
from typing import Iterator

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, TopicPartition

from deploy.broker import DevBroker


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[DevBroker]:
    """One Tansu broker on a free loopback port for the whole test session."""
    with DevBroker() as broker:
        yield broker


def unique_topic(prefix: str = "test") -> str:
    """A fresh topic name, so tests sharing the session broker never see each other's data."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def read_all(bootstrap: str, topic: str, *, timeout: float = 30.0) -> list[Message]:
    """Every record of every partition of ``topic``, from the beginning to partition EOF.

    Records keep their order within a partition. Raises TimeoutError if some partition has not
    reached its end within ``timeout`` seconds.
    """
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": f"read-all-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "earliest",
    })
    try:
        metadata = consumer.list_topics(timeout=10).topics.get(topic)
        if metadata is None:
            raise KafkaException(f"topic {topic!r} does not exist")
        pending = set(metadata.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        records: list[Message] = []
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"read {len(records)} records of {topic!r}; partitions {sorted(pending)} "
                    f"did not reach their end within {timeout:g}s"
                )
            for message in consumer.consume(num_messages=10_000, timeout=0.5):
                error = message.error()
                if error is None:
                    records.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition())
                else:
                    raise KafkaException(error)
        return records
    finally:
        consumer.close()
