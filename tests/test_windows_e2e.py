"""Every window kind against the real broker and ClickHouse, compared with a recomputation."""

from __future__ import annotations

import json

import pytest
from confluent_kafka import Producer

from deploy.broker import ensure_topic
from deploy.generator import generate, produce
from deploy.runner import init_recovery_store, run_flow
from recovery.reconcile import diff, recompute
from sinks.clickhouse_backend import connect
from state.windows import row_version
from support.clickhouse import before_first_write
from support.flow import flow_env, read_output
from support.kafka import read_all, unique_topic

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@pytest.fixture(scope="module")
def generated(kafka_broker):
    topic = unique_topic("windows")
    ensure_topic(kafka_broker.bootstrap, topic, 4)
    produce(kafka_broker.bootstrap, topic,
            generate(20_000, seed=21, partitions=4, start_ms=START_MS, span_ms=600_000))
    raw = [(m.partition(), m.offset(), m.value()) for m in read_all(kafka_broker.bootstrap, topic)]
    return topic, raw


@pytest.mark.parametrize("kind, settings, expected_args", [
    ("sliding", {"WINDOW_KIND": "sliding", "WINDOW_SIZE": "1m", "WINDOW_SLIDE": "20s"},
     {"window_kind": "sliding", "window_slide_ms": 20_000}),
    ("session", {"WINDOW_KIND": "session", "SESSION_GAP": "10s"},
     {"window_kind": "session", "session_gap_ms": 10_000}),
    ("tumbling+lateness", {"ALLOWED_LATENESS": "30s"}, {"allowed_lateness_ms": 30_000}),
])
def test_window_kind_equals_recomputation(kind, settings, expected_args, generated, kafka_broker, chdb_url):
    topic, raw = generated
    dlq = unique_topic("dlq")
    run_flow(flow_env(kafka_broker.bootstrap, topic, dlq, chdb_url, TALLYFLOW_SHARDS="4", **settings))
    expected = recompute(raw, window_size_ms=60_000, max_out_of_orderness_ms=10_000, **expected_args)
    output = read_output(chdb_url)
    assert diff(expected.aggregates, output.aggregates) == []
    assert output.rows_final == output.rows_distinct_keys
    assert {(org, txn) for org, txn, _p, _o in output.late} == expected.late
    if kind == "sliding":  # an event counts in size/slide = 3 windows
        assert sum(c for c, _ in output.aggregates.values()) == 3 * len(expected.counted) - _edge_windows(expected)
    if kind == "session":
        assert len(output.aggregates) < len(expected.counted) / 2  # sessions really group events


def _edge_windows(expected) -> int:
    """Windows an event missed because they had closed on its partition (partially late)."""
    missed = 0
    for event, watermark in expected.counted:
        ts = event.timestamp_ms
        last = ts - ts % 20_000
        missed += sum(1 for start in (last - 40_000, last - 20_000, last)
                      if watermark is not None and start + 60_000 <= watermark)
    return missed


def test_rollups_are_sums_of_the_minute_rows(generated, kafka_broker, chdb_url):
    topic, _raw = generated
    run_flow(flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), chdb_url))
    backend = connect(chdb_url)
    try:
        for table, unit in (("usage_aggregates_hourly", "toStartOfHour"), ("usage_aggregates_daily", "toStartOfDay")):
            _, mismatches = backend.query(f"""
                SELECT count() FROM (
                    SELECT organization_id, external_customer_id, code, {unit}(window_start) AS w,
                           sum(event_count) AS c, sum(total_value) AS t
                    FROM usage_aggregates FINAL GROUP BY organization_id, external_customer_id, code, w
                ) AS minutes
                FULL OUTER JOIN (
                    SELECT organization_id, external_customer_id, code, {unit}(window_start) AS w,
                           event_count AS c, total_value AS t FROM {table} FINAL
                ) AS rollup USING (organization_id, external_customer_id, code, w)
                WHERE minutes.c != rollup.c OR minutes.t != rollup.t""")
            _, [(rollup_rows,)] = backend.query(f"SELECT count() FROM {table} FINAL")
            assert mismatches == [(0,)] and rollup_rows > 0, table
    finally:
        backend.close()


# --- corrections across runs: allowed lateness and session merges ------------

def event(txn: str, ts_ms: int, customer: str = "c1", value: str = "1") -> bytes:
    return json.dumps({"transaction_id": txn, "organization_id": "org", "external_customer_id": customer,
                       "code": "api_calls", "timestamp": ts_ms, "value": value}).encode()


def send(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap})
    for value in values:
        producer.produce(topic, value, partition=0)
    assert producer.flush(10) == 0


def versions(url: str, table: str = "usage_aggregates") -> list[tuple]:
    backend = connect(url)
    try:
        _, rows = backend.query(
            f"SELECT external_customer_id, toUnixTimestamp64Milli(window_start), event_count, "
            f"toString(total_value), version, is_deleted FROM {table} ORDER BY 1, 2, 5")
        _, final = backend.query(
            f"SELECT external_customer_id, toUnixTimestamp64Milli(window_start), event_count, "
            f"toString(total_value) FROM {table} FINAL ORDER BY 1, 2")
        _, late = backend.query("SELECT transaction_id, reason FROM usage_late_events FINAL ORDER BY 1")
    finally:
        backend.close()
    return [tuple(r) for r in rows], [tuple(r) for r in final], [tuple(r) for r in late]


def two_runs(kafka_broker, chdb_url, tmp_path, first: list[bytes], second: list[bytes], **settings):
    topic, dlq = unique_topic("corrections"), unique_topic("dlq")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    env = flow_env(kafka_broker.bootstrap, topic, dlq, chdb_url, ROLLUPS="off", **settings)
    send(kafka_broker.bootstrap, topic, first)
    run_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
    after_first = versions(chdb_url)
    send(kafka_broker.bootstrap, topic, second)
    run_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
    return after_first, versions(chdb_url)


def test_allowed_lateness_corrects_the_row_and_beyond_it_goes_late(kafka_broker, chdb_url, tmp_path):
    late_topic = unique_topic("late")
    ensure_topic(kafka_broker.bootstrap, late_topic, 1)
    first = [event("a", 10_000), event("b", 20_000), event("w", 95_000, customer="c2")]  # watermark 85s
    second = [event("late-ok", 30_000, value="2.5"),           # window [0,60s) + 30s lateness > 85s
              event("w2", 200_000, customer="c2"),             # watermark 190s: [0,60s) now settled
              event("too-late", 40_000)]                       # beyond the lateness
    (rows1, final1, _), (rows2, final2, late2) = two_runs(
        kafka_broker, chdb_url, tmp_path, first, second, ALLOWED_LATENESS="30s", LATE_TOPIC=late_topic)
    # The end of the first run flushes [0,60s) provisionally (its watermark 85s is within the
    # lateness); the second run decides it for real, at watermark 190s, with a higher version.
    assert ("c1", 0, 2, "2", row_version(85_000, provisional=True), 0) in rows1
    assert ("c1", 0, 3, "4.5", row_version(190_000), 0) in rows2
    assert ("c1", 0, 3, "4.5") in final2 and ("c1", 0, 2, "2") not in final2
    assert late2 == [("too-late", "window_closed")]
    [late_message] = read_all(kafka_broker.bootstrap, late_topic)
    assert late_message.value() == event("too-late", 40_000)
    assert dict(late_message.headers())["tallyflow.reason"] == b"window_closed"


def test_idle_timeout_lets_windows_close_while_a_partition_is_silent(kafka_broker, dev_clickhouse):
    import signal
    import time

    from deploy.runner import start_flow

    topic = unique_topic("idle")
    ensure_topic(kafka_broker.bootstrap, topic, 2)  # partition 1 never gets a record
    send(kafka_broker.bootstrap, topic, [event("a", 10_000), event("b", 200_000)])
    url = dev_clickhouse.url  # a server, so the rows can be read while the flow runs
    env = flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), url, ROLLUPS="off",
                   IDLE_TIMEOUT="1s", SINK_FLUSH_INTERVAL="200ms")
    del env["KAFKA_STOP_AT_END"]
    flow = start_flow(env, recovery_dir=None)

    def final_rows() -> list[tuple]:
        return before_first_write(lambda: versions(url)[1], [])

    try:
        deadline = time.monotonic() + 90  # tail mode: only the idle timeout can close [0, 60s)
        while not final_rows() and time.monotonic() < deadline:
            assert flow.poll() is None, "a tail-mode flow runs until it is stopped"
            time.sleep(0.2)
        time.sleep(1)  # room for a wrong extra row (the still-open window of "b") to show up
        flow.send_signal(signal.SIGTERM)
        assert flow.wait(timeout=60) == 0
    finally:
        if flow.poll() is None:
            flow.kill()
    assert final_rows() == [("c1", 0, 1, "1")]


def test_a_bridging_event_merges_sessions_and_removes_the_old_rows(kafka_broker, chdb_url, tmp_path):
    first = [event("a", 0), event("b", 20_000), event("w", 60_000, customer="c2")]  # gap 15s
    second = [event("bridge", 10_000)]  # joins [0,15s) and [20s,35s)
    (rows1, final1, _), (rows2, final2, _) = two_runs(
        kafka_broker, chdb_url, tmp_path, first, second,
        WINDOW_KIND="session", SESSION_GAP="15s", ALLOWED_LATENESS="1m")
    assert [r for r in final1 if r[0] == "c1"] == [("c1", 0, 1, "1"), ("c1", 20_000, 1, "1")]
    assert [r for r in final2 if r[0] == "c1"] == [("c1", 0, 3, "3")]
    assert ("c1", 20_000, 0, "0", row_version(50_000, provisional=True), 1) in rows2  # its tombstone
