"""The ClickHouse sink has a writer per shard, and a recovery store written with the old 4 writers
resumes with the new count: every row of both runs lands, exactly once per key.

Bytewax stores a snapshot per sink partition and, on resume, routes each to the worker owning
that partition; one missing from ``list_parts`` would stop the flow. The first run here uses the
historic 4 partitions, the second the per-shard count on the same store (real Bytewax recovery,
the dev ClickHouse server over HTTP).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main

from sinks.clickhouse_backend import connect
from sinks.clickhouse_sink import LEGACY_PARTITIONS, ClickHouseSink, sink_partitions
from state.records import WindowRow

pytestmark = pytest.mark.integration

SHARDS = 16
MINUTE_MS = 60_000


def keyed_rows(first_minute: int, minutes: int) -> list[tuple[str, WindowRow]]:
    """One row per shard and minute, keyed by its shard as the shard step keys them."""
    return [(str(shard), WindowRow(f"org{shard}", "c", "x", m * MINUTE_MS, (m + 1) * MINUTE_MS,
                                   1, shard * 10**18, 1))
            for m in range(first_minute, first_minute + minutes) for shard in range(SHARDS)]


def sink_flow(url: str, partitions: int, items: list) -> Dataflow:
    flow = Dataflow("sink_partitions")
    stream = op.input("rows", flow, TestingSource(items))
    op.output("clickhouse_out", stream, ClickHouseSink(url, partitions=partitions, max_age_s=0.0))
    return flow


def rows_in(url: str) -> list[tuple]:
    backend = connect(url)
    try:
        return backend.query("SELECT organization_id, toUnixTimestamp64Milli(window_start), "
                             "toString(total_value) FROM usage_aggregates FINAL ORDER BY 1, 2")[1]
    finally:
        backend.close()


def test_partitions_follow_the_shards_and_never_drop_below_the_old_four():
    assert sink_partitions(SHARDS) == SHARDS
    assert sink_partitions(1) == LEGACY_PARTITIONS
    sink = ClickHouseSink("discard://", partitions=sink_partitions(SHARDS))
    everywhere = sorted(sink.list_parts())
    assert sorted(everywhere[sink.part_fn(str(shard))] for shard in range(SHARDS)) == everywhere, \
        "each shard has a writer of its own"


def test_a_store_written_with_four_partitions_resumes_with_one_per_shard(dev_clickhouse, tmp_path: Path):
    store = tmp_path / "recovery"
    store.mkdir()
    init_db_dir(store, 1)
    recovery = RecoveryConfig(str(store))
    first, later = keyed_rows(0, 2), keyed_rows(2, 2)
    run_main(sink_flow(dev_clickhouse.url, LEGACY_PARTITIONS, first), recovery_config=recovery)
    assert len(rows_in(dev_clickhouse.url)) == len(first)
    # Same store, same step ids, the new partition count: the source resumes after `first`.
    run_main(sink_flow(dev_clickhouse.url, sink_partitions(SHARDS), first + later),
             recovery_config=recovery)
    expected = sorted((row.organization_id, row.window_start_ms, f"{row.total_scaled // 10**18}")
                      for _, row in first + later)
    assert [(org, int(start), total) for org, start, total in rows_in(dev_clickhouse.url)] == expected


class RecordingBackend:
    """A backend that keeps each insert's table and rows (decoded from the Arrow stream)."""

    def __init__(self) -> None:
        self.inserts: list[tuple[str, list[dict]]] = []

    def insert_arrow(self, table, columns, payload, settings=None) -> None:
        import pyarrow as pa

        self.inserts.append((table, pa.ipc.open_stream(payload).read_all().to_pylist()))

    def command(self, sql):
        return None

    def query(self, sql):
        return [], []

    def text_rows(self, sql):
        return []

    def close(self) -> None:
        return None


def test_the_partitions_of_one_worker_write_together_and_every_epoch_leaves_nothing_behind(
        monkeypatch, tmp_path: Path):
    """16 partitions on one worker, one minute of rows (one per shard) an epoch, batches never
    full and never old: only the epochs' snapshots flush. Each epoch's rows are then one insert
    holding every shard (not 16 inserts), all written before any row of the next epoch."""
    from datetime import timedelta

    import sinks.clickhouse_sink as clickhouse_sink

    backend = RecordingBackend()
    monkeypatch.setattr(clickhouse_sink, "_process_backend", lambda url: backend)
    monkeypatch.setattr(clickhouse_sink, "_ensure_schema_once", lambda *args: None)
    minutes = 4
    items = keyed_rows(0, minutes)
    flow = Dataflow("shared_buffer")
    stream = op.input("rows", flow, TestingSource(items, batch_size=SHARDS))
    op.output("clickhouse_out", stream,
              ClickHouseSink("recording://", partitions=SHARDS, max_rows=10**9, max_age_s=3600.0))
    store = tmp_path / "recovery"
    store.mkdir()
    init_db_dir(store, 1)
    run_main(flow, epoch_interval=timedelta(0), recovery_config=RecoveryConfig(str(store)))

    assert {table for table, _ in backend.inserts} == {"usage_aggregates"}
    minute_of = [sorted({row["window_start"].timestamp() * 1000 // MINUTE_MS for row in rows})
                 for _, rows in backend.inserts]
    assert all(len(m) == 1 for m in minute_of), f"an insert mixed epochs: {minute_of}"
    order = [m[0] for m in minute_of]
    assert order == sorted(order), "a row was written after a later epoch's"
    # The very first write goes out at once (nothing written yet); every other insert is a
    # whole epoch: all 16 shards' rows in one.
    whole = [rows for _, rows in backend.inserts if len(rows) == SHARDS]
    assert len(backend.inserts) <= minutes + 1 and len(whole) >= minutes - 1, \
        f"{[len(rows) for _, rows in backend.inserts]} rows per insert: partitions wrote alone"
    written = sorted((r["organization_id"], r["window_start"].timestamp(), r["total_value"])
                     for _, rows in backend.inserts for r in rows)
    assert written == sorted((row.organization_id, row.window_start_ms / 1000, row.total_scaled // 10**18)
                             for _, row in items)
