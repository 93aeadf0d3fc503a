"""Exactly-once effect in ClickHouse under crashes, stops, outages and rescaling.

Every test ends the same way: ``usage_aggregates FINAL`` equals a
recomputation from the raw topic, to the last digit.
"""

from __future__ import annotations

import io
import random
import signal
import subprocess
import time

import pytest

from dataflows.settings import Settings
from deploy.broker import ensure_topic, free_port
from deploy.cli import main as tallyflow
from deploy.dev_clickhouse import DevClickHouseServer
from deploy.generator import generate, produce
from deploy.runner import init_recovery_store, start_flow
from recovery.reconcile import diff, recompute, run_reconcile
from sinks.clickhouse_backend import connect
from support.crashes import run_with_sigkills, wait_exit
from support.flow import flow_env, read_output
from support.kafka import read_all, unique_topic

START_MS = 1_767_225_600_000
FAST_FLOW = {"TALLYFLOW_SHARDS": "8", "KAFKA_BATCH_SIZE": "500", "SINK_BATCH_ROWS": "500",
             "SINK_FLUSH_INTERVAL": "200ms"}


def new_stream(bootstrap: str, partitions: int = 4):
    topic, dlq = unique_topic("usage"), unique_topic("dlq")
    ensure_topic(bootstrap, topic, partitions)
    ensure_topic(bootstrap, dlq, 1)
    return topic, dlq


def chunks(count: int, pieces: int, partitions: int, seed: int):
    records = list(generate(count, seed=seed, partitions=partitions, start_ms=START_MS,
                            span_ms=1_800_000))
    size = -(-count // pieces)
    return [records[i:i + size] for i in range(0, count, size)]


def expected_for(bootstrap: str, topic: str):
    raw = [(m.partition(), m.offset(), m.value()) for m in read_all(bootstrap, topic, timeout=60)]
    return recompute(raw, window_size_ms=60_000, max_out_of_orderness_ms=10_000)


def assert_exact(bootstrap: str, topic: str, url: str) -> None:
    expected = expected_for(bootstrap, topic)
    output = read_output(url)
    assert diff(expected.aggregates, output.aggregates) == []
    assert output.rows_final == output.rows_distinct_keys
    assert {(org, txn) for org, txn, _p, _o in output.late} == expected.late


def test_sigkill_at_random_moments_then_resume(kafka_broker, chdb_url, tmp_path, request):
    kills_wanted = request.config.getoption("--kills")
    bootstrap = kafka_broker.bootstrap
    topic, dlq = new_stream(bootstrap)
    # One chunk of input per run: every run has work when the kill comes.
    pending = chunks(50_000 * (kills_wanted + 1), kills_wanted + 1, 4, seed=3)
    rng = random.Random(kills_wanted)
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    env = flow_env(bootstrap, topic, dlq, chdb_url, **FAST_FLOW)

    kills = run_with_sigkills(env, recovery, pending, lambda chunk: produce(bootstrap, topic, chunk),
                              kills_wanted, rng, resume_wait_s=(0.2, 1.0))
    assert kills == kills_wanted
    assert_exact(bootstrap, topic, chdb_url)

    # The operator's proof: reconcile agrees, and notices a tampered row.
    settings = Settings.from_env(env)
    assert run_reconcile(settings, out=io.StringIO()) == 0
    backend = connect(chdb_url)
    try:
        backend.command(
            "INSERT INTO usage_aggregates (organization_id, external_customer_id, code, window_start, "
            "window_end, event_count, total_value, version, is_deleted) "
            "SELECT organization_id, external_customer_id, code, "
            "window_start, window_end, event_count, total_value + toDecimal128('0.000000000000000001', 18), "
            "version + 1, 0 FROM usage_aggregates FINAL ORDER BY window_start LIMIT 1"
        )
    finally:
        backend.close()
    report = io.StringIO()
    assert run_reconcile(settings, out=report) == 1
    assert "1 differ" in report.getvalue()


def test_graceful_stop_flushes_and_resumes(kafka_broker, chdb_url, tmp_path):
    bootstrap = kafka_broker.bootstrap
    topic, dlq = new_stream(bootstrap)
    first, second = chunks(60_000, 2, 4, seed=5)
    produce(bootstrap, topic, first)
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    tail_env = flow_env(bootstrap, topic, dlq, chdb_url, **FAST_FLOW)
    del tail_env["KAFKA_STOP_AT_END"]

    flow = start_flow(tail_env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
    time.sleep(4)
    assert flow.poll() is None, "a tail-mode flow must keep running until told to stop"
    flow.send_signal(signal.SIGTERM)
    assert wait_exit(flow, 60) == 0

    produce(bootstrap, topic, second)
    stop_env = flow_env(bootstrap, topic, dlq, chdb_url, **FAST_FLOW)
    assert wait_exit(start_flow(stop_env, recovery_dir=recovery, snapshot_s=1, backup_s=10)) == 0
    assert_exact(bootstrap, topic, chdb_url)


def test_clickhouse_outage_blocks_then_catches_up(kafka_broker, tmp_path, request):
    outage_s = request.config.getoption("--outage-seconds")
    bootstrap = kafka_broker.bootstrap
    topic, dlq = new_stream(bootstrap)
    produce(bootstrap, topic, [r for part in chunks(150_000, 1, 4, seed=9) for r in part])
    data_dir, port = str(tmp_path / "clickhouse"), free_port()
    server = DevClickHouseServer(data_dir, port=port).start()
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    env = flow_env(bootstrap, topic, dlq, server.url, **{**FAST_FLOW, "KAFKA_BATCH_SIZE": "200"})
    flow = start_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
    try:
        assert wait_for_rows(server.url, [flow]), "the outage must start mid-stream"
        server.stop()
        time.sleep(outage_s)
        assert flow.poll() is None, "with ClickHouse down the flow must wait, not finish or fail"
        server = DevClickHouseServer(data_dir, port=port, password=server.password).start()  # the flow's URL
        assert wait_exit(flow) == 0
        assert_exact(bootstrap, topic, server.url)
    finally:
        if flow.poll() is None:
            flow.kill()
        server.stop()


def wait_for_rows(url: str, processes: list[subprocess.Popen], timeout: float = 60) -> bool:
    """Wait until the first aggregate rows land; True if every process is still running then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and all(p.poll() is None for p in processes):
        backend = connect(url)
        try:
            _, [(tables,)] = backend.query(
                "SELECT count() FROM system.tables WHERE name = 'usage_aggregates'")
            if tables and backend.query("SELECT count() FROM usage_aggregates")[1][0][0] > 0:
                return all(p.poll() is None for p in processes)
        finally:
            backend.close()
        time.sleep(0.05)
    return False


def test_two_process_cluster_killed_then_resumed_rescaled(kafka_broker, dev_clickhouse, tmp_path):
    bootstrap = kafka_broker.bootstrap
    topic, dlq = new_stream(bootstrap, partitions=8)
    produce(bootstrap, topic, [r for part in chunks(120_000, 1, 8, seed=13) for r in part])
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery, partitions=2)
    env = flow_env(bootstrap, topic, dlq, dev_clickhouse.url, **FAST_FLOW)
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    cluster = [start_flow(env, workers=1, process_id=i, addresses=addresses, recovery_dir=recovery,
                          snapshot_s=1, backup_s=10) for i in range(2)]
    assert wait_for_rows(dev_clickhouse.url, cluster), "the cluster must be mid-stream when killed"
    for process in cluster:
        process.send_signal(signal.SIGKILL)
    for process in cluster:
        process.wait()

    resumed = start_flow(env, workers=2, recovery_dir=recovery, snapshot_s=1, backup_s=10)
    assert wait_exit(resumed) == 0
    assert_exact(bootstrap, topic, dev_clickhouse.url)
    assert tallyflow(["reconcile", "--bootstrap", bootstrap, "--topic", topic,
                      "--url", dev_clickhouse.url]) == 0
