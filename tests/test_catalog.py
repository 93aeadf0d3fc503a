"""The billable-metric catalog: each aggregation by hand, bad files, and one end-to-end run."""

from __future__ import annotations

from decimal import Decimal

import pytest

from deploy.broker import ensure_topic
from deploy.generator import generate, produce
from deploy.runner import run_flow
from operators.catalog import CatalogError, load_catalog_text
from oracle.aggregations import fold as reference_fold
from recovery.reconcile import recompute
from sinks.clickhouse_backend import connect
from state.aggregations import AGGREGATIONS
from state.sessions import SessionStore
from support.flow import flow_env
from support.kafka import read_all, unique_topic

S = 10**18


def fold(name: str, events: list[tuple[int, object]], window_end: int = 3_600_000):
    agg = AGGREGATIONS[name]()
    state = agg.create()
    for ts, value in events:
        state = agg.add(state, value, ts)
    return agg.result(state, window_end)


@pytest.mark.parametrize("name, events, expected", [
    ("count", [(1, None), (2, None), (3, None)], 3 * S),
    ("sum", [(1, 15 * S // 10), (2, -S // 2)], S),
    ("min", [(1, 3 * S), (2, -2 * S), (3, 5 * S)], -2 * S),
    ("max", [(1, 3 * S), (2, -2 * S), (3, 5 * S)], 5 * S),
    ("unique_count", [(1, "eu"), (2, "us"), (3, "eu")], 2 * S),
    ("latest", [(5, 1 * S), (9, 7 * S), (7, 3 * S)], 7 * S),           # by timestamp, not arrival
    ("latest", [(9, 2 * S), (9, 4 * S)], 4 * S),                        # ties: the larger value
    # 10 GB for 30 min, 20 GB for 15 min, 5 GB for the last 15 min = 5 + 5 + 1.25 GB-hours
    ("weighted_sum", [(0, 10 * S), (1_800_000, 20 * S), (2_700_000, 5 * S)], 1125 * S // 100),
    ("weighted_sum", [(2_700_000, 5 * S), (0, 10 * S), (1_800_000, 20 * S)], 1125 * S // 100),
])
def test_aggregations_on_hand_worked_examples(name, events, expected):
    assert fold(name, events) == expected
    assert reference_fold(name, events, 3_600_000) == expected  # the oracle the next tests use


def test_weighted_sum_rounds_half_even_below_the_18th_place():
    # 1e-18 GB held for 30 min = 0.5e-18 GB-hours: half, rounds to even (0)
    assert fold("weighted_sum", [(0, 1)], window_end=1_800_000) == 0
    assert fold("weighted_sum", [(0, 3)], window_end=1_800_000) == 2  # 1.5 → 2


@pytest.mark.parametrize("name", sorted(AGGREGATIONS))
def test_merging_sessions_equals_folding_everything(name):
    times = [0, 1_000, 20_000, 40_000, 52_000, 10_000, 30_000]  # the last two bridge the gaps
    values = ["a", "b", "a", "c", "d", "b", "e"] if name == "unique_count" else [
        4 * S, -S, 9 * S, 2 * S, 7 * S, -3 * S, 5 * S]
    events = list(zip(times, values))
    store = SessionStore(gap_ms=15_000, aggregation=AGGREGATIONS[name]())
    for ts, value in events:
        assert store.add(("k",), ts, value, watermark_before=-1)
    rows = [r for r in store.emit(closing_ms=10**9, watermark_ms=0) if not r.is_deleted]
    assert [(r.start_ms, r.end_ms, r.count) for r in rows] == [(0, 67_000, 7)]
    assert rows[0].result == reference_fold(name, events, window_end_ms=67_000)


@pytest.mark.parametrize("text, message", [
    ('[[metric]]\nname = "a"\ncode = "x"\naggregation = "avg"\n', "line 1 (metric 'a'): unknown aggregation 'avg'"),
    ('\n\n[[metric]]\nname = "a"\naggregation = "sum"\n', "line 3 (metric 'a'): needs the event code"),
    ('[[metric]]\nname = "a"\ncode = "x"\naggregation = "sum"\nfield = "amount"\n', "field must be"),
    ('[[metric]]\nname = "a"\ncode = "x"\naggregation = "sum"\nwindow = { kind = "sliding", size = "1m" }\n',
     "window: sliding windows need a slide"),
    ('[[metric]]\nname = "a"\ncode = "x"\naggregation = "sum"\nwindow = { kind = "tumbling", size = "5 minutes" }\n',
     "window: not a duration"),
    ('[[metric]]\nname = "a"\ncode = "x"\naggregation = "sum"\n[[metric]]\nname = "a"\ncode = "y"\naggregation = "max"\n',
     "line 5: metric name 'a' is used twice"),
    ('[[metric]]\nname = "a"\ncode = "x"\naggregation = "sum"\ncolour = "red"\n', "unknown key(s) ['colour']"),
    ('[[metric]\nname = "a"\n', "METRICS_FILE: "),
])
def test_bad_catalogs_fail_naming_the_line_and_the_problem(text, message):
    with pytest.raises(CatalogError) as raised:
        load_catalog_text(text)
    assert message in str(raised.value)


def test_extraction_reads_property_paths_and_groups():
    catalog = load_catalog_text(
        '[[metric]]\nname = "gb"\ncode = "storage"\naggregation = "max"\n'
        'field = "properties.usage.gb"\ngroup_by = ["region", "tier.name"]\n')
    metric = catalog.metrics[0]
    assert metric.extract(0, {"usage": {"gb": "1.5"}, "region": "eu", "tier": {"name": "pro"}}) == (
        ("eu", "pro"), 15 * S // 10)
    assert metric.extract(0, {"region": "eu"}) is None          # no field: counted apart, not folded
    assert metric.extract(0, {"usage": {"gb": "lots"}}) is None


CATALOG = """
[[metric]]
name = "calls"
code = "api_calls"
aggregation = "count"
group_by = ["region"]

[[metric]]
name = "egress_total"
code = "egress_bytes"
aggregation = "sum"
window = { kind = "tumbling", size = "5m" }

[[metric]]
name = "compute_min"
code = "compute_seconds"
aggregation = "min"

[[metric]]
name = "compute_max"
code = "compute_seconds"
aggregation = "max"
group_by = ["plan"]

[[metric]]
name = "active_regions"
code = "api_calls"
aggregation = "unique_count"
field = "properties.region"

[[metric]]
name = "storage_latest"
code = "storage_gb"
aggregation = "latest"

[[metric]]
name = "storage_gb_hours"
code = "storage_gb"
aggregation = "weighted_sum"
window = { kind = "tumbling", size = "10m" }
"""


def test_catalog_end_to_end(kafka_broker, chdb_url, tmp_path):
    catalog_file = tmp_path / "metrics.toml"
    catalog_file.write_text(CATALOG)
    topic = unique_topic("catalog")
    ensure_topic(kafka_broker.bootstrap, topic, 4)
    produce(kafka_broker.bootstrap, topic,
            generate(12_000, seed=31, partitions=4, start_ms=1_767_225_600_000, span_ms=1_800_000))
    run_flow(flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), chdb_url,
                      METRICS_FILE=str(catalog_file), TALLYFLOW_SHARDS="4"))

    raw = [(m.partition(), m.offset(), m.value()) for m in read_all(kafka_broker.bootstrap, topic)]
    # The expectation: reconcile's own recomputation (its decoding, windows and folds; nothing
    # of the flow's catalog or aggregations).
    recomputed = recompute(raw, window_size_ms=60_000, max_out_of_orderness_ms=10_000, catalog_text=CATALOG)
    assert recomputed.metrics_skipped == ()
    expected = recomputed.metrics
    backend = connect(chdb_url)
    try:
        _, rows = backend.query(
            "SELECT metric, organization_id, external_customer_id, group_key, "
            "toUnixTimestamp64Milli(window_start), event_count, value FROM metric_aggregates FINAL")
    finally:
        backend.close()
    actual = {tuple(r[:4]) + (int(r[4]),): (int(r[5]), Decimal(r[6])) for r in rows}
    assert {k[0] for k in actual} == {"calls", "egress_total", "compute_min", "compute_max",
                                      "active_regions", "storage_latest", "storage_gb_hours"}
    assert sorted(actual) == sorted(expected)
    mismatched = {k: (expected[k], actual[k]) for k in expected if expected[k] != actual[k]}
    assert mismatched == {}
