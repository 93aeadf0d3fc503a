"""Lago's worked examples, in our words: events, billing period, the number Lago bills.

Each example comes from getlago/lago-api's aggregation specs (read, not copied): the
same events, the same period, and Lago's expected value to the digits Lago asserts.
Where Lago's period is a subscription anniversary we use the calendar month holding
the same events; the numbers do not change. Hand-computed values say how they were
computed. Everything runs through the real intake and shard logic in-process
(``bill``); one test runs the real flow end to end and reads ``metric_aggregates FINAL``.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Context, Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.broker import ensure_topic
from deploy.runner import init_recovery_store, run_flow
from operators.catalog import CatalogError, load_catalog_text
from operators.intake import IntakeLogic
from operators.usage_windows import UsageWindowLogic, UsageWindowParams
from sinks.clickhouse_backend import connect
from state.aggregations import Sum
from state.records import MetricRow
from state.window_kinds import CalendarWindows, TumblingWindows
from state.windows import AggregateWindowStore
from support.flow import flow_env
from support.kafka import unique_topic

UTC = timezone.utc
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
DAY_MS = 86_400_000


def at(text: str) -> int:
    """Epoch milliseconds of a UTC time written like Lago's specs: "2023-08-01 01:30:00"."""
    return _ms(datetime.fromisoformat(text).replace(tzinfo=UTC))


def event(timestamp: str, code: str = "storage", customer: str = "acme", **properties) -> dict:
    return {"timestamp": timestamp, "code": code, "customer": customer, "properties": properties}


def metric(aggregation: str, code: str = "storage", **options) -> str:
    """One ``[[metric]]`` entry named ``m``: the options as TOML (tables written inline)."""
    lines = ['[[metric]]', 'name = "m"', f'code = "{code}"', f'aggregation = "{aggregation}"']
    for key, value in options.items():
        lines.append(f"{key} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


MONTH = {"kind": "calendar", "unit": "month"}


def _records(events: list[dict]) -> list[tuple]:
    records = []
    for offset, item in enumerate(events):
        body = {"transaction_id": item.get("transaction_id", f"t{offset}"), "organization_id": "org",
                "external_customer_id": item["customer"], "code": item["code"],
                "timestamp": item["timestamp"].replace(" ", "T") + "Z",
                "properties": item["properties"]}
        records.append((offset, None, json.dumps(body).encode(), None))
    return records


class Biller:
    """The real intake and shard logic of one partition and one shard, fed one record at a time."""

    def __init__(self, catalog_text: str) -> None:
        self.catalog = load_catalog_text(catalog_text)
        usage = TumblingWindows(60_000)
        self.params = UsageWindowParams(usage, dedup_horizon_ms=400 * DAY_MS, shards=1, catalog=self.catalog)
        self.intake = IntakeLogic("usage", 0, 1, 1, usage, max_out_of_orderness_ms=0, catalog=self.catalog)
        self.logic = UsageWindowLogic(self.params)
        self.table: dict[tuple, MetricRow] = {}  # what ReplacingMergeTree FINAL keeps, by its key

    def feed(self, record: tuple | None, at_end: bool = False) -> None:
        self.feed_batch([record] if record else [], at_end)

    def feed_batch(self, records: list[tuple], at_end: bool = False) -> None:
        batch = self.intake.process(records, at_end=at_end)
        out, _ = self.logic.on_batch(batch.shard_batches()[1])
        for row in out:
            if isinstance(row, MetricRow):
                key = (row.external_customer_id, row.group_key, row.window_start_ms, row.metric)
                if key not in self.table or row.version >= self.table[key].version:
                    self.table[key] = row

    def checkpoint(self) -> tuple:
        """What a Bytewax snapshot keeps, pickled as the recovery store would."""
        return copy.deepcopy(self.intake), pickle.dumps(self.logic.snapshot())

    def restore(self, saved: tuple) -> None:
        intake, snapshot = saved
        self.intake = copy.deepcopy(intake)
        self.logic = UsageWindowLogic(self.params, pickle.loads(snapshot))

    def rows(self) -> dict[tuple, MetricRow]:
        """``(customer, group_key, window start) -> row`` of a one-metric catalog."""
        return {key[:3]: row for key, row in self.table.items()}


def bill(catalog_text: str, events: list[dict], until: str | None = None) -> Biller:
    """Run ``events`` (in time order), then an unrelated event at ``until`` to move the
    watermark past the periods to close, then the end of input (flushes open windows)."""
    biller = Biller(catalog_text)
    tail = [event(until, code="tick")] if until else []
    for record in _records(events + tail):
        biller.feed(record)
    biller.feed(None, at_end=True)
    return biller


def values(biller: Biller) -> dict[tuple, Decimal]:
    """``(customer, group_key, window start) -> value`` of the final table, as decimals."""
    return {key: Decimal(row.value_scaled).scaleb(-18) for key, row in biller.rows().items()}


def lago_round(value: Decimal, digits: int) -> str:
    """Lago's ``value.round(digits).to_s``: BigDecimal rounds ties away from zero and prints
    no trailing zeros, but at least one decimal ("10.0", "0.02218")."""
    text = format(value.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP), "f")
    if "." in text:
        text = text.rstrip("0")
    return text + "0" if text.endswith(".") else text if "." in text else text + ".0"


def test_lago_round_prints_like_ruby():
    assert [lago_round(Decimal(v), 5) for v in ("9.999996", "0.0221774", "-2.000005", "6")] == [
        "10.0", "0.02218", "-2.00001", "6.0"]


def only(biller: Biller) -> MetricRow:
    rows = list(biller.rows().values())
    assert len(rows) == 1, rows
    return rows[0]


# -- weighted_sum: increments, time-weighted over the billing period --------------------------

STORAGE = metric("weighted_sum", field="properties.value", input="increment", unit="period_average",
                 window=MONTH)
AUGUST_2023 = [("2023-08-01 00:00:00", 2), ("2023-08-01 01:00:00", 3), ("2023-08-01 01:30:00", 1),
               ("2023-08-01 02:00:00", -4), ("2023-08-01 04:00:00", -2), ("2023-08-01 05:00:00", 10),
               ("2023-08-01 05:30:00", -10)]


def test_weighted_sum_increments_average_over_the_month():
    # levels 2, 5, 6, 2, 0, 10, 0: 59 400 level-seconds over August's 2 678 400 s
    biller = bill(STORAGE, [event(ts, value=v) for ts, v in AUGUST_2023])
    row = only(biller)
    assert lago_round(Decimal(row.value_scaled).scaleb(-18), 5) == "0.02218"
    assert row.event_count == 7
    assert (row.window_start_ms, row.window_end_ms) == (at("2023-08-01 00:00:00"), at("2023-09-01 00:00:00"))
    exact = (Decimal(59_400) / Decimal(2_678_400)).quantize(Decimal("1e-18"))  # half-even at 18
    assert Decimal(row.value_scaled).scaleb(-18) == exact


def test_weighted_sum_levels_per_group():
    # Lago's presentation_by region: eu holds 2 for 2 h then 1; us holds 3 from 01:00
    text = STORAGE.replace('window =', 'group_by = ["region"]\nwindow =')
    biller = bill(text, [event("2023-08-01 00:00:00", value=2, region="eu"),
                         event("2023-08-01 01:00:00", value=3, region="us"),
                         event("2023-08-01 02:00:00", value=-1, region="eu")])
    by_group = {key[1]: lago_round(value, 5) for key, value in values(biller).items()}
    assert by_group == {'{"region":"eu"}': "1.00269", '{"region":"us"}': "2.99597"}


@pytest.mark.parametrize("events, expected, count", [
    ([("2023-08-01 00:00:00", 1000)], Decimal(1000), 1),                           # one event
    ([("2023-08-01 00:00:00", 3), ("2023-08-01 00:00:00", 3)], Decimal(6), 2),     # same instant: add
])
def test_weighted_sum_simple_periods(events, expected, count):
    row = only(bill(STORAGE, [event(ts, value=v) for ts, v in events]))
    assert (Decimal(row.value_scaled).scaleb(-18), row.event_count) == (expected, count)


def test_weighted_sum_levels_stay_the_default():
    # input = "level", unit = "hour" (today's meaning): 10 GB for 30 min then 20 GB for 30 min
    text = metric("weighted_sum", field="properties.value", window={"kind": "tumbling", "size": "1h"})
    row = only(bill(text, [event("2024-01-01 00:00:00", value=10), event("2024-01-01 00:30:00", value=20)]))
    assert row.value_scaled == 15 * 10**18


def test_weighted_sum_per_second():
    # 4 GB for the last 15 minutes of the hour: 3 600 GB-seconds
    text = metric("weighted_sum", field="properties.value", input="increment", unit="second",
                  window={"kind": "tumbling", "size": "1h"})
    assert only(bill(text, [event("2024-01-01 00:45:00", value=4)])).value_scaled == 3600 * 10**18


# -- recurring ---------------------------------------------------------------------------------

RECURRING_STORAGE = STORAGE + "recurring = true\n"


def test_recurring_weighted_sum_starts_from_the_carried_level():
    # Lago: a level of 10 set in March is still billed in August with no event there
    biller = bill(RECURRING_STORAGE, [event("2023-03-01 22:22:22", value=10)], until="2023-09-02 00:00:00")
    table = values(biller)
    for month in ("04", "05", "06", "07", "08"):
        assert lago_round(table["acme", "{}", at(f"2023-{month}-01 00:00:00")], 5) == "10.0"
    march = table["acme", "{}", at("2023-03-01 00:00:00")]    # held for 31 days less 22:22:22
    assert march == (Decimal(10 * (31 * 86_400 - 80_542)) / Decimal(31 * 86_400)).quantize(Decimal("1e-18"))
    assert biller.rows()["acme", "{}", at("2023-08-01 00:00:00")].event_count == 0
    # the period not yet over is not billed: nothing carried past the watermark
    assert at("2023-09-01 00:00:00") not in {key[2] for key in table}


def test_recurring_weighted_sum_adds_the_period_to_the_carried_level():
    # Lago: a cached level of 1000 plus August's increments = 1000.02218
    events = [event("2023-07-15 00:00:00", value=1000)] + [event(ts, value=v) for ts, v in AUGUST_2023]
    table = values(bill(RECURRING_STORAGE, events, until="2023-09-02 00:00:00"))
    assert lago_round(table["acme", "{}", at("2023-08-01 00:00:00")], 5) == "1000.02218"


def test_recurring_weighted_sum_per_group():
    # Lago: 10 carried in the group without a region; eu starts from 0 in August
    text = RECURRING_STORAGE.replace('window =', 'group_by = ["region"]\nwindow =')
    events = [event("2023-03-01 22:22:22", value=10), event("2023-08-01 00:00:00", value=2, region="eu"),
              event("2023-08-01 01:00:00", value=3, region="eu")]
    table = values(bill(text, events, until="2023-09-02 00:00:00"))
    august = at("2023-08-01 00:00:00")
    assert lago_round(table["acme", '{"region":"eu"}', august], 5) == "4.99597"
    assert lago_round(table["acme", '{"region":""}', august], 5) == "10.0"


def test_recurring_sum_carries_the_running_total_over_three_periods():
    # Lago: 2 × 2.5 three months earlier, then 4 × 12: 48, or 53 when recurring
    events = [event("2024-01-15 00:00:00", value="2.5"), event("2024-01-15 00:00:00", value="2.5"),
              *[event("2024-04-20 00:00:00", value=12) for _ in range(4)]]
    plain = values(bill(metric("sum", field="properties.value", window=MONTH), events,
                        until="2024-05-02 00:00:00"))
    running = bill(metric("sum", field="properties.value", window=MONTH, recurring=True), events,
                   until="2024-05-02 00:00:00")
    april = at("2024-04-01 00:00:00")
    assert plain["acme", "{}", april] == 48
    by_month = {key[2]: value for key, value in values(running).items()}
    assert by_month == {at("2024-01-01 00:00:00"): 5, at("2024-02-01 00:00:00"): 5,
                        at("2024-03-01 00:00:00"): 5, april: 53}
    counts = {key[2]: row.event_count for key, row in running.rows().items()}
    assert counts == {at("2024-01-01 00:00:00"): 2, at("2024-02-01 00:00:00"): 0,
                      at("2024-03-01 00:00:00"): 0, april: 4}


def test_a_late_event_corrects_the_carried_periods_after_it():
    # allowed lateness keeps January open; its late event changes February's carried total too
    store = AggregateWindowStore(CalendarWindows("month"), Sum(), allowed_lateness_ms=40 * DAY_MS,
                                 recurring=True)
    key = ("org", "acme", ())
    assert store.add(key, at("2024-01-10 00:00:00"), 5, watermark_before=0)
    first = store.emit(closing_ms=at("2024-03-01 00:00:00"), watermark_ms=at("2024-03-01 00:00:00"))
    assert store.add(key, at("2024-01-20 00:00:00"), 2, watermark_before=at("2024-03-01 00:00:00"))
    again = store.emit(closing_ms=at("2024-03-02 00:00:00"), watermark_ms=at("2024-03-02 00:00:00"))
    assert [(r.start_ms, r.result) for r in first] == [
        (at("2024-01-01 00:00:00"), 5), (at("2024-02-01 00:00:00"), 5)]
    assert [(r.start_ms, r.result) for r in again] == [
        (at("2024-01-01 00:00:00"), 7), (at("2024-02-01 00:00:00"), 7)]
    assert min(r.version for r in again) > max(r.version for r in first)  # the correction wins


def test_recurring_state_round_trips_and_refuses_a_resume_without_recurring():
    store = AggregateWindowStore(CalendarWindows("month"), Sum(), recurring=True)
    store.add(("org", "acme", ()), at("2024-01-10 00:00:00"), 5, watermark_before=0)
    store.emit(closing_ms=at("2024-02-01 00:00:00"), watermark_ms=at("2024-02-01 00:00:00"))
    snapshot = pickle.loads(pickle.dumps(store.snapshot()))
    assert snapshot.carried == {("org", "acme", ()): [5, 1, at("2024-02-01 00:00:00")]}
    resumed = AggregateWindowStore(CalendarWindows("month"), Sum(), recurring=True, resume=snapshot)
    assert [(r.start_ms, r.result, r.count) for r in resumed.emit(at("2024-03-01 00:00:00"),
                                                                  at("2024-03-01 00:00:00"))] == [
        (at("2024-02-01 00:00:00"), 5, 0)]
    with pytest.raises(ValueError, match="calendar:month:sum:0:recurring"):
        AggregateWindowStore(CalendarWindows("month"), Sum(), resume=snapshot)


def test_calendar_months_of_28_29_30_and_31_days():
    # one GB set on 2023-02-01 and held: a month bills 24 GB-hours per day it has
    text = metric("weighted_sum", field="properties.value", input="increment", window=MONTH,
                  recurring=True)
    biller = bill(text, [event("2023-02-01 00:00:00", value=1)], until="2024-05-01 00:00:01")
    rows = biller.rows()
    start = datetime(2023, 2, 1, tzinfo=UTC)
    expected = {}
    while start < datetime(2024, 5, 1, tzinfo=UTC):
        end = (start + timedelta(days=32)).replace(day=1)
        expected["acme", "{}", _ms(start)] = (_ms(end), (end - start).days * 24)
        start = end
    assert {k: (r.window_end_ms, r.value_scaled // 10**18) for k, r in rows.items()} == expected
    hours = {(EPOCH + timedelta(milliseconds=k[2])).strftime("%Y-%m"): v[1] for k, v in expected.items()}
    assert (hours["2023-02"], hours["2024-02"], hours["2024-04"], hours["2024-01"]) == (672, 696, 720, 744)


def _ms(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(milliseconds=1)


def test_calendar_days_are_utc_days():
    text = metric("count", window={"kind": "calendar", "unit": "day"})
    rows = bill(text, [event("2024-03-10 23:59:59"), event("2024-03-11 00:00:00")]).rows()
    assert sorted((r.window_start_ms, r.window_end_ms, r.event_count) for r in rows.values()) == [
        (at("2024-03-10 00:00:00"), at("2024-03-11 00:00:00"), 1),
        (at("2024-03-11 00:00:00"), at("2024-03-12 00:00:00"), 1)]


def test_a_crash_in_the_middle_of_a_period_bills_the_same():
    # the rows written before the crash stay in the table, the replay writes them again
    events = [event("2023-07-15 00:00:00", value=1000)] + [event(ts, value=v) for ts, v in AUGUST_2023]
    records = _records(events + [event("2023-09-02 00:00:00", code="tick")])
    straight = Biller(RECURRING_STORAGE)
    for record in records:
        straight.feed(record)
    straight.feed(None, at_end=True)

    crashed = Biller(RECURRING_STORAGE)
    for record in records[:4]:                  # July's level, then August 01:00 and 01:30
        crashed.feed(record)
    saved = crashed.checkpoint()
    for record in records[4:6]:                 # processed and written, then the process dies
        crashed.feed(record)
    crashed.restore(saved)
    for record in records[4:]:                  # the source resumes from the snapshot's offsets
        crashed.feed(record)
    crashed.feed(None, at_end=True)
    assert crashed.rows() == straight.rows()
    assert lago_round(values(crashed)["acme", "{}", at("2023-08-01 00:00:00")], 5) == "1000.02218"


# -- unique_count with add / remove ---------------------------------------------------------------

SEATS = metric("unique_count", code="seats", field="properties.value",
               operation_field="properties.operation_type", window=MONTH)


def seat(timestamp: str, value: str, operation: str | None = None) -> dict:
    properties = {"value": value} | ({"operation_type": operation} if operation else {})
    return event(timestamp, code="seats", **properties)


def test_unique_count_counts_values_whose_last_operation_is_add():
    # Lago's event store: values 1..5 added on five days, "2" removed after its add: 4
    events = [seat(f"2023-03-{16 + i} 00:00:00", str(i + 1)) for i in range(5)]
    events.insert(2, seat("2023-03-17 01:00:00", "2", "remove"))
    row = only(bill(SEATS, events))
    assert (row.value_scaled, row.event_count) == (4 * 10**18, 6)


def test_unique_count_last_operation_wins_and_ties_go_to_remove():
    events = [seat("2023-03-01 00:00:00", "ann", "add"), seat("2023-03-02 00:00:00", "ann", "remove"),
              seat("2023-03-03 00:00:00", "ann", "add"),                        # back: counted
              seat("2023-03-04 00:00:00", "bob"), seat("2023-03-04 00:00:00", "bob", "remove")]
    assert only(bill(SEATS, events)).value_scaled == 1 * 10**18


def test_recurring_unique_count_keeps_the_values_still_added():
    # Lago: a value added the month before and one added in the period: 2 (1 when not recurring);
    # a value added before and removed in the period: 0
    before = seat("2022-06-09 00:00:00", "a")
    added = [before, seat("2022-07-19 00:00:00", "b")]
    july = at("2022-07-01 00:00:00")
    plain = values(bill(SEATS, added, until="2022-08-02 00:00:00"))
    running = values(bill(SEATS + "recurring = true\n", added, until="2022-08-02 00:00:00"))
    assert (plain["acme", "{}", july], running["acme", "{}", july]) == (1, 2)
    removed = values(bill(SEATS + "recurring = true\n", [before, seat("2022-07-24 00:00:00", "a", "remove")],
                          until="2022-08-02 00:00:00"))
    assert removed["acme", "{}", july] == 0
    assert ("acme", "{}", at("2022-08-01 00:00:00")) not in removed      # nothing carried any more


def test_unique_count_without_operations_counts_every_value():
    events = [seat("2023-03-01 00:00:00", "a"), seat("2023-03-02 00:00:00", "a", "remove")]
    text = metric("unique_count", code="seats", field="properties.value", window=MONTH)
    assert only(bill(text, events)).value_scaled == 1 * 10**18


# -- latest -----------------------------------------------------------------------------------

def test_latest_takes_the_last_value():
    # Lago: four events of 18, then one of 14 a day later: 14 over 5 events
    events = [event("2024-03-10 00:00:00", value=18) for _ in range(4)] + [event("2024-03-11 00:00:00", value=14)]
    row = only(bill(metric("latest", field="properties.value", window=MONTH), events))
    assert (row.value_scaled, row.event_count) == (14 * 10**18, 5)


@pytest.mark.parametrize("negative, expected", [("zero", 0), ("keep", -5)])
def test_latest_negative_values(negative, expected):
    # Lago reports a negative latest value as 0
    text = metric("latest", field="properties.value", window=MONTH, negative=negative)
    assert only(bill(text, [event("2024-03-10 00:00:00", value=-5)])).value_scaled == expected * 10**18


# -- rounding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("function, precision, expected", [
    ("round", 2, "123.46"), ("ceil", 2, "123.46"), ("floor", 2, "123.45"),       # Lago's examples
    ("round", None, "123"), ("ceil", None, "124"), ("floor", None, "123"),
    ("round", -2, "100"), ("ceil", -2, "200"), ("floor", -2, "100"),
])
def test_rounding_of_123_456(function, precision, expected):
    rounding = {"function": function} | ({"precision": precision} if precision is not None else {})
    text = metric("sum", field="properties.value", window=MONTH, rounding=rounding)
    row = only(bill(text, [event("2024-03-10 00:00:00", value="123.456")]))
    assert Decimal(row.value_scaled).scaleb(-18) == Decimal(expected)


@pytest.mark.parametrize("value, expected", [("2.5", 3), ("-2.5", -3), ("-2.4", -2), ("-2.6", -3)])
def test_round_takes_ties_away_from_zero(value, expected):
    # Ruby's BigDecimal#round, which Lago uses: half away from zero
    text = metric("sum", field="properties.value", window=MONTH, rounding={"function": "round"})
    assert only(bill(text, [event("2024-03-10 00:00:00", value=value)])).value_scaled == expected * 10**18


def test_rounding_applies_after_the_period_average():
    # 0.0221774... ceil to 2 places: 0.03
    text = STORAGE + 'rounding = { function = "ceil", precision = 2 }\n'
    assert only(bill(text, [event(ts, value=v) for ts, v in AUGUST_2023])).value_scaled == 3 * 10**16


# -- what Lago does differently ------------------------------------------------------------------

def test_a_transaction_id_counts_once_whatever_its_timestamp():
    # Lago's ClickHouse store keys on (transaction_id, timestamp) and would count both (2)
    events = [event("2024-03-10 00:00:00", value=1), event("2024-03-12 00:00:00", value=1)]
    for item in events:
        item["transaction_id"] = "same"
    assert only(bill(metric("count", window=MONTH), events)).event_count == 1


# -- bad combinations stop the flow at start ------------------------------------------------------

@pytest.mark.parametrize("options, problem", [
    (dict(aggregation="sum", input="increment"), "input applies to weighted_sum only, not to sum"),
    (dict(aggregation="sum", unit="second"), "unit applies to weighted_sum only, not to sum"),
    (dict(aggregation="weighted_sum", input="delta"), "input must be one of 'level', 'increment'"),
    (dict(aggregation="weighted_sum", unit="day"), "unit must be one of 'hour', 'second', 'period_average'"),
    (dict(aggregation="max", recurring=True), "recurring applies to sum, unique_count, weighted_sum only"),
    (dict(aggregation="sum", recurring="yes"), "recurring must be true or false"),
    (dict(aggregation="sum", recurring=True, window={"kind": "sliding", "size": "1h", "slide": "1m"}),
     "recurring needs tumbling or calendar windows"),
    (dict(aggregation="sum", negative="zero"), "negative applies to latest only"),
    (dict(aggregation="latest", negative="abs"), "negative must be one of 'keep', 'zero'"),
    (dict(aggregation="sum", operation_field="properties.op"), "operation_field applies to unique_count only"),
    (dict(aggregation="unique_count", operation_field="op"), "operation_field must be \"properties.<path>\""),
    (dict(aggregation="sum", rounding={"function": "truncate"}), "rounding function must be one of"),
    (dict(aggregation="sum", rounding={"function": "round", "precision": 19}), "rounding precision must be"),
    (dict(aggregation="sum", rounding="ceil"), "rounding must be a table"),
    (dict(aggregation="sum", window={"kind": "calendar", "unit": "week"}), 'unit = "day" or "month"'),
    (dict(aggregation="sum", window={"kind": "calendar", "unit": "day", "size": "1d"}),
     "calendar windows take only a unit"),
])
def test_bad_combinations_name_the_line_and_the_problem(options, problem):
    aggregation = options.pop("aggregation")
    text = '[[metric]]\nname = "ok"\ncode = "x"\naggregation = "count"\n\n' + metric(aggregation, **options)
    with pytest.raises(CatalogError) as raised:
        load_catalog_text(text)
    assert "METRICS_FILE line 6 (metric 'm')" in str(raised.value)
    assert problem in str(raised.value)


# -- end to end: the real flow, Kafka to metric_aggregates FINAL ---------------------------------

LAGO_CATALOG = """
[[metric]]
name = "storage"
code = "storage"
aggregation = "weighted_sum"
field = "properties.value"
input = "increment"
unit = "period_average"
recurring = true
window = { kind = "calendar", unit = "month" }
rounding = { function = "round", precision = 5 }

[[metric]]
name = "seats"
code = "seats"
aggregation = "unique_count"
field = "properties.value"
operation_field = "properties.operation_type"
recurring = true
window = { kind = "calendar", unit = "month" }

[[metric]]
name = "gauge"
code = "gauge"
aggregation = "latest"
field = "properties.value"
negative = "zero"
window = { kind = "calendar", unit = "month" }
"""


def _lago_events() -> list[dict]:
    events = ([event("2023-07-15 00:00:00", value=1000)] + [event(ts, value=v) for ts, v in AUGUST_2023]
              + [seat("2023-07-10 00:00:00", "a"), seat("2023-08-10 00:00:00", "b"),
                 seat("2023-08-20 00:00:00", "a", "remove"), event("2023-08-25 00:00:00", code="gauge", value=-5)]
              + [event("2023-10-02 00:00:00", code="tick")])
    return sorted(events, key=lambda item: item["timestamp"])


def _expected_lago_table() -> dict:
    """Hand-computed: July holds 1000 for 17 of 31 days (548.38710 to 5 places), August is Lago's
    1000.02218, September carries 1000 with no event; seats a, then b in, a out, then b carried."""
    july, august, september = at("2023-07-01 00:00:00"), at("2023-08-01 00:00:00"), at("2023-09-01 00:00:00")
    october = at("2023-10-01 00:00:00")
    return {
        ("storage", july): (august, Decimal("548.38710"), 1),
        ("storage", august): (september, Decimal("1000.02218"), 7),
        ("storage", september): (october, Decimal("1000.00000"), 0),
        ("seats", july): (august, Decimal(1), 1),
        ("seats", august): (september, Decimal(1), 2),
        ("seats", september): (october, Decimal(1), 0),
        ("gauge", august): (september, Decimal(0), 1),       # -5 reported as 0
    }


def _produce(bootstrap: str, topic: str, records: list[tuple]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for _offset, _key, value, _headers in records:
        producer.produce(topic, value, partition=0)
    assert producer.flush(30) == 0


def _read_lago_table(url: str) -> dict:
    backend = connect(url)
    try:
        _, rows = backend.query(
            "SELECT metric, toUnixTimestamp64Milli(window_start), toUnixTimestamp64Milli(window_end), "
            "toString(value), event_count FROM metric_aggregates FINAL WHERE external_customer_id = 'acme'")
    finally:
        backend.close()
    return {(r[0], int(r[1])): (int(r[2]), Decimal(r[3]), int(r[4])) for r in rows}


def _lago_flow(kafka_broker, chdb_url, tmp_path) -> tuple[str, dict]:
    catalog_file = tmp_path / "metrics.toml"
    catalog_file.write_text(LAGO_CATALOG)
    topic = unique_topic("lago")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    env = flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), chdb_url,
                   METRICS_FILE=str(catalog_file), TALLYFLOW_SHARDS="2")
    return topic, env


def test_lago_metrics_end_to_end(kafka_broker, chdb_url, tmp_path):
    topic, env = _lago_flow(kafka_broker, chdb_url, tmp_path)
    _produce(kafka_broker.bootstrap, topic, _records(_lago_events()))
    run_flow(env)
    assert _read_lago_table(chdb_url) == _expected_lago_table()


def test_lago_metrics_resume_in_the_middle_of_august(kafka_broker, chdb_url, tmp_path):
    # the first run stops (snapshot) at 2023-08-01 01:30, the second resumes from the recovery store
    topic, env = _lago_flow(kafka_broker, chdb_url, tmp_path)
    records = _records(_lago_events())
    split = next(i for i, item in enumerate(_lago_events()) if item["timestamp"] > "2023-08-01 01:00:00")
    recovery = tmp_path / "recovery"
    init_recovery_store(recovery)
    _produce(kafka_broker.bootstrap, topic, records[:split])
    run_flow(env, recovery_dir=recovery, snapshot_s=1)
    july = {key: row for key, row in _expected_lago_table().items() if key[1] == at("2023-07-01 00:00:00")}
    assert {k: v for k, v in _read_lago_table(chdb_url).items() if k in july} == july
    backend = connect(chdb_url)
    try:  # what the second run writes alone: a resume rewrites nothing it had finished
        backend.command("TRUNCATE TABLE metric_aggregates")
    finally:
        backend.close()
    _produce(kafka_broker.bootstrap, topic, records[split:])
    run_flow(env, recovery_dir=recovery, snapshot_s=1)
    later = {key: row for key, row in _expected_lago_table().items() if key not in july}
    assert _read_lago_table(chdb_url) == later     # August still starts from July's carried 1000


# -- property: any batching, any crash point, the same bill as a plain recomputation ---------------

PROPERTY_CATALOG = """
[[metric]]
name = "total"
code = "usage"
aggregation = "sum"
field = "properties.value"
recurring = true
window = { kind = "calendar", unit = "month" }

[[metric]]
name = "storage"
code = "usage"
aggregation = "weighted_sum"
field = "properties.value"
input = "increment"
unit = "period_average"
recurring = true
window = { kind = "calendar", unit = "month" }

[[metric]]
name = "seats"
code = "usage"
aggregation = "unique_count"
field = "properties.seat"
operation_field = "properties.operation_type"
recurring = true
window = { kind = "calendar", unit = "month" }
"""
EXAMPLES = int(os.environ.get("LAGO_EXAMPLES", "150"))
SPAN_S = 200 * 86_400  # 2023-11-01 to mid-May 2024: empty months, February of a leap year


def _month_bounds(moment: datetime) -> tuple[datetime, datetime]:
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return start, (start + timedelta(days=32)).replace(day=1)


def recompute_bill(events: list[tuple[int, str, Decimal, str, str | None]], watermark: datetime) -> dict:
    """Independent oracle: per customer and month, from every event so far, with Decimal and datetime.

    A month is billed when it has events, or when it ended by the watermark and what is carried into
    it still bills something (a non-zero total or level, a seat still added).
    """
    first = datetime(2023, 11, 1, tzinfo=UTC)
    table = {}
    for customer in sorted({e[1] for e in events}):
        mine = [e for e in events if e[1] == customer]
        start, end = _month_bounds(first + timedelta(seconds=mine[0][0]))
        while start < watermark or any(first + timedelta(seconds=e[0]) >= start for e in mine):
            table.update(_month_rows(customer, mine, first, start, end, watermark))
            start, end = end, (end + timedelta(days=32)).replace(day=1)
    return table


def _month_rows(customer, mine, first, start, end, watermark) -> dict:
    before = [(first + timedelta(seconds=s), value, seat, op) for s, _c, value, seat, op in mine
              if first + timedelta(seconds=s) < end]
    inside = sum(1 for at_, *_ in before if at_ >= start)
    total = sum(value for _at, value, _s, _o in before)
    seconds = Decimal((end - start) // timedelta(seconds=1))
    held = sum(value * Decimal((end - max(at_, start)) // timedelta(seconds=1)) for at_, value, _s, _o in before)
    storage = (held / seconds).quantize(Decimal("1e-18"), context=Context(prec=80))
    last = {}
    for at_, _value, seat_, op in sorted(before, key=lambda b: (b[0], b[3] == "remove")):
        last[seat_] = op or "add"
    seats = sum(1 for op in last.values() if op == "add")
    level_at_start = sum(value for at_, value, _s, _o in before if at_ < start)
    rows = {}
    key_start = (start - EPOCH) // timedelta(milliseconds=1)
    for name, value, carried in (("total", total, level_at_start), ("storage", storage, level_at_start),
                                 ("seats", Decimal(seats), seats)):
        if inside or (end <= watermark and carried):
            rows[name, customer, key_start] = (value, inside)
    return rows


@st.composite
def usage_streams(draw):
    count = draw(st.integers(1, 10))
    events = list(
        (draw(st.integers(0, SPAN_S)), draw(st.sampled_from("ab")),
         Decimal(draw(st.integers(-300, 300))) / 100, draw(st.sampled_from(("s1", "s2", "s3"))),
         draw(st.sampled_from((None, "add", "remove"))))
        for _ in range(count))
    events.sort(key=lambda e: e[:4] + (e[4] or "",))
    tick = draw(st.integers(events[-1][0], SPAN_S + 40 * 86_400))
    cuts = sorted(draw(st.lists(st.integers(0, count + 1), max_size=4)))
    crash = draw(st.none() | st.tuples(st.integers(0, count), st.integers(0, 3)))
    return events, tick, cuts, crash


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usage_streams())
def test_any_batching_and_crash_bills_like_a_recomputation(stream):
    events, tick, cuts, crash = stream
    first = datetime(2023, 11, 1, tzinfo=UTC)
    text = lambda s: (first + timedelta(seconds=s)).strftime("%Y-%m-%d %H:%M:%S")  # noqa: E731
    items = [event(text(s), code="usage", customer=c, value=str(v), seat=seat_,
                   **({"operation_type": op} if op else {})) for s, c, v, seat_, op in events]
    records = _records(items + [event(text(tick), code="tick")])
    biller = Biller(PROPERTY_CATALOG)
    bounds = [0, *cuts, len(records)]
    batches = [records[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    saved = None
    for number, batch in enumerate(batches):
        if crash and number == min(crash[0], len(batches) - 1):
            saved, replay_from = biller.checkpoint(), number
        biller.feed_batch(batch)
        if saved and number == min(replay_from + crash[1], len(batches) - 1):
            biller.restore(saved)                         # the rows written meanwhile stay in the table
            for again in batches[replay_from:number + 1]:
                biller.feed_batch(again)
            saved = None
    biller.feed(None, at_end=True)
    actual = {(row.metric, key[0], key[2]): (Decimal(row.value_scaled).scaleb(-18), row.event_count)
              for key, row in biller.table.items()}
    assert actual == recompute_bill(events, first + timedelta(seconds=tick))
