"""End to end: conflicting copies and reused ids, SIGKILLs mid-stream, resumes with other poll
sizes and worker counts; ``usage_aggregates FINAL`` and ``usage_late_events`` equal the oracle.

The expectation comes from ``tests/oracle/usage.py`` over the records read back from the topic,
decoded here with the standard library (the stream has no malformed records), never from the
flow's own code.
"""

from __future__ import annotations

import random
import signal
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import msgspec

from deploy.broker import ensure_topic
from deploy.generator import generate, produce
from deploy.runner import init_recovery_store, start_flow
from oracle.usage import Record, Settings, compute
from support.flow import flow_env, read_output
from support.kafka import read_all, unique_topic

START_MS = 1_767_225_600_000
SCALE = 10**18
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_DECODE = msgspec.json.Decoder(float_hook=Decimal).decode
SETTINGS = Settings("tumbling", size_ms=60_000, out_of_orderness_ms=10_000, horizon_ms=300_000)


def timestamp_ms(value) -> int:
    """Epoch milliseconds of an RFC 3339 text (fractions truncated to the millisecond) or an int."""
    if isinstance(value, int):
        return value
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def scaled(value) -> int:
    if value is None:
        return 0
    return int(Decimal(str(value)) * SCALE)


def oracle_input(messages) -> tuple[dict, dict]:
    """Records per partition in offset order, and (partition, index) -> offset."""
    by_partition: dict[int, list] = {}
    for message in messages:
        by_partition.setdefault(message.partition(), []).append(message)
    partitions, offsets = {}, {}
    for partition, batch in by_partition.items():
        batch.sort(key=lambda m: m.offset())
        records = []
        for index, message in enumerate(batch):
            event = _DECODE(message.value())
            records.append(Record(event["organization_id"], event["external_customer_id"],
                                  event["code"], event["transaction_id"],
                                  timestamp_ms(event["timestamp"]), scaled(event.get("value"))))
            offsets[(partition, index)] = message.offset()
        partitions[partition] = records
    return partitions, offsets


def test_conflicting_copies_and_reused_ids_are_exact_after_kills_and_rescaled_resumes(
        kafka_broker, chdb_url, tmp_path):
    bootstrap = kafka_broker.bootstrap
    topic, dlq = unique_topic("determinism"), unique_topic("dlq")
    ensure_topic(bootstrap, topic, 4)
    ensure_topic(bootstrap, dlq, 1)
    produce(bootstrap, topic, generate(
        40_000, seed=21, partitions=4, start_ms=START_MS, span_ms=1_800_000, jitter_ms=20_000,
        duplicate_share=0.05, malformed_share=0.0, very_late_share=0.002,
        very_late_by_ms=120_000, conflicting_share=0.08, conflict_shift_ms=90_000,
        reused_share=0.04))
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    rng = random.Random(4)

    def env(batch_size: int) -> dict:
        return flow_env(bootstrap, topic, dlq, chdb_url, TALLYFLOW_SHARDS="4",
                        KAFKA_BATCH_SIZE=str(batch_size), SINK_BATCH_ROWS="300",
                        SINK_FLUSH_INTERVAL="100ms", DEDUP_HORIZON="5m", REDIS_URL="")

    for batch_size in (500, 61, 1_000):  # killed mid-stream, each with its own poll size
        flow = start_flow(env(batch_size), recovery_dir=recovery, snapshot_s=1, backup_s=10)
        time.sleep(rng.uniform(2.0, 4.0))
        if flow.poll() is None:
            flow.send_signal(signal.SIGKILL)
        flow.wait()
    final = start_flow(env(37), workers=2, recovery_dir=recovery, snapshot_s=1, backup_s=10)
    assert final.wait(timeout=600) == 0

    partitions, offsets = oracle_input(read_all(bootstrap, topic, timeout=60))
    expected = compute(partitions, SETTINGS)
    output = read_output(chdb_url)
    assert output.aggregates == {
        key[:4]: (count, Decimal(total) / SCALE) for key, (count, total, _end) in expected.windows.items()}
    assert output.rows_final == output.rows_distinct_keys
    assert {(org, txn, p, o) for org, txn, p, o in output.late} == {
        (org, txn, p, offsets[(p, i)]) for org, txn, p, i in expected.late}
