"""ClickHouse tables of the usage flow, defined once and created idempotently at start.

Aggregate tables are ReplacingMergeTree keyed by their window: a replayed or
corrected row with a higher (or equal) version replaces the old one, and a row
with ``is_deleted = 1`` (a session merged into another) disappears, so
``SELECT … FINAL`` gives exactly one live row per key. ``usage_late_events`` is
keyed by the source position, so a replay rewrites the same rows.

One event's value fits ``Decimal(38, 18)`` (validation refuses more); every column that
holds a sum of values is ``Decimal(76, 18)`` (``TOTAL_TYPE``): 10**38 events of the largest
value would be needed to overflow it. ``TOTAL_COLUMNS`` names them, for ``tallyflow migrate``.

    >>> [t.name for t in TABLES]
    ['usage_aggregates', 'usage_aggregates_hourly', 'usage_aggregates_daily', 'metric_aggregates', 'usage_late_events', 'usage_rejected_rows']
    >>> "ReplacingMergeTree(version, is_deleted)" in create_statement(TABLES[0])
    True
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Table:
    """A table as data, so single-node and cluster DDL are generated from one definition."""

    name: str
    columns: tuple[tuple[str, str], ...]
    order_by: tuple[str, ...]
    version: str = ""
    is_deleted: str = ""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.columns)

    @property
    def engine_args(self) -> tuple[str, ...]:
        return tuple(arg for arg in (self.version, self.is_deleted) if arg)


VALUE_TYPE = "Decimal(38, 18)"
"""One event's value (``operators.validation`` refuses values that do not fit)."""
TOTAL_TYPE = "Decimal(76, 18)"
"""A sum of values: a window total, a rollup, a catalog metric (sum, weighted sum…)."""

USAGE_AGGREGATES = "usage_aggregates"
USAGE_AGGREGATES_HOURLY = "usage_aggregates_hourly"
USAGE_AGGREGATES_DAILY = "usage_aggregates_daily"
METRIC_AGGREGATES = "metric_aggregates"
USAGE_LATE_EVENTS = "usage_late_events"
USAGE_REJECTED_ROWS = "usage_rejected_rows"

ROLLUP_TABLES = {"": USAGE_AGGREGATES, "hour": USAGE_AGGREGATES_HOURLY, "day": USAGE_AGGREGATES_DAILY}
"""Where a ``WindowRow`` goes, by its grain."""

_USAGE_COLUMNS = (
    ("organization_id", "String"),
    ("external_customer_id", "String"),
    ("code", "String"),
    ("window_start", "DateTime64(3, 'UTC')"),
    ("window_end", "DateTime64(3, 'UTC')"),
    ("event_count", "UInt64"),
    ("total_value", TOTAL_TYPE),
    ("version", "UInt64"),
    ("is_deleted", "UInt8"),
)
_USAGE_KEY = ("organization_id", "external_customer_id", "code", "window_start")


def _usage_table(name: str) -> Table:
    return Table(name, _USAGE_COLUMNS, _USAGE_KEY, "version", "is_deleted")


TABLES = (
    _usage_table(USAGE_AGGREGATES),
    _usage_table(USAGE_AGGREGATES_HOURLY),
    _usage_table(USAGE_AGGREGATES_DAILY),
    Table(
        METRIC_AGGREGATES,
        (
            ("metric", "LowCardinality(String)"),
            ("organization_id", "String"),
            ("external_customer_id", "String"),
            ("group_key", "String"),
            ("window_start", "DateTime64(3, 'UTC')"),
            ("window_end", "DateTime64(3, 'UTC')"),
            ("value", TOTAL_TYPE),
            ("event_count", "UInt64"),
            ("version", "UInt64"),
            ("is_deleted", "UInt8"),
        ),
        ("metric", "organization_id", "external_customer_id", "group_key", "window_start"),
        "version",
        "is_deleted",
    ),
    Table(
        USAGE_LATE_EVENTS,
        (
            ("organization_id", "String"),
            ("external_customer_id", "String"),
            ("code", "String"),
            ("transaction_id", "String"),
            ("event_time", "DateTime64(3, 'UTC')"),
            ("value", VALUE_TYPE),
            ("reason", "LowCardinality(String)"),
            ("watermark", "DateTime64(3, 'UTC')"),
            ("source_topic", "String"),
            ("source_partition", "UInt32"),
            ("source_offset", "UInt64"),
            ("raw", "String"),
        ),
        ("source_topic", "source_partition", "source_offset", "reason"),
    ),
    Table(  # rows the engine cannot take (sinks.rejected): kept here, never lost, never looping
        USAGE_REJECTED_ROWS,
        (
            ("source_table", "LowCardinality(String)"),
            ("row_key", "String"),  # JSON array of the row's key in source_table
            ("reason", "LowCardinality(String)"),  # total_out_of_range | clickhouse_refused
            ("detail", "String"),
            ("row_json", "String"),  # the whole row, decimals as exact text
            ("version", "UInt64"),
        ),
        ("source_table", "row_key"),
        "version",
    ),
)
TABLES_BY_NAME = {table.name: table for table in TABLES}

TOTAL_COLUMNS = tuple((table.name, name) for table in TABLES for name, kind in table.columns
                      if kind == TOTAL_TYPE)
"""(table, column) of every sum column; tables created before it was ``TOTAL_TYPE`` hold
``VALUE_TYPE`` there until ``tallyflow migrate`` widens them (``sinks.cluster_schema``)::

    >>> TOTAL_COLUMNS[:2], TOTAL_COLUMNS[-1]
    ((('usage_aggregates', 'total_value'), ('usage_aggregates_hourly', 'total_value')), ('metric_aggregates', 'value'))
"""

USAGE_AGGREGATES_COLUMNS = TABLES_BY_NAME[USAGE_AGGREGATES].column_names
METRIC_AGGREGATES_COLUMNS = TABLES_BY_NAME[METRIC_AGGREGATES].column_names
USAGE_LATE_EVENTS_COLUMNS = TABLES_BY_NAME[USAGE_LATE_EVENTS].column_names
USAGE_REJECTED_ROWS_COLUMNS = TABLES_BY_NAME[USAGE_REJECTED_ROWS].column_names


def create_statement(table: Table) -> str:
    """Single-node ``CREATE TABLE IF NOT EXISTS`` for ``table``."""
    columns = ",\n    ".join(f"{name} {kind}" for name, kind in table.columns)
    return (
        f"CREATE TABLE IF NOT EXISTS {table.name} (\n    {columns}\n)\n"
        f"ENGINE = ReplacingMergeTree({', '.join(table.engine_args)})\n"
        f"ORDER BY ({', '.join(table.order_by)})"
    )


DDL = tuple(create_statement(table) for table in TABLES)


def enrichment_migrations(fields: tuple[str, ...]) -> tuple[str, ...]:
    """Add a ``String`` column per enrichment field to ``usage_aggregates`` (idempotent).

    >>> enrichment_migrations(("plan",))
    ("ALTER TABLE usage_aggregates ADD COLUMN IF NOT EXISTS plan String DEFAULT ''",)
    """
    return tuple(f"ALTER TABLE {USAGE_AGGREGATES} ADD COLUMN IF NOT EXISTS {field} String DEFAULT ''"
                 for field in fields)


def ensure_schema(backend, enrich_fields: tuple[str, ...] = ()) -> None:
    """Create the flow's tables that do not exist, then add missing enrichment columns
    (safe to call from every worker; rows written before a column existed read ``''``).

    One query reads what exists (``existing_columns``); only what is missing is created, with
    the same idempotent statements, so a restart on an existing schema makes no DDL at all.

    Sum columns of tables created by an older version are not widened here (a type change
    rewrites every part: an operator's decision, ``tallyflow migrate``); they are named in a
    warning, since a total beyond ``Decimal(38, 18)`` would be refused there.
    """
    existing = existing_columns(backend)
    tables = {table for table, _ in existing}
    for table, statement in zip(TABLES, DDL):
        if table.name not in tables:
            backend.command(statement)
    for field, statement in zip(enrich_fields, enrichment_migrations(enrich_fields)):
        if (USAGE_AGGREGATES, field) not in existing:
            backend.command(statement)
    narrow = narrow_total_columns(existing)
    if narrow:
        log.warning("sum columns narrower than %s: run `tallyflow migrate` to widen them",
                    TOTAL_TYPE, extra={"columns": narrow})


def existing_columns(backend) -> dict[tuple[str, str], str]:
    """``{(table, column): type}`` of the flow's tables that exist, in one catalog query."""
    tables = ", ".join(f"'{table.name}'" for table in TABLES)
    rows = backend.text_rows("SELECT table, name, type FROM system.columns "
                             f"WHERE database = currentDatabase() AND table IN ({tables})")
    return {(table, name): kind for table, name, kind in rows}


def narrow_total_columns(existing: dict[tuple[str, str], str]) -> list[str]:
    """``table.column (type)`` of every existing sum column whose type is not ``TOTAL_TYPE`` yet.

    >>> narrow_total_columns({("usage_aggregates", "total_value"): VALUE_TYPE, ("usage_aggregates", "code"): "String"})
    ['usage_aggregates.total_value (Decimal(38, 18))']
    """
    return [f"{table}.{name} ({existing[table, name]})" for table, name in TOTAL_COLUMNS
            if existing.get((table, name), TOTAL_TYPE) != TOTAL_TYPE]
