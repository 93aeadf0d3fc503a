"""Every accepted event time, up to the validator's last one, flows to the end: live totals,
rollups and encoders never raise at a day, month or year boundary, nor past year 9999.

Expected labels and times are written out by hand or computed with ``datetime`` (an independent
calendar), never with the flow's own.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from confluent_kafka import Producer

from deploy.broker import ensure_topic
from deploy.runner import run_flow
from operators.live_totals import LiveTotalsLogic, LiveTotalsParams
from operators.quotas import parse_quotas
from operators.validation import MAX_TIMESTAMP_MS, validate
from sinks.clickhouse_backend import connect
from sinks.columnar import arrow_stream, window_batch
from state.records import CountedUsage, WindowRow
from support.flow import flow_env
from support.kafka import unique_topic
from support.redis import redis_server  # noqa: F401

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_MS = 86_400_000


def ms(text: str) -> int:
    return (datetime.fromisoformat(text) - EPOCH) // timedelta(milliseconds=1)


LAST = "2260-12-31T23:59:59.999+00:00"  # the validator's last accepted time
BOUNDARY_TIMES = [
    "2024-02-29T23:59:59.999+00:00", "2024-03-01T00:00:00.000+00:00",  # leap day, month change
    "2099-12-31T23:59:59.999+00:00", "2100-03-01T00:00:00.000+00:00",  # 2100 is not a leap year
    "2260-11-30T23:59:59.999+00:00", "2260-12-01T00:00:00.000+00:00",
    "2260-12-31T00:00:00.000+00:00", LAST,
]


def test_the_validator_bound_is_the_last_millisecond_of_2260():
    assert MAX_TIMESTAMP_MS == ms(LAST)
    assert validate(event_json("t", ms(LAST), "1")).timestamp_ms == ms(LAST)
    assert validate(event_json("t", ms(LAST) + 1, "1")).reason == "invalid_timestamp"


@pytest.mark.parametrize("moment", BOUNDARY_TIMES + ["9999-12-31T23:59:59.999+00:00"])
def test_live_totals_label_and_evict_any_time(moment):
    """Up to the bound, and past it (defence in depth: 9999-12-31 once raised here)."""
    timestamp = ms(moment)
    day = timestamp - timestamp % DAY_MS
    rules = parse_quotas('[[quota]]\ncode="x"\nperiod="month"\nmeasure="count"\nthreshold=1\n')
    logic = LiveTotalsLogic(LiveTotalsParams(shards=1, rules=rules))
    out, _ = logic.on_batch([CountedUsage({("o", "c", "x", day): (2, 3, timestamp)}, watermark=timestamp)])
    labels = sorted((kind, label, count) for _o, _c, _x, kind, label, count, _t in out[0].labelled())
    assert labels == [("day", moment[:10], 2), ("month", moment[:7], 2)]
    assert [(a.period, a.observed) for a in out[1:]] == [(moment[:7], "2")]
    # The watermark moves a year on: both periods are evicted (their next month is computed).
    later = timestamp + 366 * DAY_MS
    logic.on_batch([CountedUsage({}, watermark=later)])
    assert logic.snapshot().total_entries() == {}


def window_row(start_ms: int, end_ms: int) -> WindowRow:
    return WindowRow("o", "c", "x", start_ms, end_ms, 1, 10**18, 1, grain="day")


@pytest.mark.parametrize("moment", BOUNDARY_TIMES)
def test_rows_ending_after_the_last_day_are_encoded_and_stored(moment, chdb_url):
    start = ms(moment) - ms(moment) % DAY_MS
    end = start + DAY_MS  # 2261-01-01 for the last day: past the validator's bound, still fine
    expected_end = datetime.fromtimestamp(end / 1000, UTC)
    backend = connect(chdb_url)
    try:
        backend.command("CREATE TABLE IF NOT EXISTS rows_by_day (organization_id String, "
                        "external_customer_id String, code String, window_start DateTime64(3, 'UTC'), "
                        "window_end DateTime64(3, 'UTC'), event_count UInt64, total_value Decimal(76, 18), "
                        "version UInt64, is_deleted UInt8) ENGINE = MergeTree ORDER BY window_start")
        backend.command("TRUNCATE TABLE rows_by_day")
        batch = window_batch([window_row(start, end)], "usage_aggregates_daily")
        backend.insert_arrow("rows_by_day", batch.schema.names, arrow_stream(batch))
        _, rows = backend.query("SELECT window_start, window_end FROM rows_by_day")
    finally:
        backend.close()
    assert rows == [(datetime.fromtimestamp(start / 1000, UTC), expected_end)]


def test_an_end_past_year_9999_is_encoded_at_the_last_millisecond_clickhouse_parses():
    last_day = ms("9999-12-31T00:00:00+00:00")
    batch = window_batch([window_row(last_day, last_day + DAY_MS)], "usage_aggregates_daily")
    row = {name: batch.column(name)[0].as_py() for name in ("window_start", "window_end")}
    assert (row["window_start"], row["window_end"]) == (
        datetime(9999, 12, 31, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC))


# ----------------------------------------------------------------------------- the real flow


def event_json(txn: str, timestamp_ms: int, value: str) -> bytes:
    return json.dumps({"transaction_id": txn, "organization_id": "o", "external_customer_id": "c",
                       "code": "x", "timestamp": timestamp_ms, "value": value}).encode()


def produce_dated(bootstrap: str, topic: str, events: list[tuple[str, int, str]]) -> None:
    """Produce with each record's Kafka timestamp equal to its event time, as a live producer
    would have stamped it then (a future-timestamp rule compares the two)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for txn, timestamp, value in events:
        producer.produce(topic, event_json(txn, timestamp, value), key=txn.encode(), partition=0,
                         timestamp=timestamp)
    assert producer.flush(30) == 0


def test_events_up_to_the_last_accepted_time_flow_through_rollups_and_live_totals(
        kafka_broker, chdb_url, redis_server):
    topic = unique_topic("bounds")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    events = [(f"t{i}-{uuid.uuid4().hex[:6]}", ms(moment), f"{i + 1}.5") for i, moment in enumerate(BOUNDARY_TIMES)]
    produce_dated(kafka_broker.bootstrap, topic, events)
    run_flow(flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), chdb_url,
                      ROLLUPS="hour,day", REDIS_URL=redis_server.url, MAX_OUT_OF_ORDERNESS="0s"))

    def by_start(sql: str) -> dict:
        backend = connect(chdb_url)
        try:
            _, rows = backend.query(sql)
        finally:
            backend.close()
        return {start: (end, count, total) for start, end, count, total in rows}

    expected: dict[str, dict] = {"usage_aggregates": {}, "usage_aggregates_hourly": {},
                                 "usage_aggregates_daily": {}}
    for (_txn, timestamp, value), (table, size) in (
            (e, g) for e in events for g in (("usage_aggregates", 60_000),
                                             ("usage_aggregates_hourly", 3_600_000),
                                             ("usage_aggregates_daily", DAY_MS))):
        start = datetime.fromtimestamp((timestamp - timestamp % size) / 1000, UTC)
        _end, count, total = expected[table].get(start, (None, 0, Decimal(0)))
        expected[table][start] = (start + timedelta(milliseconds=size), count + 1, total + Decimal(value))
    for table, rows in expected.items():
        assert by_start(f"SELECT window_start, window_end, event_count, total_value FROM {table} FINAL") \
            == rows, table

    client = redis_server.client()
    totals: dict[str, tuple[int, Decimal]] = {}
    for _txn, timestamp, value in events:
        moment = datetime.fromtimestamp(timestamp / 1000, UTC)
        for period in (f"{moment:%Y-%m-%d}", f"{moment:%Y-%m}"):
            count, total = totals.get(period, (0, Decimal(0)))
            totals[period] = (count + 1, total + Decimal(value))
    stored = {}
    for key in client.scan_iter("tallyflow:usage:o:c:x:*"):
        fields = client.hgetall(key)
        stored[key.decode().rsplit(":", 1)[1]] = (int(fields[b"count"]), Decimal(fields[b"value"].decode()))
    assert stored == totals
