"""The schema check at start-up: one catalog query, DDL only for what is missing, once per process.

The oracle is the table definitions themselves (``sinks.schema.TABLES``) read back from the
engine's catalog, and the statements the check sends, recorded.
"""

from __future__ import annotations

import logging
from typing import Iterator

import pytest

import sinks.clickhouse_sink as clickhouse_sink
from sinks.clickhouse_backend import ClickHouseBackend, connect
from sinks.clickhouse_sink import ClickHouseSink, Enrichment
from sinks.schema import DDL, TABLES, TOTAL_TYPE, USAGE_AGGREGATES, enrichment_migrations, ensure_schema, existing_columns

pytestmark = pytest.mark.integration


class Recording:
    """A backend that records the statements it is sent, and passes everything on."""

    def __init__(self, backend: ClickHouseBackend) -> None:
        self.backend, self.commands = backend, []

    def command(self, sql: str) -> None:
        self.commands.append(sql)
        self.backend.command(sql)

    def text_rows(self, sql: str):
        return self.backend.text_rows(sql)


@pytest.fixture
def backend(clickhouse_url: str) -> Iterator[ClickHouseBackend]:
    opened = connect(clickhouse_url)
    try:
        yield opened
    finally:
        opened.close()


def defined_columns(fields: tuple[str, ...] = ()) -> dict[tuple[str, str], str]:
    columns = {(table.name, name): kind for table in TABLES for name, kind in table.columns}
    return columns | {(USAGE_AGGREGATES, field): "String" for field in fields}


def test_a_fresh_database_gets_every_table_and_a_ready_one_no_statement(backend):
    first = Recording(backend)
    ensure_schema(first, ("plan",))
    assert first.commands == list(DDL + enrichment_migrations(("plan",)))
    assert existing_columns(backend) == defined_columns(("plan",))

    again = Recording(backend)
    ensure_schema(again, ("plan",))
    assert again.commands == []

    wider = Recording(backend)
    ensure_schema(wider, ("plan", "region"))
    assert wider.commands == list(enrichment_migrations(("region",)))
    assert existing_columns(backend) == defined_columns(("plan", "region"))


def test_a_missing_table_alone_is_created(backend):
    ensure_schema(backend)
    backend.command("DROP TABLE usage_late_events")
    recording = Recording(backend)
    ensure_schema(recording)
    assert recording.commands == [statement for statement in DDL if "usage_late_events (" in statement]
    assert existing_columns(backend) == defined_columns()


def test_narrow_sum_columns_of_an_existing_table_are_named(backend, caplog):
    narrow = DDL[0].replace(TOTAL_TYPE, "Decimal(38, 18)")
    backend.command(narrow)
    with caplog.at_level(logging.WARNING, logger="sinks.schema"):
        ensure_schema(backend)
    [record] = [r for r in caplog.records if "narrower" in r.getMessage()]
    assert record.columns == ["usage_aggregates.total_value (Decimal(38, 18))"]


def test_text_rows_are_the_rows_query_returns(backend):
    sql = ("SELECT arrayJoin(['plain', 'tab\\there', 'new\\nline', 'quote\\'s \"q\" \\\\', 'café ☃', '']) AS s, "
           "toString(number) AS n FROM numbers(2) ORDER BY n, s")
    assert backend.text_rows(sql) == backend.query(sql)[1]
    assert len(backend.text_rows(sql)) == 12
    assert backend.text_rows("SELECT 'x' WHERE 0") == []


def test_every_partition_of_every_output_checks_the_schema_once_per_process(monkeypatch):
    checks = []
    monkeypatch.setattr(clickhouse_sink, "ensure_schema", lambda backend, fields: checks.append(fields))
    monkeypatch.setattr(clickhouse_sink, "_SCHEMA_READY", set())
    plain = ClickHouseSink("discard://")
    enriched = ClickHouseSink("discard://", enrichment=Enrichment("redis://127.0.0.1:1/0", ("plan",)))
    parts = [sink.build_part("out", str(i), None) for sink in (plain, plain, enriched) for i in range(4)]
    for part in parts:
        part.close()
    assert checks == [(), ("plan",)]
