"""Drive the real usage dataflow in a child process and read what it produced."""

from __future__ import annotations

from dataclasses import dataclass

from deploy.broker import ensure_topic, topic_partitions
from deploy.runner import flow_environment
from recovery.reconcile import read_aggregates
from sinks.clickhouse_backend import connect


def flow_env(bootstrap: str, topic: str, dlq_topic: str, clickhouse_url: str, **extra) -> dict:
    """Environment for a stop-at-end run of ``dataflows.usage:flow`` (settings are the contract).

    The DLQ, late and alerts topics are created (one partition) unless they exist: the flow
    refuses to start without the topics it writes to.
    """
    settings = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "USAGE_TOPIC": topic,
        "DLQ_TOPIC": dlq_topic,
        "CLICKHOUSE_URL": clickhouse_url,
        "KAFKA_STOP_AT_END": "1",
        "WINDOW_SIZE": "1m",
        "MAX_OUT_OF_ORDERNESS": "10s",
        "DEDUP_HORIZON": "24h",
        "LOG_LEVEL": "WARNING",
        "METRICS_PORT": "0",  # flows run side by side; a test that reads /metrics sets a free port
    }
    settings.update(extra)
    for output in ("DLQ_TOPIC", "LATE_TOPIC", "ALERTS_TOPIC"):
        if settings.get(output) and topic_partitions(bootstrap, settings[output]) is None:
            ensure_topic(bootstrap, settings[output], 1)
    return flow_environment(**settings)


@dataclass
class FlowOutput:
    aggregates: dict  # (org, customer, code, window_start_ms) -> (count, Decimal)
    rows_final: int
    rows_distinct_keys: int
    late: list[tuple]  # (organization_id, transaction_id, source_partition, source_offset)


def read_output(clickhouse_url: str) -> FlowOutput:
    backend = connect(clickhouse_url)
    try:
        aggregates = read_aggregates(backend)
        _, [(final, distinct)] = backend.query(
            "SELECT count(), uniqExact(organization_id, external_customer_id, code, window_start) "
            "FROM usage_aggregates FINAL"
        )
        _, late = backend.query(
            "SELECT organization_id, transaction_id, source_partition, source_offset "
            "FROM usage_late_events FINAL"
        )
    finally:
        backend.close()
    return FlowOutput(aggregates, int(final), int(distinct), [tuple(r) for r in late])
