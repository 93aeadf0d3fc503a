"""``tallyflow reconcile``: its own rules on hand-made records, then against real flow runs.

The first half feeds ``recompute`` raw bytes and checks outcomes worked out by hand. The
second half runs the flow for each window kind, expects no difference in any table, then
tampers one row per table and expects exactly that difference to be reported.
"""

from __future__ import annotations

import io
import json
from decimal import Decimal

import pytest

from dataflows.settings import Settings
from deploy.broker import ensure_topic
from deploy.generator import generate, produce
from deploy.runner import run_flow
from recovery.reconcile import Rules, decode, recompute, run_reconcile
from sinks.clickhouse_backend import connect
from support.flow import flow_env
from support.kafka import read_all, unique_topic

MINUTE, HOUR, DAY = 60_000, 3_600_000, 86_400_000
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def raw(txn: str, ts, value=None, org="org", customer="c", code="api", **extra) -> bytes:
    event = {"transaction_id": txn, "organization_id": org, "external_customer_id": customer,
             "code": code, "timestamp": ts, **extra}
    if value is not None:
        event["value"] = value
    return json.dumps(event).encode()


def records(*by_partition: list[bytes]) -> list[tuple[int, int, bytes]]:
    return [(p, o, value) for p, values in enumerate(by_partition) for o, value in enumerate(values)]


# --- its own decoding ----------------------------------------------------------

def _nested(levels: int):
    return [] if levels == 1 else [_nested(levels - 1)]


def test_sixty_four_levels_of_nesting_are_accepted():
    assert decode(raw("t", 1, properties={"deep": _nested(62)})) is not None  # 1 + 1 + 62 levels

@pytest.mark.parametrize("timestamp, expected_ms", [
    (1_500, 1_500),
    ("2026-01-01T00:00:00Z", START_MS),
    ("2026-01-01t01:00:00.25+01:00", START_MS + 250),
    ("2026-01-01 00:00:00.123999z", START_MS + 123),        # sub-millisecond digits truncated
    ("2025-12-31T23:59:59.9999995Z", START_MS - 1),          # never rounded into the next day
    ("1969-12-31T23:59:59.9999995Z", None),                  # before 1970 even by a fraction
    ("2026-01-01T00:00:00", None),                           # no offset
    ("2026-02-30T00:00:00Z", None),
    ("2260-12-31T23:59:59.999Z", 9_183_110_399_999), ("2261-01-01T00:00:00Z", None),
    (1.5, None), (True, None), ("1500", None), (-1, None), (9_183_110_400_000, None),
])
def test_timestamps_follow_the_input_contract(timestamp, expected_ms):
    event = decode(raw("t", timestamp))
    assert (event.timestamp_ms if event else None) == expected_ms


@pytest.mark.parametrize("value, expected", [
    (None, Decimal(0)), ("1.5", Decimal("1.5")), (2, Decimal(2)), ("1e2", Decimal(100)),
    ("0.000000000000000001", Decimal("1e-18")), ("99999999999999999999", Decimal("99999999999999999999")),
    ("0.0000000000000000001", None), ("100000000000000000000", None), ("NaN", None), (" 1", None),
    ("1_000", None), ("١٢", None), (True, None), ([1], None), ("", None),
])
def test_values_are_exact_and_strict(value, expected):
    event = decode(raw("t", 1_000, **({"value": value} if value is not None else {})))
    assert (event.value if event else None) == expected


@pytest.mark.parametrize("value", [
    b"", b"null", b"[]", b"{", b'{"a":NaN}', b"\xff",
    raw("", 1), raw("t" * 257, 1), raw("t", 1, properties=[1]), raw("t", 1).replace(b'"code": "api", ', b""),
    raw("t", 1, properties={"deep": _nested(63)}),   # 65 levels with the message and properties
])
def test_anything_else_is_invalid(value):
    assert recompute([(0, 0, value)], window_size_ms=MINUTE, max_out_of_orderness_ms=0).invalid == {(0, 0)}


def test_an_event_dated_past_the_future_skew_of_its_record_is_invalid_and_moves_no_watermark():
    stream = [(0, 0, raw("ok", HOUR), HOUR), (0, 1, raw("future", 3 * HOUR), HOUR),
              (0, 2, raw("still-on-time", HOUR + 1_000), HOUR)]
    result = recompute(stream, Rules.of(max_out_of_orderness_ms=0, max_future_skew_ms=HOUR))
    assert result.invalid == {(0, 1)}
    assert result.aggregates == {("org", "c", "api", HOUR): (2, Decimal(0))}


# --- dedup with the horizon, late copies -----------------------------------------

def test_an_id_counts_again_beyond_the_horizon_and_once_within_it():
    rules = Rules.of(window_size_ms=MINUTE, max_out_of_orderness_ms=DAY * 10, dedup_horizon_ms=DAY)
    stream = records([raw("a", 0), raw("a", DAY - 1), raw("a", DAY), raw("a", 2 * DAY - 1)])
    result = recompute(stream, rules)
    assert sorted(result.aggregates) == [("org", "c", "api", 0), ("org", "c", "api", DAY)]
    assert result.duplicates == 2


def test_conflicting_copies_count_the_earliest_by_time_partition_offset():
    stream = records([raw("x", 70_000, "5")], [raw("x", 10_000, "1"), raw("x", 10_000, "2")])
    result = recompute(stream, window_size_ms=MINUTE, max_out_of_orderness_ms=MINUTE)
    assert result.aggregates == {("org", "c", "api", 0): (1, Decimal(1))}
    assert result.duplicates == 2


def test_a_transaction_whose_copies_are_all_late_is_reported_once_as_its_earliest_copy():
    late_on_both = [raw("w", 10 * MINUTE), raw("z", 2 * MINUTE + 5_000, "2"), raw("z", 2 * MINUTE, "3")]
    stream = records(late_on_both, [raw("w2", 10 * MINUTE), raw("z", 2 * MINUTE + 1_000, "4")])
    result = recompute(stream, window_size_ms=MINUTE, max_out_of_orderness_ms=0)
    assert list(result.late_rows) == [(0, 2, "window_closed")]
    row = result.late_rows[(0, 2, "window_closed")]
    assert (row.transaction_id, row.event_time_ms, row.value, row.watermark_ms) == (
        "z", 2 * MINUTE, Decimal(3), 10 * MINUTE)
    assert result.duplicates == 2


def test_copies_more_than_the_horizon_behind_are_reported_as_they_come():
    # Horizon 10 min: at watermark 30 min, the copies at 1 min are beyond it (2 + 10 <= 30 min);
    # the counted copy at 5 min (within the horizon) cannot take them as duplicates, nor can
    # each other. A late copy at 21 min is not beyond (22 + 10 > 30): a duplicate of none, reported.
    rules = Rules.of(window_size_ms=MINUTE, max_out_of_orderness_ms=0, dedup_horizon_ms=10 * MINUTE)
    stream = records([raw("w", 30 * MINUTE), raw("a", MINUTE), raw("a", MINUTE), raw("b", 21 * MINUTE),
                      raw("b", 21 * MINUTE)], [raw("a", 5 * MINUTE)])
    result = recompute(stream, rules)
    assert sorted(result.late_rows) == [(0, 1, "window_closed"), (0, 2, "window_closed"),
                                        (0, 3, "window_closed")]
    assert result.aggregates[("org", "c", "api", 5 * MINUTE)] == (1, Decimal(0))
    assert result.duplicates == 1


def test_a_late_copy_of_a_counted_transaction_is_a_duplicate():
    stream = records([raw("a", 1_000), raw("b", 5 * MINUTE)], [raw("b", 5 * MINUTE), raw("a", 1_000)])
    result = recompute(stream, window_size_ms=MINUTE, max_out_of_orderness_ms=0)
    assert result.late_rows == {} and result.duplicates == 2


# --- windows, lateness, rollups -------------------------------------------------

def test_a_sliding_event_late_for_its_earliest_windows_counts_in_the_later_ones():
    # Watermark 75 s when the event at 50 s arrives: windows [0,60) closed, [20,80) and [40,100) open.
    stream = records([raw("w", 75_000), raw("e", 50_000)])
    result = recompute(stream, window_kind="sliding", window_size_ms=MINUTE, window_slide_ms=20_000,
                       max_out_of_orderness_ms=0)
    assert {key[3]: count for key, (count, _total) in result.aggregates.items()} == {
        20_000: 2, 40_000: 2, 60_000: 1}


def test_allowed_lateness_keeps_a_window_open_past_its_end():
    stream = records([raw("w", 85_000), raw("ok", 30_000), raw("w2", 200_000), raw("late", 40_000)])
    result = recompute(stream, window_size_ms=MINUTE, max_out_of_orderness_ms=0, allowed_lateness_ms=30_000)
    assert result.aggregates[("org", "c", "api", 0)] == (1, Decimal(0))
    assert [key[2] for key in result.late_rows] == ["window_closed"]


def test_sessions_group_events_less_than_the_gap_apart():
    stream = records([raw("a", 0, "1"), raw("b", 20_000, "1"), raw("bridge", 10_000, "1"), raw("c", 60_000, "1")])
    result = recompute(stream, window_kind="session", session_gap_ms=15_000, max_out_of_orderness_ms=MINUTE)
    assert result.aggregates == {("org", "c", "api", 0): (3, Decimal(3)), ("org", "c", "api", 60_000): (1, Decimal(1))}


def test_rollups_count_each_event_once_in_its_own_hour_and_day():
    after_midnight = START_MS + DAY + MINUTE
    stream = records([raw("a", after_midnight, "4"), raw("b", after_midnight - 2 * MINUTE, "1")])
    result = recompute(stream, window_size_ms=7 * MINUTE, max_out_of_orderness_ms=MINUTE)
    assert result.rollups["day"] == {("org", "c", "api", START_MS + DAY): (1, Decimal(4)),
                                     ("org", "c", "api", START_MS): (1, Decimal(1))}
    assert result.rollups["hour"][("org", "c", "api", START_MS + DAY)] == (1, Decimal(4))


# --- catalog metrics --------------------------------------------------------------

CATALOG = """
[[metric]]
name = "calls"
code = "api"
aggregation = "count"
group_by = ["region"]

[[metric]]
name = "peak"
code = "api"
aggregation = "max"
field = "properties.ms"
window = { kind = "tumbling", size = "1h" }

[[metric]]
name = "last"
code = "api"
aggregation = "latest"
window = { kind = "sliding", size = "2m", slide = "1m" }

[[metric]]
name = "regions"
code = "api"
aggregation = "unique_count"
field = "properties.region"
window = { kind = "session", gap = "1m" }

[[metric]]
name = "gb_hours"
code = "api"
aggregation = "weighted_sum"
window = { kind = "tumbling", size = "1h" }

[[metric]]
name = "fancy"
code = "api"
aggregation = "sum"
recurring = true
"""


def test_catalog_metrics_recomputed_by_hand():
    stream = records([raw("a", 0, "2", properties={"region": "eu", "ms": 5}),
                      raw("b", 30 * MINUTE, "4", properties={"region": "us", "ms": "7.5"}),
                      raw("c", 40_000, "1", properties={"region": "eu"})])
    result = recompute(stream, window_size_ms=MINUTE, max_out_of_orderness_ms=HOUR, catalog_text=CATALOG)
    metrics = {(k[0], k[3], k[4]): v for k, v in result.metrics.items()}
    assert metrics[("calls", '{"region":"eu"}', 0)] == (2, Decimal(2))
    assert metrics[("calls", '{"region":"us"}', 30 * MINUTE)] == (1, Decimal(1))
    assert metrics[("peak", "{}", 0)] == (2, Decimal("7.5"))  # "c" has no ms: not folded
    assert metrics[("last", "{}", -MINUTE)] == (2, Decimal(1))   # the latest of 0 s and 40 s
    assert metrics[("regions", "{}", 0)] == (2, Decimal(1))      # eu twice, 40 s apart: one session
    assert metrics[("regions", "{}", 30 * MINUTE)] == (1, Decimal(1))
    # 2 for 40 s, 1 for 30 min − 40 s, 4 for the last 30 min: level × hours
    hours = (Decimal(2) * 40_000 + Decimal(1) * (30 * MINUTE - 40_000) + 4 * 30 * MINUTE) / HOUR
    assert metrics[("gb_hours", "{}", 0)] == (3, hours.quantize(Decimal("1e-18")))
    assert result.metrics_skipped == ("fancy",)


# --- against the flow: no difference on a correct table, and a tampered row in each -

FLOW_CATALOG = """
[[metric]]
name = "calls"
code = "api_calls"
aggregation = "count"
group_by = ["region"]

[[metric]]
name = "egress"
code = "egress_bytes"
aggregation = "sum"
window = { kind = "sliding", size = "2m", slide = "1m" }

[[metric]]
name = "compute_peak"
code = "compute_seconds"
aggregation = "max"
group_by = ["plan"]
window = { kind = "session", gap = "30s" }

[[metric]]
name = "compute_low"
code = "compute_seconds"
aggregation = "min"

[[metric]]
name = "storage_latest"
code = "storage_gb"
aggregation = "latest"
window = { kind = "tumbling", size = "5m" }

[[metric]]
name = "regions"
code = "api_calls"
aggregation = "unique_count"
field = "properties.region"
window = { kind = "tumbling", size = "1h" }

[[metric]]
name = "storage_hours"
code = "storage_gb"
aggregation = "weighted_sum"
window = { kind = "tumbling", size = "10m" }

[[metric]]
name = "carried"
code = "api_calls"
aggregation = "sum"
recurring = true
"""

_BUMP_USAGE = (
    "INSERT INTO {table} (organization_id, external_customer_id, code, window_start, window_end, "
    "event_count, total_value, version, is_deleted) SELECT organization_id, external_customer_id, code, "
    "window_start, window_end, event_count, total_value + toDecimal128('0.000000000000000001', 18), "
    "version + 1, 0 FROM {table} FINAL ORDER BY window_start, organization_id, external_customer_id LIMIT 1")
TAMPER = {
    "usage_aggregates": _BUMP_USAGE.format(table="usage_aggregates"),
    "usage_aggregates_hourly": _BUMP_USAGE.format(table="usage_aggregates_hourly"),
    "usage_aggregates_daily": _BUMP_USAGE.format(table="usage_aggregates_daily"),
    "metric_aggregates": (
        "INSERT INTO metric_aggregates SELECT metric, organization_id, external_customer_id, group_key, "
        "window_start, window_end, value, event_count + 1, version + 1, 0 FROM metric_aggregates FINAL "
        "ORDER BY metric, window_start, organization_id, external_customer_id, group_key LIMIT 1"),
    "usage_late_events": (  # a late row for a record that was not late
        "INSERT INTO usage_late_events SELECT organization_id, external_customer_id, code, transaction_id, "
        "event_time, value, reason, watermark, source_topic, source_partition, source_offset + 1000000, raw "
        "FROM usage_late_events FINAL ORDER BY source_partition, source_offset LIMIT 1"),
}


@pytest.fixture(scope="module")
def traffic(kafka_broker):
    topic = unique_topic("reconcile")
    ensure_topic(kafka_broker.bootstrap, topic, 4)
    produce(kafka_broker.bootstrap, topic,
            generate(20_000, seed=41, partitions=4, start_ms=START_MS, span_ms=900_000))
    return topic


def reconcile_report(settings: Settings) -> tuple[int, str]:
    out = io.StringIO()
    return run_reconcile(settings, out=out), out.getvalue()


@pytest.mark.parametrize("kind, settings, tampered", [
    # Re-sent copies here come up to ~12 s after their originals: some are late for their
    # earliest sliding windows only, so which copy counts decides those windows.
    ("sliding", {"WINDOW_KIND": "sliding", "WINDOW_SIZE": "1m", "WINDOW_SLIDE": "20s"},
     ["usage_aggregates", "usage_aggregates_hourly"]),
    ("session", {"WINDOW_KIND": "session", "SESSION_GAP": "10s"},
     ["usage_aggregates", "metric_aggregates"]),
    ("lateness", {"ALLOWED_LATENESS": "30s", "WINDOW_SIZE": "7m"},
     ["usage_aggregates", "usage_aggregates_daily", "usage_late_events"]),
])
def test_reconcile_agrees_with_the_flow_then_flags_each_tampered_row(
        kind, settings, tampered, traffic, kafka_broker, chdb_url, tmp_path):
    catalog = tmp_path / "metrics.toml"
    catalog.write_text(FLOW_CATALOG)
    env = flow_env(kafka_broker.bootstrap, traffic, unique_topic("dlq"), chdb_url, TALLYFLOW_SHARDS="4",
                   METRICS_FILE=str(catalog), **settings)
    run_flow(env)
    flow_settings = Settings.from_env(env)

    status, report = reconcile_report(flow_settings)
    assert status == 0, report
    expected = recompute([(m.partition(), m.offset(), m.value()) for m in read_all(kafka_broker.bootstrap, traffic)],
                         Rules.from_settings(flow_settings))
    assert expected.late_rows and expected.metrics and expected.duplicates  # every table has rows to check
    assert all(expected.rollups.values()) and expected.metrics_skipped == ("carried",)
    assert "not recomputed (options reconcile does not know): carried" in report

    for table in tampered:
        backend = connect(chdb_url)
        try:
            backend.command(TAMPER[table])
        finally:
            backend.close()
        status, report = reconcile_report(flow_settings)
        assert status == 1
        assert f"  {table}: 1 differ" in report, report


@pytest.mark.parametrize("kind, settings", [
    ("sliding", {"WINDOW_KIND": "sliding", "WINDOW_SIZE": "1m", "WINDOW_SLIDE": "20s"}),
    ("session+lateness", {"WINDOW_KIND": "session", "SESSION_GAP": "10s", "ALLOWED_LATENESS": "30s"}),
])
def test_reconcile_agrees_with_the_flow_on_conflicting_copies_and_reused_ids(
        kind, settings, kafka_broker, chdb_url, tmp_path):
    """Re-stamped and revalued copies on other partitions, ids reused past a 5-minute horizon:
    the flow and reconcile apply the same rule, so nothing differs."""
    topic = unique_topic("conflicts")
    ensure_topic(kafka_broker.bootstrap, topic, 4)
    produce(kafka_broker.bootstrap, topic,
            generate(20_000, seed=43, partitions=4, start_ms=START_MS, span_ms=900_000,
                     conflicting_share=0.03, reused_share=0.01))
    env = flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), chdb_url, TALLYFLOW_SHARDS="4",
                   DEDUP_HORIZON="5m", **settings)
    run_flow(env)
    flow_settings = Settings.from_env(env)

    status, report = reconcile_report(flow_settings)
    assert status == 0, report
    expected = recompute([(m.partition(), m.offset(), m.value()) for m in read_all(kafka_broker.bootstrap, topic)],
                         Rules.from_settings(flow_settings))
    counted_ids = [(event.organization_id, event.transaction_id) for event, _wm in expected.counted]
    assert len(counted_ids) > len(set(counted_ids))  # some ids counted again beyond the horizon
    assert expected.duplicates > 0 and expected.late_rows
