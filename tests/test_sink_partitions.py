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
