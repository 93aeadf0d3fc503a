"""The whole spine against the real broker and real ClickHouse engines.

A generated stream over 4 partitions with duplicates (some on another
partition), out-of-order timestamps, malformed and very late events runs
through ``dataflows.usage:flow`` in stop-at-end mode; ClickHouse must equal a
recomputation from the raw topic to the last digit.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from deploy.broker import ensure_topic
from deploy.generator import generate, produce
from deploy.runner import run_flow
from recovery.reconcile import diff, recompute
from support.flow import flow_env, read_output
from support.kafka import read_all, unique_topic

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
COUNT = 20_000


@pytest.fixture(scope="module")
def usage_stream(kafka_broker):
    topic = unique_topic("usage")
    ensure_topic(kafka_broker.bootstrap, topic, 4)
    records = list(generate(COUNT, seed=11, partitions=4, start_ms=START_MS, span_ms=600_000))
    produce(kafka_broker.bootstrap, topic, records)
    raw = [(m.partition(), m.offset(), m.value()) for m in read_all(kafka_broker.bootstrap, topic)]
    expected = recompute(raw, window_size_ms=60_000, max_out_of_orderness_ms=10_000)
    return topic, records, raw, expected


def test_the_generated_stream_has_every_hazard(usage_stream):
    _topic, records, raw, expected = usage_stream
    kinds = Counter(r.kind for r in records)
    assert len(raw) == COUNT
    assert kinds["duplicate"] > COUNT * 0.03 and kinds["malformed"] > COUNT * 0.005
    assert kinds["very_late"] >= 5
    assert expected.duplicates >= kinds["duplicate"]
    assert len(expected.invalid) == kinds["malformed"]


@pytest.mark.parametrize("backend", ["chdb", "http"])
def test_stop_at_end_totals_equal_recomputation(backend, usage_stream, kafka_broker, request):
    topic, records, raw, expected = usage_stream
    url = (request.getfixturevalue("chdb_url") if backend == "chdb"
           else request.getfixturevalue("dev_clickhouse").url)
    dlq_topic = unique_topic("dlq")
    ensure_topic(kafka_broker.bootstrap, dlq_topic, 1)

    run_flow(flow_env(kafka_broker.bootstrap, topic, dlq_topic, url, TALLYFLOW_SHARDS="8"),
             timeout=300)

    output = read_output(url)
    assert diff(expected.aggregates, output.aggregates) == []
    assert output.rows_final == output.rows_distinct_keys == len(expected.aggregates)
    assert sum(c for c, _ in output.aggregates.values()) == (
        len(raw) - len(expected.invalid) - len(expected.late) - expected.duplicates
    )

    # The DLQ holds exactly the malformed messages, bytes untouched, positions named.
    letters = read_all(kafka_broker.bootstrap, dlq_topic)
    positions = set()
    for letter in letters:
        headers = dict(letter.headers())
        positions.add((int(headers["tallyflow.source.partition"]),
                       int(headers["tallyflow.source.offset"])))
        assert headers["tallyflow.source.topic"] == topic.encode()
        assert headers["tallyflow.reason"] and headers["tallyflow.detail"]
    assert len(letters) == len(positions) == len(expected.invalid)
    assert positions == expected.invalid
    assert sorted(m.value() for m in letters) == sorted(r.value for r in records if r.kind == "malformed")

    # usage_late_events holds the very late events, each once, never counted.
    late_ids = {(org, txn) for org, txn, _p, _o in output.late}
    assert len(output.late) == len(late_ids) == len(expected.late)
    assert late_ids == expected.late
    very_late = {(e["organization_id"], e["transaction_id"])
                 for e in (json.loads(r.value) for r in records if r.kind == "very_late")}
    assert very_late <= late_ids


def test_two_worker_threads_share_the_embedded_engine(usage_stream, kafka_broker, chdb_url):
    # chdb allows one engine per process: both workers' sink partitions share it.
    topic, _records, _raw, expected = usage_stream
    run_flow(flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), chdb_url), workers=2,
             timeout=300)
    assert diff(expected.aggregates, read_output(chdb_url).aggregates) == []
