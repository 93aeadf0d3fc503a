"""Rollups, counted days and resumed rollup/metric state, driven without Kafka.

Expected values are written out by hand from the event times (hour and day starts
of each event), not computed with the flow's code.
"""

from __future__ import annotations

import pickle

import pytest

from operators.catalog import Catalog, load_catalog_text
from operators.usage_windows import UsageWindowLogic, UsageWindowParams
from state.dedup import transaction_digest
from state.records import CountedUsage, MetricRow, ShardBatch, ShardEvent, WindowRow
from state.watermark import END_OF_STREAM, NO_WATERMARK
from state.window_kinds import SlidingWindows, TumblingWindows

SCALE = 10**18
HOUR = 3_600_000
DAY = 86_400_000
FEB_1_2026 = 1_769_904_000_000  # 2026-02-01T00:00:00Z


def event(txn: str, ts: int, value: int = 1, seen: int = NO_WATERMARK, metrics=None) -> ShardEvent:
    return ShardEvent(transaction_digest("org", txn), "org", "cust", "api", ts, value * SCALE, seen, 0,
                      txn, metrics)


def logic_for(windows, rollups=("hour", "day"), counted=False, catalog=None, resume=None):
    params = UsageWindowParams(windows, 30 * DAY, 1, 0, rollups,
                               catalog if catalog is not None else Catalog(),
                               emit_counted_usage=counted)
    return UsageWindowLogic(params, resume)


def run_to_end(logic, events: list[tuple]) -> list:
    out, _ = logic.on_batch([ShardBatch(0, 1, NO_WATERMARK, False, events)])
    end, _ = logic.on_batch([ShardBatch(0, 1, END_OF_STREAM, True, [])])
    return list(out) + list(end)


def rollup_rows(out: list, grain: str) -> list[tuple[int, int, int]]:
    return sorted((r.window_start_ms, r.event_count, r.total_scaled // SCALE)
                  for r in out if isinstance(r, WindowRow) and r.grain == grain)


def counted_days(out: list) -> dict[int, tuple[int, int]]:
    days: dict[int, tuple[int, int]] = {}
    for usage in (item for item in out if isinstance(item, CountedUsage)):
        for (_org, _customer, _code, day), (count, total, _latest) in usage.deltas.items():
            old = days.get(day, (0, 0))
            days[day] = (old[0] + count, old[1] + total // SCALE)
    return days


# --- item 6: rollups and live-total days follow the event's own time ----------

def test_one_day_windows_spread_the_hourly_rollup_over_the_events_hours():
    events = [event("a", 5 * HOUR + 1_000, 2), event("b", 5 * HOUR + 9_000, 3), event("c", 17 * HOUR, 7)]
    out = run_to_end(logic_for(TumblingWindows(DAY)), events)
    assert rollup_rows(out, "hour") == [(5 * HOUR, 2, 5), (17 * HOUR, 1, 7)]
    assert rollup_rows(out, "day") == [(0, 3, 12)]
    assert rollup_rows(out, "") == [(0, 3, 12)]  # the main row: one day window


def test_seven_minute_windows_put_an_event_after_midnight_in_its_own_day():
    after_midnight = FEB_1_2026 + 60_000          # its 7-minute window starts on January 31
    assert (after_midnight - after_midnight % 420_000) < FEB_1_2026
    events = [event("a", FEB_1_2026 - 60_000, 1), event("b", after_midnight, 4)]
    out = run_to_end(logic_for(TumblingWindows(420_000), counted=True), events)
    assert rollup_rows(out, "day") == [(FEB_1_2026 - DAY, 1, 1), (FEB_1_2026, 1, 4)]
    assert rollup_rows(out, "hour") == [(FEB_1_2026 - HOUR, 1, 1), (FEB_1_2026, 1, 4)]
    # Redis day and month totals (and quotas) are built from these days.
    assert counted_days(out) == {FEB_1_2026 - DAY: (1, 1), FEB_1_2026: (1, 4)}


def test_minute_windows_keep_the_rollups_and_days_they_had():
    events = [event(str(i), i * 7 * 60_000 + 1_000, i) for i in range(1, 12)]  # 00:07 .. 01:17
    out = run_to_end(logic_for(TumblingWindows(60_000), counted=True), events)
    assert rollup_rows(out, "hour") == [(0, 8, sum(range(1, 9))), (HOUR, 3, 9 + 10 + 11)]
    assert counted_days(out) == {0: (11, sum(range(1, 12)))}


def test_sliding_rollups_count_each_event_once_while_windows_count_it_size_over_slide_times():
    events = [event("a", 59 * 60_000, 2), event("b", HOUR + 30_000, 3)]
    out = run_to_end(logic_for(SlidingWindows(180_000, 60_000), counted=True), events)
    main = [r for r in out if isinstance(r, WindowRow) and r.grain == ""]
    assert sum(r.event_count for r in main) == 6  # 3 windows each
    assert rollup_rows(out, "hour") == [(0, 1, 2), (HOUR, 1, 3)]
    assert counted_days(out) == {0: (2, 5)}


# --- item 8: a resume with other rollup grains or catalog metrics is refused ----

METRIC = '[[metric]]\nname = "calls"\ncode = "api"\naggregation = "count"\nwindow = { kind = "tumbling", size = "1d" }\n'
OTHER = '[[metric]]\nname = "peak"\ncode = "api"\naggregation = "max"\n'


def snapshot_after_some_events(**kwargs):
    logic = logic_for(TumblingWindows(60_000), **kwargs)
    metrics = [(0, (), None)] if kwargs.get("catalog") and kwargs["catalog"].metrics else None
    logic.on_batch([ShardBatch(0, 1, NO_WATERMARK, False,
                               [event(str(i), i * 1_000, metrics=metrics) for i in range(9)])])
    return pickle.loads(pickle.dumps(logic.snapshot()))


@pytest.mark.parametrize("before, after", [
    (("hour", "day"), ("hour",)),   # a grain switched off ...
    (("hour",), ("hour", "day")),   # ... or on again: its daily row would read 1 instead of 9
    ((), ("day",)),
    (("day",), ()),
])
def test_a_resume_with_other_rollup_grains_is_refused_naming_rollups(before, after):
    snapshot = snapshot_after_some_events(rollups=before)
    with pytest.raises(ValueError, match=r"^ROLLUPS: the recovery state carries rollups"):
        logic_for(TumblingWindows(60_000), rollups=after, resume=snapshot)


@pytest.mark.parametrize("before, after", [
    ("", METRIC),                     # a metric added mid-window
    (METRIC, ""),                     # ... or removed
    (METRIC, METRIC + OTHER),
    (METRIC, METRIC.replace('"count"', '"sum"')),            # same name, another definition
    (METRIC, METRIC.replace('size = "1d"', 'size = "1h"')),
    (METRIC, METRIC + 'group_by = ["region"]\n'),
])
def test_a_resume_with_another_catalog_is_refused_naming_metrics_file(before, after):
    snapshot = snapshot_after_some_events(catalog=load_catalog_text(before))
    with pytest.raises(ValueError, match=r"^METRICS_FILE: the catalog differs") as error:
        logic_for(TumblingWindows(60_000), catalog=load_catalog_text(after), resume=snapshot)
    assert "calls" in str(error.value) or "peak" in str(error.value)


def test_a_resume_with_the_same_grains_and_catalog_carries_the_daily_row():
    catalog = load_catalog_text(METRIC)
    snapshot = snapshot_after_some_events(rollups=("day",), catalog=catalog)
    resumed = logic_for(TumblingWindows(60_000), rollups=("day",), catalog=load_catalog_text(METRIC),
                        resume=snapshot)
    out = run_to_end(resumed, [event("last", 20_000, metrics=[(0, (), None)])])
    assert rollup_rows(out, "day") == [(0, 10, 10)]
    assert [(r.metric, r.window_start_ms, r.event_count) for r in out if isinstance(r, MetricRow)] == [
        ("calls", 0, 10)]


def test_the_flow_refuses_to_resume_with_a_grain_switched_off(kafka_broker, chdb_url, tmp_path):
    import json
    import subprocess

    from confluent_kafka import Producer

    from deploy.broker import ensure_topic
    from deploy.runner import bytewax_command, init_recovery_store, run_flow
    from support.flow import flow_env
    from support.kafka import unique_topic

    topic = unique_topic("rollups")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})
    for i in range(9):
        producer.produce(topic, json.dumps({
            "transaction_id": str(i), "organization_id": "org", "external_customer_id": "c",
            "code": "api", "timestamp": 1_000 * i}).encode(), partition=0)
    assert producer.flush(10) == 0
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    env = flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), chdb_url, ROLLUPS="hour,day")
    run_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
    env["ROLLUPS"] = "hour"
    resumed = subprocess.run(bytewax_command(recovery_dir=recovery, snapshot_s=1, backup_s=10),
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode != 0
    assert "ROLLUPS: the recovery state carries rollups day, hour, the flow now has hour" in resumed.stderr
