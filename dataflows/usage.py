"""The usage metering dataflow: Kafka → validate → dedup → windows → ClickHouse.

Run it the Bytewax way (settings come from the environment, see the README)::

    python -m bytewax.run dataflows.usage:flow
    python -m bytewax.run dataflows.usage:flow -w 2 -r ./var/recovery -s 5 -b 30

Importing this module has no side effects. :func:`build_flow` wires a flow for a
``Settings`` and does nothing else (a test can build one in-process). The module
attribute ``flow`` is made on first access, which is when ``bytewax.run`` asks for
it: the settings are read from the environment, :func:`prepare_process` sets up what a
running flow needs (logging, the telemetry server, signal handlers, GC thresholds), then
:func:`build_flow` wires the flow.

This module only wires steps; the logic lives in ``operators/``, state in
``state/``, input and resume in ``recovery/``, writers in ``sinks/``.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import sys

from bytewax import operators as op
from bytewax.dataflow import Dataflow

from dataflows.logs import configure_logging
from dataflows.settings import Settings
from operators.catalog import load_catalog
from operators.graceful_stop import install_signal_handlers
from operators.intake import IntakeBatch, IntakeLogic
from operators.live_totals import DEFAULT_DAY_HORIZON_MS, LiveTotalsParams, live_totals
from operators.quotas import QuotaRules, load_quotas
from operators.telemetry.setup import configure_telemetry
from operators.usage_windows import UsageWindowParams, UsageWindowsOut, usage_windows
from recovery.kafka_source import UsageSource
from sinks.clickhouse_sink import ClickHouseSink, Enrichment, late_table, metric_table, sink_partitions
from sinks.kafka_output import KafkaOutputSink, dead_letter_record, late_event_record


def _to_shards(batch: IntakeBatch) -> list[tuple]:
    keys, shard_batches = batch.shard_batches()
    return list(zip(keys, shard_batches))


def _dead_letters(batch: IntakeBatch) -> list[tuple]:
    return [(str(letter.source_partition), dead_letter_record(letter)) for letter in batch.dead_letters]


def _clickhouse(settings: Settings, shard_out: UsageWindowsOut) -> None:
    """One ClickHouse output per table stream; the sampled events' trace carriers go with the
    rows they trace (the sink opens the insert spans under them)."""

    def sink(**options) -> ClickHouseSink:
        return ClickHouseSink(settings.clickhouse.url, partitions=sink_partitions(settings.shards),
                              max_rows=settings.clickhouse.batch_rows,
                              max_age_s=settings.clickhouse.flush_interval_ms / 1000, **options)

    enrichment = Enrichment(settings.redis.url, settings.redis.enrich_fields,
                            settings.redis.enrich_cache_ttl_ms) if settings.redis.enabled else None
    rows = op.merge("rows_and_traces", shard_out.rows, shard_out.traces)
    op.output("clickhouse_out", rows, sink(enrichment=enrichment))
    op.output("clickhouse_metrics_out", shard_out.metric_rows, sink(table_of=metric_table))
    op.output("clickhouse_late_out", shard_out.late, sink(table_of=late_table))


def _live_totals(settings: Settings, counted) -> None:
    """Redis: running totals per customer, code and UTC day/month, and quota alerts.

    ``counted`` is the shard step's ``CountedUsage``, keyed by shard like the state it feeds.
    The Redis sinks are imported here, when Redis is on: redis-py costs ~0.15 s at start-up.
    """
    from sinks.alerts import AlertsSink
    from sinks.redis_sink import RedisTotalsSink

    rules = load_quotas(settings.redis.quotas_file) if settings.redis.quotas_file else QuotaRules()
    horizon_ms = max(DEFAULT_DAY_HORIZON_MS, settings.dedup.horizon_ms)  # covers every window
    params = LiveTotalsParams(settings.shards, rules, horizon_ms)
    live = live_totals("live_totals", counted, params)
    op.output("redis_totals_out", live.totals, RedisTotalsSink(settings.redis.url))
    if rules:
        op.output("alerts_out", live.alerts,
                  AlertsSink(settings.kafka.connection, settings.kafka.alerts_topic, settings.redis.url))


def build_flow(settings: Settings) -> Dataflow:
    """Wire the usage flow for ``settings``."""
    windows = settings.windows.window_kind()
    catalog = load_catalog(settings.windows.metrics_file)
    params = UsageWindowParams(windows, settings.dedup.horizon_ms, settings.shards,
                               settings.windows.allowed_lateness_ms, settings.windows.rollups, catalog,
                               emit_counted_usage=settings.redis.enabled)

    def intake_for(partition: int, n_partitions: int, max_event_ms: int | None) -> IntakeLogic:
        return IntakeLogic(
            settings.kafka.usage_topic, partition, n_partitions, settings.shards, windows,
            settings.windows.max_out_of_orderness_ms, settings.windows.allowed_lateness_ms, max_event_ms, catalog,
            max_future_skew_ms=settings.windows.max_future_skew_ms,
        )

    source = UsageSource(
        settings.kafka.connection, settings.kafka.usage_topic, intake_for,
        batch_size=settings.kafka.batch_size, stop_at_end=settings.kafka.stop_at_end,
        idle_timeout_ms=settings.kafka.idle_timeout_ms,
    )
    flow = Dataflow("tallyflow_usage")
    intake = op.input("kafka_in", flow, source)
    shard_batches = op.flat_map("to_shards", intake, _to_shards)
    shard_out = usage_windows("usage_windows", shard_batches, params)
    dead = op.flat_map("dead_letters", intake, _dead_letters)
    op.output("dlq_out", dead, KafkaOutputSink(settings.kafka.connection, settings.kafka.dlq_topic, setting="DLQ_TOPIC"))
    _clickhouse(settings, shard_out)
    if settings.redis.enabled:
        _live_totals(settings, shard_out.counted)
    if settings.kafka.late_topic:
        late = op.map_value("late_records", shard_out.late, late_event_record)
        op.output("late_topic_out", late, KafkaOutputSink(settings.kafka.connection, settings.kafka.late_topic, setting="LATE_TOPIC"))
    return flow


def prepare_process(settings: Settings) -> None:
    """The process-wide side effects of a running flow: logging, telemetry, signals, GC, exit."""
    atexit.register(exit_without_teardown)  # first, so it runs last: after every later exit hook
    configure_logging()
    configure_telemetry(settings.telemetry)
    install_signal_handlers()
    settle_arrow_pandas_probe()
    # The hot path makes many short-lived tuples, and at one key per event the window stores
    # keep millions of lists alive: each young collection walks the survivors. The default
    # thresholds ran one every few hundred events (18% of CPU in `make bench`'s profile);
    # 200k allocations still spent ~2.3 s of a 1M-event high-cardinality run in 147
    # collections, 2M spends ~1.7 s. Reference cycles are rare here, so they wait longer.
    gc.set_threshold(2_000_000, 100, 1_000)


def exit_without_teardown() -> None:
    """After a run that ended without an exception, end the process at once, skipping the
    interpreter's teardown (~0.1 s: freeing every module and object, the embedded engine's
    and librdkafka's destructors) once everything the run owes is done.

    It runs as the last exit hook (registered first): the flow has returned, so every sink
    partition has flushed and closed (ClickHouse inserts are written when they return, Kafka
    producers flushed), Bytewax has written its last snapshot and closed its store, and every
    exit hook registered after it (telemetry's final export, the embedded engine's
    connections) has run. Log handlers and standard streams are flushed here. A run that
    raised keeps the normal exit (its traceback, its exit status).
    """
    if hasattr(sys, "last_value"):  # an uncaught exception was printed: exit the usual way
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _NoPandas:
    """An import finder that refuses ``pandas`` (see :func:`settle_arrow_pandas_probe`)."""

    def find_spec(self, name: str, path=None, target=None) -> None:
        if name == "pandas":
            raise ImportError("pandas is not imported for pyarrow's probe")


def settle_arrow_pandas_probe() -> None:
    """Answer pyarrow's "is pandas there?" probe with no, so building Arrow arrays never imports it.

    pyarrow's first ``pa.array`` call imports pandas (0.2-0.3 s of start-up, and its memory) to
    check whether the input is a pandas object; the flow never passes one. This makes that
    first probe fail to import it, once, while pandas is not loaded. pyarrow's conversions that
    need pandas (``to_pandas``, ``from_pandas``) still import it when called, and anything that
    imports pandas itself still gets it. Untyped Python sequences still import it (Arrow's type
    inference looks for pandas' missing values): the sinks build every array typed.
    """
    if "pandas" in sys.modules:
        return
    import pyarrow as pa

    refusal = _NoPandas()
    sys.meta_path.insert(0, refusal)
    try:
        pa.array([], pa.int64())
    finally:
        sys.meta_path.remove(refusal)


def __getattr__(name: str) -> Dataflow:
    """``flow``, for ``python -m bytewax.run dataflows.usage:flow``: made once, on first access."""
    if name != "flow":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    settings = Settings.from_env()
    prepare_process(settings)
    globals()["flow"] = made = build_flow(settings)
    return made
