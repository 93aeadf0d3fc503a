"""Live totals in Redis and quota alerts on Kafka: exact after crashes, replays and a Redis outage.

Unit tests drive the logic and the sinks directly; the end-to-end tests run the real flow against
the real broker, ClickHouse (chdb) and a redis-server of their own, and compare Redis and the
alerts topic with a recomputation from the raw topic (``recovery.reconcile.recompute``).
"""

from __future__ import annotations

import decimal
import json
import pickle
import random
import signal
import time
from decimal import Decimal
from pathlib import Path

import pytest

from deploy.broker import ensure_topic
from deploy.generator import generate, produce
from deploy.runner import init_recovery_store, start_flow
from operators.live_totals import (
    DAY_MS,
    LiveTotals,
    LiveTotalsLogic,
    LiveTotalsParams,
    QuotaAlert,
    day_label,
    month_of,
)
from operators.quotas import QuotaFileError, QuotaRules, load_quotas, parse_quotas
from operators.validation import Invalid, validate
from recovery.reconcile import read_aggregates, recompute
from sinks.alerts import PENDING, AlertsPartition, fence_key
from sinks.clickhouse_backend import connect
from sinks.redis_sink import RedisTotalsWriter
from state.records import CountedUsage
from support.clickhouse import before_first_write
from support.flow import flow_env
from support.kafka import read_all, unique_topic
from support.redis import redis_server  # noqa: F401
from test_exactly_once import FAST_FLOW, assert_exact, new_stream, wait_exit

FEB_1_2026_MS = 1_769_904_000_000
START_MS = FEB_1_2026_MS - 15 * 60_000  # the stream crosses a day and a month boundary
QUOTAS = """
[[quota]]
code = "api_calls"
period = "day"
measure = "count"
threshold = 25

[[quota]]
code = "api_calls"
period = "month"
measure = "count"
threshold = 60

[[quota]]
code = "storage_gb"
period = "month"
measure = "value"
threshold = "3000.5"
"""
_CONTEXT = decimal.Context(prec=80)


# ----------------------------------------------------------------------------- quota rules


@pytest.mark.parametrize("text, message", [
    ('[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "count"\nthreshold = -1\n',
     "line 5: a count threshold must be a whole number >= 0, got -1"),
    ('[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "value"\nthreshold = "1e-19"\n',
     "line 5: threshold 1e-19 has more than 18 decimal places"),
    ('[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "value"\nthreshold = "1.0000000000000000000000000001"\n',
     "line 5: threshold 1.0000000000000000000000000001 has more than 18 decimal places"),
    ('[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "value"\nthreshold = "100000000000000000000"\n',
     "line 5: threshold 100000000000000000000 does not fit Decimal(38, 18)"),
    ('[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "sum"\nthreshold = 1\n',
     'line 4: measure must be "count" or "value", got \'sum\''),
    ('[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "count"\n\n[[quota]]\ncode = "b"\n',
     "line 1: [[quota]] is missing 'threshold'"),
    ('[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "count"\nthreshold = 1\nlimit = 2\n',
     "line 6: unknown field 'limit'"),
    ('[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "count"\nthreshold = 1\n\n'
     '[[quota]]\ncode = "a"\nperiod = "day"\nmeasure = "count"\nthreshold = 1\n',
     "line 7: the same rule as line 1"),
    ('[[quota]]\ncode = "a"\nperiod = \n', "line 3, column 10: not valid TOML"),
])
def test_a_bad_quotas_file_names_the_line_and_the_problem(tmp_path, text, message):
    path = tmp_path / "quotas.toml"
    path.write_text(text)
    with pytest.raises(QuotaFileError) as error:
        load_quotas(str(path))
    assert str(error.value).startswith(f"{path} ")
    assert message in str(error.value)


def test_quota_thresholds_are_exact_and_exceeded_strictly():
    rules = parse_quotas(QUOTAS)
    [value_rule] = rules.for_code("storage_gb", "month")
    assert value_rule.threshold_scaled == 3_000_500_000_000_000_000_000
    assert rules.exceeded("storage_gb", "month", count=1, total_scaled=value_rule.threshold_scaled) == []
    assert rules.exceeded("storage_gb", "month", count=1,
                          total_scaled=value_rule.threshold_scaled + 1) == [value_rule]
    assert [r.threshold_text for r in rules.exceeded("api_calls", "day", count=26, total_scaled=0)] == ["25"]


# ----------------------------------------------------------------------------- the logic


def usage(watermark: int, **deltas) -> CountedUsage:
    """``usage(wm, c1=(day, count, total_scaled, latest))`` for org ``o`` and code ``api_calls``."""
    return CountedUsage({("o", customer, "api_calls", day): (count, total, latest)
                         for customer, (day, count, total, latest) in deltas.items()}, watermark)


def test_live_totals_accumulate_alert_once_and_resume_from_a_snapshot():
    params = LiveTotalsParams(shards=1, rules=parse_quotas(QUOTAS))
    day = FEB_1_2026_MS
    logic = LiveTotalsLogic(params)
    out, _ = logic.on_batch([usage(day, c1=(day, 20, 10**18, day + 5)),
                             usage(day, c1=(day, 6, 0, day + 9), c2=(day - DAY_MS, 1, 0, day - 1))])
    totals = {(t[1], t[4]): (t[5], t[6]) for item in out if isinstance(item, LiveTotals)
              for t in item.labelled()}
    assert totals == {("c1", "2026-02-01"): (26, 10**18), ("c1", "2026-02"): (26, 10**18),
                      ("c2", "2026-01-31"): (1, 0), ("c2", "2026-01"): (1, 0)}
    [alert] = [a for a in out if isinstance(a, QuotaAlert)]
    assert (alert.period, alert.threshold, alert.observed, alert.event_timestamp_ms) == (
        "2026-02-01", "25", "26", day + 9)

    # The snapshot is a copy: changing the live logic afterwards does not change it.
    snapshot = logic.snapshot()
    logic.on_batch([usage(day, c1=(day, 100, 0, day))])
    assert snapshot.total_entries()[("o", "c1", "api_calls", "day", day)] == (26, 10**18)

    # Resumed, it re-emits every total once (Redis may have lost them), then goes on.
    resumed = LiveTotalsLogic(params, snapshot)
    assert resumed.notify_at() is not None
    [again], _ = resumed.on_notify()
    assert len(again.totals) == 4 and resumed.notify_at() is None
    out, _ = resumed.on_batch([usage(day, c1=(day, 40, 0, day + 20))])
    alerts = [(a.period, a.threshold) for a in out if isinstance(a, QuotaAlert)]
    assert alerts == [("2026-02", "60")]  # the day alert already fired before the snapshot


def test_live_totals_forget_old_periods():
    params = LiveTotalsParams(shards=1)
    logic = LiveTotalsLogic(params)
    jan_31, feb_1 = FEB_1_2026_MS - DAY_MS, FEB_1_2026_MS
    logic.on_batch([usage(jan_31, a=(jan_31, 1, 0, jan_31), b=(feb_1, 1, 0, feb_1))])
    assert len(logic.totals) == 4
    logic.on_batch([usage(feb_1 + 2 * DAY_MS)])  # Jan 31 ended 2 days before the watermark
    assert {(k[3], month_of(k[4])[1] if k[3] == "month" else day_label(k[4])) for k in logic.totals} == {
        ("month", "2026-01"), ("day", "2026-02-01"), ("month", "2026-02")}
    logic.on_batch([usage(FEB_1_2026_MS + 65 * DAY_MS)])  # April 7: January is three months back
    assert {k[4] for k in logic.totals if k[3] == "month"} == {month_of(feb_1)[0]}


def test_live_totals_refuse_state_from_another_shard_count():
    snapshot = LiveTotalsLogic(LiveTotalsParams(shards=4)).snapshot()
    with pytest.raises(ValueError, match="4 shards"):
        LiveTotalsLogic(LiveTotalsParams(shards=8), snapshot)


# ----------------------------------------------------------------------------- the sinks


def test_redis_writer_never_blocks_and_rewrites_what_a_restarted_redis_lost(redis_server):
    writer = RedisTotalsWriter(redis_server.url, "0", timeout_s=0.5)
    try:
        writer.submit({("o", "c", "x", "day", FEB_1_2026_MS): (1, 10**18)})
        assert writer.drain(10)
        key = "tallyflow:usage:o:c:x:2026-02-01"
        assert redis_server.client().hgetall(key) == {b"count": b"1", b"value": b"1.000000000000000000"}

        redis_server.stop()
        started = time.monotonic()
        for count in range(2, 200):  # coalesced per key: one pending entry, whatever the count
            writer.submit({("o", "c", "x", "day", FEB_1_2026_MS): (count, 0),
                           ("o", "d", "x", "month", FEB_1_2026_MS): (count, 0)})
        assert time.monotonic() - started < 0.5, "submitting must not wait for Redis"
        assert not writer.drain(1.0) and writer.pending() == 2

        redis_server.start()  # empty: no persistence
        assert writer.drain(20)
        client = redis_server.client()
        assert client.hget(key, "count") == b"199"
        assert client.hget("tallyflow:usage:o:d:x:2026-02", "count") == b"199"
        assert 0 < client.ttl(key) <= 4 * 86_400

        client.flushall()  # lost again while Redis stays up: the sentinel notices on next write
        writer.submit({("o", "e", "x", "day", FEB_1_2026_MS): (1, 0)})
        assert writer.drain(10)
        assert client.hget(key, "count") == b"199"
    finally:
        writer.close(1)


def test_alert_fence_sends_once_across_replays(kafka_broker, redis_server):
    topic = unique_topic("alerts")
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    alert = QuotaAlert("o", "c", "api_calls", "day", "2026-02-01", "count", "25", "26", FEB_1_2026_MS)
    other = QuotaAlert("o", "d", "api_calls", "day", "2026-02-01", "count", "25", "30", FEB_1_2026_MS)
    client = redis_server.client()

    def deliver(*alerts: QuotaAlert) -> None:  # one sink partition per run, as after a restart
        part = AlertsPartition([kafka_broker.bootstrap], topic, redis_server.url)
        try:
            part.write_batch(list(alerts))
            part.snapshot()
        finally:
            part.close()

    deliver(alert)
    assert client.get(fence_key(alert)) == b"sent"
    deliver(alert)  # a replay of the uncommitted epoch: the fence says sent
    # A crash between Kafka's acknowledgement and marking it sent leaves the fence pending: the
    # replay finds the record in the topic. A pending fence whose record never made it is sent.
    client.set(fence_key(alert), PENDING + b"0")
    client.set(fence_key(other), PENDING + b"0")
    deliver(alert, other)
    keys = [json.loads(m.key()) for m in read_all(kafka_broker.bootstrap, topic)]
    assert sorted(keys) == sorted([list(alert.identity), list(other.identity)])
    assert client.get(fence_key(other)) == b"sent"


# ----------------------------------------------------------------------------- end to end


def expected_live_totals(bootstrap: str, topic: str,
                         settled_only: bool = False) -> dict[str, tuple[int, Decimal]]:
    """Day and month totals per customer and code, from the raw topic (counted events only).

    ``settled_only``: only the windows every partition's watermark has passed (a running flow
    decides, and counts, an event once the watermark has passed its window).
    """
    raw = [(m.partition(), m.offset(), m.value()) for m in read_all(bootstrap, topic, timeout=60)]
    windows = recompute(raw, window_size_ms=60_000, max_out_of_orderness_ms=10_000).aggregates
    settled = _flow_watermark(raw, 10_000) if settled_only else None
    totals: dict[str, tuple[int, Decimal]] = {}
    for (org, customer, code, start), (count, total) in windows.items():
        if settled is not None and start + 60_000 > settled:
            continue
        day = start - start % DAY_MS
        for period in (day_label(day), month_of(day)[1]):
            key = f"tallyflow:usage:{org}:{customer}:{code}:{period}"
            had_count, had_total = totals.get(key, (0, Decimal(0)))
            totals[key] = (had_count + count, _CONTEXT.add(had_total, total))
    return totals


def _flow_watermark(raw: list, out_of_orderness_ms: int) -> int:
    """The minimum over partitions of (latest valid event time - out-of-orderness)."""
    latest: dict[int, int] = {}
    for partition, _offset, value in raw:
        event = validate(value)
        if not isinstance(event, Invalid):
            latest[partition] = max(latest.get(partition, event.timestamp_ms), event.timestamp_ms)
    return min(latest.values()) - out_of_orderness_ms


def redis_totals(client) -> dict[str, tuple[int, Decimal]]:
    out = {}
    for key in client.scan_iter("tallyflow:usage:*", count=1_000):
        fields = client.hgetall(key)
        out[key.decode()] = (int(fields[b"count"]), Decimal(fields[b"value"].decode()))
    return out


def expected_alerts(totals: dict[str, tuple[int, Decimal]], rules: QuotaRules) -> set[tuple]:
    alerts = set()
    for key, (count, total) in totals.items():
        org, customer, code, period = key.split(":")[2:]
        kind = "day" if len(period) == 10 else "month"
        scaled = int(total.scaleb(18, _CONTEXT))
        for rule in rules.exceeded(code, kind, count=count, total_scaled=scaled):
            alerts.add((org, customer, code, period, rule.measure, rule.threshold_text))
    return alerts


def assert_alerts_exact(bootstrap: str, topic: str, totals: dict, rules: QuotaRules) -> int:
    records = read_all(bootstrap, topic, timeout=60)
    keys = [tuple(json.loads(m.key())) for m in records]
    assert len(keys) == len(set(keys)), "an alert was sent twice"
    expected = expected_alerts(totals, rules)
    assert set(keys) == expected
    for record in records:
        alert = json.loads(record.value())
        key = (f"tallyflow:usage:{alert['organization_id']}:{alert['external_customer_id']}:"
               f"{alert['code']}:{alert['period']}")
        final = totals[key][0] if alert["measure"] == "count" else totals[key][1]
        assert Decimal(str(alert["threshold"])) < Decimal(str(alert["observed"])) <= final
    return len(expected)


def redis_flow_env(bootstrap: str, topic: str, dlq: str, url: str, redis_url: str,
                   quotas: Path, alerts_topic: str) -> dict:
    quotas.write_text(QUOTAS)
    return flow_env(bootstrap, topic, dlq, url, **FAST_FLOW, REDIS_URL=redis_url,
                    QUOTAS_FILE=str(quotas), ALERTS_TOPIC=alerts_topic)


def stream_chunks(count: int, pieces: int, seed: int) -> list[list]:
    records = list(generate(count, seed=seed, partitions=4, start_ms=START_MS, span_ms=1_800_000))
    size = -(-count // pieces)
    return [records[i:i + size] for i in range(0, count, size)]


def test_sigkills_and_replays_leave_exact_totals_and_one_alert_per_crossing(
        kafka_broker, chdb_url, redis_server, tmp_path):
    bootstrap = kafka_broker.bootstrap
    topic, dlq = new_stream(bootstrap)
    alerts_topic = unique_topic("alerts")
    ensure_topic(bootstrap, alerts_topic, 2)
    env = redis_flow_env(bootstrap, topic, dlq, chdb_url, redis_server.url,
                         tmp_path / "quotas.toml", alerts_topic)
    tail_env = {k: v for k, v in env.items() if k != "KAFKA_STOP_AT_END"}  # runs until killed
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    rng = random.Random(7)
    for run, chunk in enumerate(stream_chunks(40_000, 4, seed=21)):
        produce(bootstrap, topic, chunk)
        if run % 2:
            # An epoch longer than the run: alerts go out, then the kill comes before their
            # epoch commits, so the next run detects those crossings again: the fence must hold.
            sent = len(read_all(bootstrap, alerts_topic))
            flow = start_flow(tail_env, recovery_dir=recovery, snapshot_s=60, backup_s=120)
            wait_until(lambda: len(read_all(bootstrap, alerts_topic)) > sent, 60, "new alerts")
        else:
            flow = start_flow(tail_env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
            time.sleep(rng.uniform(1.0, 3.0))
        assert flow.poll() is None, "a tail-mode flow runs until it is killed"
        flow.send_signal(signal.SIGKILL)
        flow.wait()
    assert wait_exit(start_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)) == 0

    totals = expected_live_totals(bootstrap, topic)
    assert redis_totals(redis_server.client()) == totals
    alerts = assert_alerts_exact(bootstrap, alerts_topic, totals, parse_quotas(QUOTAS))
    assert alerts >= 10
    assert_exact(bootstrap, topic, chdb_url)

    # Redis loses everything while the flow is stopped: the next start rewrites every total
    # from the recovery state, and alerts already sent stay sent.
    redis_server.client().flushall()
    assert wait_exit(start_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)) == 0
    assert redis_totals(redis_server.client()) == totals
    assert len(read_all(bootstrap, alerts_topic)) == alerts


def count_rows(url: str) -> int:
    """Rows in ``usage_aggregates``; 0 before the sink's first write has created the table."""
    backend = connect(url)
    try:
        return before_first_write(lambda: len(read_aggregates(backend)), 0)
    finally:
        backend.close()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_redis_outage_keeps_the_flow_going_then_totals_and_alerts_converge(
        kafka_broker, dev_clickhouse, redis_server, tmp_path):
    bootstrap = kafka_broker.bootstrap
    topic, dlq = new_stream(bootstrap)
    alerts_topic = unique_topic("alerts")
    ensure_topic(bootstrap, alerts_topic, 2)
    url = dev_clickhouse.url
    tail_env = redis_flow_env(bootstrap, topic, dlq, url, redis_server.url,
                              tmp_path / "quotas.toml", alerts_topic)
    del tail_env["KAFKA_STOP_AT_END"]
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    first, second = stream_chunks(30_000, 2, seed=33)
    produce(bootstrap, topic, first)
    flow = start_flow(tail_env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
    try:
        client = redis_server.client()
        wait_until(lambda: client.dbsize() > 100, 60, "live totals in Redis")
        rows_before = count_rows(url)

        alerts_before = len(read_all(bootstrap, alerts_topic))
        redis_server.stop()
        produce(bootstrap, topic, second)  # its crossings happen while Redis is down
        wait_until(lambda: count_rows(url) > rows_before + 100, 60,
                   "ClickHouse rows while Redis is down")
        wait_until(lambda: len(read_all(bootstrap, alerts_topic)) > alerts_before, 30,
                   "alerts while Redis is down (sent unfenced)")
        assert flow.poll() is None and redis_server.process is None

        redis_server.start()  # empty: every total must be written again
        client = redis_server.client()
        # Live totals hold the events the watermark has decided: every window it passed.
        expected = expected_live_totals(bootstrap, topic, settled_only=True)
        wait_until(lambda: redis_totals(client) == expected, 60, "Redis totals to converge")
        flow.send_signal(signal.SIGTERM)
        assert wait_exit(flow, 60) == 0
    finally:
        if flow.poll() is None:
            flow.kill()

    stop_env = dict(tail_env, KAFKA_STOP_AT_END="1")
    assert wait_exit(start_flow(stop_env, recovery_dir=recovery, snapshot_s=1, backup_s=10)) == 0
    totals = expected_live_totals(bootstrap, topic)
    assert redis_totals(redis_server.client()) == totals
    assert assert_alerts_exact(bootstrap, alerts_topic, totals, parse_quotas(QUOTAS)) >= 10
    assert_exact(bootstrap, topic, url)


def test_incremental_snapshots_resume_exactly_and_forget_evicted_periods():
    """Snapshot after every batch (segments of changes), evict, resume: the same totals."""
    params = LiveTotalsParams(shards=1)
    logic = LiveTotalsLogic(params)
    jan_31, feb_1 = FEB_1_2026_MS - DAY_MS, FEB_1_2026_MS
    expected: dict = {}
    for i in range(30):
        day = jan_31 if i < 10 else feb_1
        customer = f"c{i % 7}"
        logic.on_batch([usage(day, **{customer: (day, 1, i, day)})])
        for kind, start in (("day", day), ("month", month_of(day)[0])):
            count, total = expected.get(("o", customer, "api_calls", kind, start), (0, 0))
            expected[("o", customer, "api_calls", kind, start)] = (count + 1, total + i)
        snapshot = logic.snapshot()
        assert snapshot.total_entries() == expected == logic.totals
    assert 1 < len(snapshot.totals) <= 30
    logic.on_batch([usage(feb_1 + 2 * DAY_MS)])  # Jan 31 is evicted
    expected = {k: v for k, v in expected.items() if not (k[3] == "day" and k[4] == jan_31)}
    snapshot = logic.snapshot()
    assert snapshot.total_entries() == expected == logic.totals
    resumed = LiveTotalsLogic(params, pickle.loads(pickle.dumps(snapshot)))
    assert resumed.totals == expected
