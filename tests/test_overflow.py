"""Totals beyond Decimal(38, 18): sum columns are Decimal(76, 18), and ``tallyflow migrate``
widens tables created with the old schema, keeping every value exactly.

Expected values are worked out by hand here (integers), never by the flow's own code.
"""

from __future__ import annotations

import io
import json
import re
from decimal import Decimal

import pytest

from dataflows.settings import Settings
from deploy import cli
from deploy.broker import ensure_topic
from deploy.generator import GeneratedRecord, produce
from deploy.runner import run_flow
from recovery.reconcile import run_reconcile
from sinks.clickhouse_backend import connect
from sinks.schema import TABLES
from support.flow import flow_env
from support.kafka import unique_topic

OLD_SUM_TYPE = "Decimal(38, 18)"
NEW_SUM_TYPE = "Decimal(76, 18)"
LARGEST = "99999999999999999999"  # the largest whole value one event may carry
HOUR_MS = 3_600_000
JAN_1_2026_MS = 1_767_225_600_000


def old_schema_ddl() -> list[str]:
    """The tables as the previous release created them: every sum column Decimal(38, 18)."""
    statements = []
    for table in TABLES:
        if table.name == "usage_rejected_rows":  # new with Decimal(76, 18)
            continue
        columns = ", ".join(f"{name} {OLD_SUM_TYPE if kind == NEW_SUM_TYPE else kind}"
                            for name, kind in table.columns)
        engine = f"ReplacingMergeTree({', '.join(table.engine_args)})"
        statements.append(f"CREATE TABLE {table.name} ({columns}) ENGINE = {engine} "
                          f"ORDER BY ({', '.join(table.order_by)})")
    return statements


OLD_ROWS = {  # three versions of one key and a second key, the extreme values of Decimal(38, 18)
    "usage_aggregates": [("a", 1, "99999999999999999999.999999999999999999"),
                         ("a", 2, "-99999999999999999999.999999999999999999"),
                         ("a", 3, "0.000000000000000001"), ("b", 1, "12345.678901234567890123")],
    "usage_aggregates_hourly": [("a", 1, "-0.000000000000000001"), ("b", 4, "7")],
    "usage_aggregates_daily": [("a", 5, "99999999999999999999.999999999999999999")],
}


def insert_old_rows(backend) -> None:
    for table, rows in OLD_ROWS.items():
        for customer, version, total in rows:
            backend.command(
                f"INSERT INTO {table} (organization_id, external_customer_id, code, window_start, "
                f"window_end, event_count, total_value, version, is_deleted) VALUES ('o', '{customer}', "
                f"'x', '2026-01-01 00:00:00.000', '2026-01-01 00:01:00.000', {version}, '{total}', "
                f"{version}, 0)")
    backend.command(
        "INSERT INTO metric_aggregates (metric, organization_id, external_customer_id, group_key, "
        "window_start, window_end, value, event_count, version, is_deleted) VALUES ('m', 'o', 'c', "
        "'{}', '2026-01-01 00:00:00.000', '2026-01-01 01:00:00.000', "
        "'-99999999999999999999.999999999999999999', 2, 1, 0)")


def every_row(backend) -> dict[str, list[tuple]]:
    """All rows of every table, every version (not FINAL), sums as exact text."""
    out = {}
    for table in TABLES:
        if table.name == "usage_rejected_rows":
            continue
        _, rows = backend.query(f"SELECT * FROM {table.name} ORDER BY tuple(*)")
        out[table.name] = [tuple(str(v) if isinstance(v, Decimal) else v for v in row) for row in rows]
    return out


def column_types(backend) -> dict[tuple[str, str], str]:
    _, rows = backend.query("SELECT table, name, type FROM system.columns "
                            "WHERE database = currentDatabase()")
    return {(table, name): kind for table, name, kind in rows}


def run_migrate(capsys, url: str) -> tuple[int, list[str]]:
    status = cli.main(["migrate", "--url", url, "--enrich-fields", "off"])
    return status, capsys.readouterr().out.splitlines()


def test_migrate_widens_old_sum_columns_keeping_every_value(chdb_url, capsys):
    backend = connect(chdb_url)
    try:
        for statement in old_schema_ddl():
            backend.command(statement)
        insert_old_rows(backend)
        before = every_row(backend)
    finally:
        backend.close()
    assert sum(len(rows) for rows in before.values()) == 8

    status, lines = run_migrate(capsys, chdb_url)
    assert status == 0, lines
    widened = [line for line in lines if "widened" in line]
    assert sorted(line.split(":")[0] for line in widened) == [
        "metric_aggregates", "usage_aggregates", "usage_aggregates_daily", "usage_aggregates_hourly"]
    assert all(f"from {OLD_SUM_TYPE}" in line for line in widened)

    backend = connect(chdb_url)
    try:
        types = column_types(backend)
        assert {types[(t, c)] for t in OLD_ROWS for c in ["total_value"]} == {NEW_SUM_TYPE}
        assert types[("metric_aggregates", "value")] == NEW_SUM_TYPE
        assert types[("usage_late_events", "value")] == OLD_SUM_TYPE  # one event's value: unchanged
        after = every_row(backend)
        assert after == before
        _, final = backend.query("SELECT external_customer_id, toString(total_value) "
                                 "FROM usage_aggregates FINAL ORDER BY 1")
        assert final == [("a", "0.000000000000000001"), ("b", "12345.678901234567890123")]
    finally:
        backend.close()

    status, lines = run_migrate(capsys, chdb_url)  # idempotent: nothing left to widen
    assert status == 0 and not any("widened" in line for line in lines), lines
    backend = connect(chdb_url)
    try:
        backend.command(
            "INSERT INTO usage_aggregates (organization_id, external_customer_id, code, window_start, "
            "window_end, event_count, total_value, version, is_deleted) VALUES ('o', 'a', 'x', "
            "'2026-01-01 00:00:00.000', '2026-01-01 00:01:00.000', 9, "
            "'9999999999999999999999999999999999999999999999999999999999.999999999999999999', 9, 0)")
        _, [(total,)] = backend.query("SELECT total_value FROM usage_aggregates FINAL "
                                      "WHERE external_customer_id = 'a'")
    finally:
        backend.close()
    assert total == Decimal("9" * 58 + "." + "9" * 18)


def test_migrate_reports_a_sum_column_it_cannot_widen_exactly(chdb_url, capsys):
    backend = connect(chdb_url)
    try:
        backend.command("CREATE TABLE metric_aggregates (metric String, organization_id String, "
                        "external_customer_id String, group_key String, window_start DateTime64(3, 'UTC'), "
                        "window_end DateTime64(3, 'UTC'), value Decimal(38, 10), event_count UInt64, "
                        "version UInt64, is_deleted UInt8) ENGINE = ReplacingMergeTree(version, is_deleted) "
                        "ORDER BY (metric, organization_id)")
    finally:
        backend.close()
    status, lines = run_migrate(capsys, chdb_url)
    assert status == 1
    [line] = [line for line in lines if line.startswith("metric_aggregates:")]
    assert f"value is Decimal(38, 10), expected {NEW_SUM_TYPE}" in line and "widened" not in line


# ----------------------------------------------------------------------------- through the flow

CATALOG = """
[[metric]]
name = "big_sum"
code = "storage_gb"
aggregation = "sum"
window = { kind = "tumbling", size = "1h" }

[[metric]]
name = "big_gb_hours"
code = "storage_gb"
aggregation = "weighted_sum"
window = { kind = "tumbling", size = "1d" }
"""


def event(txn: str, timestamp_ms: int, value: str, customer: str = "c") -> GeneratedRecord:
    body = {"transaction_id": txn, "organization_id": "o", "external_customer_id": customer,
            "code": "storage_gb", "timestamp": timestamp_ms, "value": value}
    return GeneratedRecord("event", 0, txn.encode(), json.dumps(body).encode())


def test_two_of_the_largest_values_in_one_window_are_counted_exactly(kafka_broker, chdb_url, tmp_path):
    catalog = tmp_path / "metrics.toml"
    catalog.write_text(CATALOG)
    topic = unique_topic("overflow")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    start = JAN_1_2026_MS + 5 * HOUR_MS  # 05:00, the start of a minute, an hour and a 1h window
    produce(kafka_broker.bootstrap, topic, [
        event("t1", start, LARGEST),
        event("t2", start + HOUR_MS // 2, LARGEST),  # same hour; the level held 30 min each
        event("t3", start + HOUR_MS // 2, "-" + LARGEST, customer="d"),
        event("t4", start + HOUR_MS // 2 + 1, "-" + LARGEST, customer="d"),
    ])
    run_flow(flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), chdb_url,
                      WINDOW_SIZE="1h", ROLLUPS="hour,day", METRICS_FILE=str(catalog)))

    twice = Decimal(2 * int(LARGEST))  # 199999999999999999998: 21 digits, over Decimal(38, 18)
    backend = connect(chdb_url)
    try:
        usage = {}
        for table in ("usage_aggregates", "usage_aggregates_hourly", "usage_aggregates_daily"):
            _, rows = backend.query(f"SELECT external_customer_id, event_count, total_value "
                                    f"FROM {table} FINAL ORDER BY 1")
            usage[table] = rows
        _, metrics = backend.query("SELECT metric, external_customer_id, event_count, value "
                                   "FROM metric_aggregates FINAL ORDER BY 1, 2")
    finally:
        backend.close()
    for table, rows in usage.items():
        assert rows == [("c", 2, twice), ("d", 2, -twice)], table
    # weighted_sum = Σ level × hours held until the next event or the window's end (00:00 next
    # day): c holds L for 0.5 h then L for 18.5 h = 19 L; d holds -L for 1 ms then -L for the
    # rest of 18.5 h = -18.5 L. Both are far beyond Decimal(38, 18).
    largest = Decimal(LARGEST)
    assert metrics == [
        ("big_gb_hours", "c", 2, 19 * largest),
        ("big_gb_hours", "d", 2, Decimal("-18.5") * largest),
        ("big_sum", "c", 2, twice),
        ("big_sum", "d", 2, -twice),
    ]


# ----------------------------------------------------------------------------- rows ClickHouse refuses


def rejected_rows(url: str) -> list[tuple]:
    backend = connect(url)
    try:
        _, rows = backend.query("SELECT source_table, row_key, reason, row_json "
                                "FROM usage_rejected_rows FINAL ORDER BY 1, 2")
    finally:
        backend.close()
    return [(table, json.loads(key), reason, json.loads(row)) for table, key, reason, row in rows]


def test_a_table_not_yet_migrated_refuses_only_the_overflowing_row(kafka_broker, clickhouse_url):
    """Tables of the old schema (sums in Decimal(38, 18)) and the overflow pair: the flow does not
    stop; the refused rows are kept, exactly, and every other row is written."""
    backend = connect(clickhouse_url)
    try:
        for statement in old_schema_ddl():
            backend.command(statement)
    finally:
        backend.close()
    topic = unique_topic("unmigrated")
    ensure_topic(kafka_broker.bootstrap, topic, 1)
    start = JAN_1_2026_MS
    normal = [event(f"n{i}", start + i * 1_000, "1.25", customer=f"n{i % 3}") for i in range(30)]
    produce(kafka_broker.bootstrap, topic,
            normal + [event("big1", start + 5_000, LARGEST), event("big2", start + 6_000, LARGEST)])
    env = flow_env(kafka_broker.bootstrap, topic, unique_topic("dlq"), clickhouse_url, ROLLUPS="day")
    run_flow(env)

    backend = connect(clickhouse_url)
    try:
        _, rows = backend.query("SELECT external_customer_id, event_count, total_value "
                                "FROM usage_aggregates FINAL ORDER BY 1")
    finally:
        backend.close()
    assert rows == [("n0", 10, Decimal("12.5")), ("n1", 10, Decimal("12.5")), ("n2", 10, Decimal("12.5"))]
    twice = f"{2 * int(LARGEST)}.{'0' * 18}"
    refused = rejected_rows(clickhouse_url)
    assert [(table, key[:3], reason, row["event_count"], row["total_scaled"])
            for table, key, reason, row in refused] == [
        ("usage_aggregates", ["o", "c", "storage_gb"], "clickhouse_refused", 2, twice),
        ("usage_aggregates_daily", ["o", "c", "storage_gb"], "clickhouse_refused", 2, twice),
    ]
    report = io.StringIO()
    assert run_reconcile(Settings.from_env(env), out=report) == 1
    assert "holds 1 usage_aggregates row(s) ClickHouse refused" in report.getvalue()
    assert "  usage_aggregates: 1 differ" in report.getvalue()
    assert "  usage_aggregates_daily: 1 differ" in report.getvalue()


def test_a_sum_beyond_decimal_76_is_kept_out_and_other_errors_still_stop(chdb_url):
    from state.records import WindowRow
    from sinks.clickhouse_backend import ClickHouseError
    from sinks.clickhouse_sink import ClickHousePartition
    from sinks.schema import ensure_schema

    backend = connect(chdb_url)
    try:
        ensure_schema(backend)
        part = ClickHousePartition(backend, max_rows=1_000, max_age_s=60)
        beyond = 10**76  # the first scaled total Decimal(76, 18) cannot hold
        part.write_batch([WindowRow("o", "big", "x", 0, 60_000, 1, beyond, 1),
                          WindowRow("o", "ok", "x", 0, 60_000, 1, beyond - 1, 1)])
        part.flush()
        _, rows = backend.query("SELECT external_customer_id, total_value FROM usage_aggregates FINAL")
        assert rows == [("ok", Decimal("9" * 58 + "." + "9" * 18))]
        [(table, key, reason, row)] = rejected_rows(chdb_url)
        assert (table, key[1], reason) == ("usage_aggregates", "big", "total_out_of_range")
        assert row["total_scaled"] == f"1{'0' * 58}.{'0' * 18}"

        backend.command("DROP TABLE usage_aggregates")  # a setup problem, not a row: it stops
        part.write_batch([WindowRow("o", "ok", "x", 60_000, 120_000, 1, 1, 1)])
        with pytest.raises(ClickHouseError) as refused:
            part.flush()
        assert refused.value.code == 60
    finally:
        backend.close()


class RecordingCluster:
    """A stand-in for a ClickHouse cluster's catalog: answers the queries ``migrate`` makes and
    applies its ALTERs, recording every statement (no cluster runs in CI)."""

    ALTER = re.compile(r"ALTER TABLE `(\w+)`\.`(\w+)` ON CLUSTER '(\w+)' MODIFY COLUMN `(\w+)` "
                       r"(Decimal\(\d+, \d+\)) SETTINGS mutations_sync = 2$")

    def __init__(self, database: str, tables: dict[str, dict[str, str]]) -> None:
        self.database, self.tables, self.statements = database, tables, []

    def query(self, sql: str):
        if sql == "SELECT currentDatabase()":
            return ["db"], [(self.database,)]
        table = re.search(r"AND table = '(\w+)'", sql).group(1)
        return ["name", "type"], list(self.tables.get(table, {}).items())

    def command(self, sql: str) -> None:
        self.statements.append(sql)
        if sql.startswith("ALTER TABLE") and "MODIFY COLUMN" in sql:
            database, table, _cluster, column, kind = self.ALTER.match(sql).groups()
            assert database == self.database
            self.tables[table][column] = kind


def test_migrate_on_a_cluster_widens_local_tables_before_their_distributed_ones():
    from sinks.cluster_schema import LOCAL_SUFFIX, migrate

    old = {name: dict((c, OLD_SUM_TYPE if k == NEW_SUM_TYPE else k) for c, k in table.columns)
           for table in TABLES if table.name != "usage_rejected_rows" for name in
           (table.name, table.name + LOCAL_SUFFIX)}
    cluster = RecordingCluster("billing", old)
    outcomes = migrate(cluster, "metering")
    alters = [s for s in cluster.statements if "MODIFY COLUMN" in s]
    assert [RecordingCluster.ALTER.match(s).group(2, 4) for s in alters] == [
        ("usage_aggregates_local", "total_value"), ("usage_aggregates", "total_value"),
        ("usage_aggregates_hourly_local", "total_value"), ("usage_aggregates_hourly", "total_value"),
        ("usage_aggregates_daily_local", "total_value"), ("usage_aggregates_daily", "total_value"),
        ("metric_aggregates_local", "value"), ("metric_aggregates", "value")]
    assert all(f"ON CLUSTER 'metering' MODIFY COLUMN" in s and NEW_SUM_TYPE in s for s in alters)
    widened = {o.table: o.widened for o in outcomes if o.widened}
    assert widened["metric_aggregates_local"] == (f"value from {OLD_SUM_TYPE}",)
    assert not any(o.drift for o in outcomes if o.existed)

    cluster.statements.clear()
    assert not any(o.widened for o in migrate(cluster, "metering"))  # idempotent
    assert not any("MODIFY COLUMN" in s for s in cluster.statements)


def test_a_sum_beyond_decimal_76_in_a_row_block_is_kept_out_the_rest_written(chdb_url):
    """A window's first rows reach the sink as one ``WindowRowBlock``; a sum its column cannot
    hold sends the block the way of single rows: that row to usage_rejected_rows, the rest in."""
    from state.records import WindowRowBlock
    from sinks.clickhouse_sink import ClickHousePartition
    from sinks.schema import ensure_schema

    backend = connect(chdb_url)
    try:
        ensure_schema(backend)
        part = ClickHousePartition(backend, max_rows=1_000, max_age_s=60)
        beyond = 10**76
        part.write_batch([WindowRowBlock("hour", 0, 3_600_000, 9, [("o", "big", "x"), ("o", "ok", "x")],
                                         (1, 2), (beyond, 5 * 10**18))])
        part.flush()
        _, rows = backend.query("SELECT external_customer_id, event_count, total_value, version "
                                "FROM usage_aggregates_hourly FINAL")
        assert rows == [("ok", 2, Decimal("5.000000000000000000"), 9)]
        [(table, key, reason, _row)] = rejected_rows(chdb_url)
        assert (table, key[1], reason) == ("usage_aggregates_hourly", "big", "total_out_of_range")
    finally:
        backend.close()
