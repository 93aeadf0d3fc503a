"""ClickHouse DDL for a replicated, sharded cluster, generated from the single-node tables.

Each table of ``sinks.schema.TABLES`` becomes two tables, both created ``ON CLUSTER``:

* ``<name>_local``: ``ReplicatedReplacingMergeTree`` on every replica of every shard, with the
  columns, ``ORDER BY``, version and ``is_deleted`` columns of the single-node table;
* ``<name>``: a ``Distributed`` table over the locals under the single-node name, so the sink
  and every query keep using ``usage_aggregates``, ``usage_late_events``…

Rows are sharded by a hash of sorting-key columns (the customer when the key has one), so every
version of one key lands on one shard and ``SELECT … FINAL`` through the Distributed table
still yields one row per key. Enrichment columns are added to both tables of
``usage_aggregates``, as ``sinks.schema.enrichment_migrations`` does on a single node.

    >>> [s.split(" ON CLUSTER")[0] for s in cluster_ddl("metering", "billing")][:2]
    ['CREATE TABLE IF NOT EXISTS `billing`.`usage_aggregates_local`', 'CREATE TABLE IF NOT EXISTS `billing`.`usage_aggregates`']
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sinks.clickhouse_backend import quote_identifier, quote_string
from sinks.schema import TABLES, TOTAL_TYPE, USAGE_AGGREGATES, Table

LOCAL_SUFFIX = "_local"
DEFAULT_CLUSTER = "{cluster}"  # the server's macro; pass a real cluster name to pin one
REPLICA_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
REPLICA_NAME = "{replica}"
CUSTOMER = ("organization_id", "external_customer_id")
ENRICHMENT_TYPE = "String DEFAULT ''"  # as sinks.schema.enrichment_migrations


def sharding_columns(table: Table) -> tuple[str, ...]:
    """The customer if the sorting key holds one (a customer's rows stay together), else the key.

    Always a function of the sorting key only, so replacements of a row meet on one shard.

    >>> [sharding_columns(t) for t in TABLES][-2]
    ('source_topic', 'source_partition', 'source_offset', 'reason')
    """
    return CUSTOMER if set(CUSTOMER) <= set(table.order_by) else table.order_by


def _qualified(database: str, name: str) -> str:
    return f"{quote_identifier(database)}.{quote_identifier(name)}"


def local_table_ddl(table: Table, cluster: str, database: str) -> str:
    columns = ",\n".join(f"    {quote_identifier(name)} {kind}" for name, kind in table.columns)
    engine_args = [quote_string(REPLICA_PATH), quote_string(REPLICA_NAME)]
    engine_args += [quote_identifier(arg) for arg in table.engine_args]
    return (
        f"CREATE TABLE IF NOT EXISTS {_qualified(database, table.name + LOCAL_SUFFIX)}"
        f" ON CLUSTER {quote_string(cluster)}\n(\n{columns}\n)\n"
        f"ENGINE = ReplicatedReplacingMergeTree({', '.join(engine_args)})\n"
        f"ORDER BY ({', '.join(quote_identifier(c) for c in table.order_by)})"
    )


def distributed_table_ddl(table: Table, cluster: str, database: str) -> str:
    local = table.name + LOCAL_SUFFIX
    sharding = ", ".join(quote_identifier(c) for c in sharding_columns(table))
    return (
        f"CREATE TABLE IF NOT EXISTS {_qualified(database, table.name)} ON CLUSTER {quote_string(cluster)}"
        f" AS {_qualified(database, local)}\n"
        f"ENGINE = Distributed({quote_string(cluster)}, {quote_string(database)}, {quote_string(local)}, "
        f"cityHash64({sharding}))"
    )


def cluster_ddl(cluster: str = DEFAULT_CLUSTER, database: str = "default",
                enrich_fields: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Every statement, in order: each local table before its Distributed table, then the
    enrichment columns (local first). All are ``IF NOT EXISTS``: re-running changes nothing."""
    if not cluster.strip():
        raise ValueError("the cluster name must not be empty")
    statements: list[str] = []
    for table in TABLES:
        statements.append(local_table_ddl(table, cluster, database))
        statements.append(distributed_table_ddl(table, cluster, database))
    for field in enrich_fields:
        for name in (USAGE_AGGREGATES + LOCAL_SUFFIX, USAGE_AGGREGATES):
            statements.append(f"ALTER TABLE {_qualified(database, name)} ON CLUSTER {quote_string(cluster)} "
                              f"ADD COLUMN IF NOT EXISTS {quote_identifier(field)} {ENRICHMENT_TYPE}")
    return tuple(statements)


def expected_columns(cluster_mode: bool, enrich_fields: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Table name → (column, type) pairs the DDL creates, in creation order."""
    expected: dict[str, tuple] = {}
    for table in TABLES:
        columns = table.columns
        if table.name == USAGE_AGGREGATES:
            columns += tuple((field, "String") for field in enrich_fields)
        names = (table.name + LOCAL_SUFFIX, table.name) if cluster_mode else (table.name,)
        for name in names:
            expected[name] = columns
    return expected


# --------------------------------------------------------------------------- applying it


@dataclass(frozen=True)
class TableOutcome:
    """What ``migrate`` found and did for one table."""

    table: str
    existed: bool
    exists: bool
    drift: tuple[str, ...] = ()  # missing columns, or columns of another type: a failure
    extra: tuple[str, ...] = ()  # columns the DDL does not know (e.g. an enrichment field dropped since)
    widened: tuple[str, ...] = ()  # sum columns converted to TOTAL_TYPE, e.g. "total_value from Decimal(38, 18)"

    @property
    def ok(self) -> bool:
        return self.exists and not self.drift

    def describe(self) -> str:
        if not self.exists:
            return f"{self.table}: MISSING after the DDL ran"
        state = "already existed" if self.existed else "created"
        text = f"{self.table}: {state}, "
        text += f"but its columns differ: {'; '.join(self.drift)}" if self.drift else "columns as expected"
        if self.widened:
            text += f" (widened to {TOTAL_TYPE}: {', '.join(self.widened)})"
        if self.extra:
            text += f" (extra columns left as they are: {', '.join(self.extra)})"
        return text


def _table_columns(backend, database: str, table: str) -> dict[str, str] | None:
    _, rows = backend.query(
        "SELECT name, type FROM system.columns "
        f"WHERE database = {quote_string(database)} AND table = {quote_string(table)} ORDER BY position"
    )
    return {name: kind for name, kind in rows} or None


def _compare(expected: tuple, found: dict[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    wanted = dict(expected)
    drift = [f"missing {name}" for name in wanted if name not in found]
    drift += [f"{name} is {found[name]}, expected {kind}"
              for name, kind in wanted.items() if name in found and found[name] != kind]
    return tuple(drift), tuple(name for name in found if name not in wanted)


_NARROWER_DECIMAL = re.compile(r"Decimal\((\d+), 18\)")


def widens_losslessly(found: str | None, wanted: str) -> bool:
    """Whether a column of type ``found`` can become ``wanted`` (a wider ``Decimal(P, 18)``)
    keeping every value exactly.

    >>> widens_losslessly("Decimal(38, 18)", TOTAL_TYPE), widens_losslessly(TOTAL_TYPE, TOTAL_TYPE)
    (True, False)
    >>> widens_losslessly("Decimal(38, 10)", TOTAL_TYPE), widens_losslessly("Float64", TOTAL_TYPE)
    (False, False)
    """
    narrower = _NARROWER_DECIMAL.fullmatch(found or "")
    wider = _NARROWER_DECIMAL.fullmatch(wanted)
    return bool(narrower and wider) and int(narrower.group(1)) < int(wider.group(1))


def widen_statement(database: str, table: str, column: str, kind: str, cluster: str | None) -> str:
    """``ALTER TABLE … MODIFY COLUMN`` to ``kind``, waiting until every part is converted.

    >>> widen_statement("default", "usage_aggregates", "total_value", TOTAL_TYPE, None)
    'ALTER TABLE `default`.`usage_aggregates` MODIFY COLUMN `total_value` Decimal(76, 18) SETTINGS mutations_sync = 2'
    """
    where = f" ON CLUSTER {quote_string(cluster)}" if cluster is not None else ""
    return (f"ALTER TABLE {_qualified(database, table)}{where} MODIFY COLUMN {quote_identifier(column)} "
            f"{kind} SETTINGS mutations_sync = 2")


def _widen(backend, database: str, table: str, expected: tuple, cluster: str | None) -> tuple[str, ...]:
    """Widen the sum columns of an existing ``table`` still narrower than ``TOTAL_TYPE``."""
    found = _table_columns(backend, database, table) or {}
    widened = []
    for column, kind in expected:
        if kind == TOTAL_TYPE and widens_losslessly(found.get(column), kind):
            backend.command(widen_statement(database, table, column, kind, cluster))
            widened.append(f"{column} from {found[column]}")
    return tuple(widened)


def migrate(backend, cluster: str | None = None, enrich_fields: tuple[str, ...] = ()) -> list[TableOutcome]:
    """Create the flow's tables if missing: single-node DDL, or the cluster DDL when ``cluster``.

    Safe to re-run (every statement is ``IF NOT EXISTS``, every widening checks the type first).
    An existing table is altered only to add missing enrichment columns and to widen its sum
    columns to ``TOTAL_TYPE`` (``ALTER TABLE … MODIFY COLUMN``: exact, every value kept; the
    statement returns once every part is converted); its columns are then compared with the
    expected ones.
    """
    from sinks.schema import ensure_schema

    _, [(database,)] = backend.query("SELECT currentDatabase()")
    expected = expected_columns(cluster is not None, enrich_fields)
    before = {name: _table_columns(backend, database, name) is not None for name in expected}
    if cluster is None:
        ensure_schema(backend, enrich_fields)
    else:
        for statement in cluster_ddl(cluster, database, enrich_fields):
            backend.command(statement)
    widened = {name: _widen(backend, database, name, columns, cluster) if before[name] else ()
               for name, columns in expected.items()}
    outcomes = []
    for name, columns in expected.items():
        found = _table_columns(backend, database, name)
        drift, extra = _compare(columns, found) if found is not None else ((), ())
        outcomes.append(TableOutcome(name, before[name], found is not None, drift, extra, widened[name]))
    return outcomes
