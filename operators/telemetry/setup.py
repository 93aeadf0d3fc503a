"""Metrics, traces and the live status page, configured from the environment.

``configure_telemetry()`` (called once when the flow starts, by ``dataflows.usage.prepare_process``)
sets up OpenTelemetry and installs the recorder :mod:`operators.telemetry.metrics` writes to.
What it reads (:class:`operators.telemetry.settings.TelemetrySettings`):

==============================  =================================================================
``METRICS_PORT``                HTTP port for ``/metrics``, ``/status``, ``/status.json``,
                                ``/healthz`` (default 9464; ``0`` = no server). If the port is
                                taken (several processes of a cluster on one machine) a warning
                                is logged and the flow runs on without it: give each process its
                                own ``METRICS_PORT``.
``METRICS_HOST``                address to bind (default ``0.0.0.0``)
``OTEL_EXPORTER_OTLP_ENDPOINT`` if set, metrics (and sampled spans) also go there by OTLP/HTTP
                                (``OTEL_EXPORTER_OTLP_TIMEOUT`` seconds per export, default 10;
                                ``OTEL_METRIC_EXPORT_INTERVAL`` ms, default 60000)
``TRACE_SAMPLE_RATIO``          share of events traced decode → window → sink (default 0 = off);
                                a Kafka ``traceparent`` header marked sampled is always continued
``OTEL_SERVICE_NAME``           the resource's ``service.name`` (default ``tallyflow``)
==============================  =================================================================

The Prometheus text comes from the OpenTelemetry Prometheus exporter, relabelled to the
dashboard's names (semantic-convention attributes become ``partition``, ``table``, ``reason``;
``*_milliseconds`` gauges become ``*_ms``), plus whatever else is in ``prometheus_client``'s
default registry (process metrics, Bytewax's Python-side metrics).

    >>> sorted(PROMETHEUS_LABELS.values())
    ['partition', 'reason', 'table']
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from operators.telemetry import metrics
from operators.telemetry.board import StatusBoard
from operators.telemetry.metrics import Telemetry
from operators.telemetry.settings import TelemetrySettings
from operators.telemetry.tracing import Tracing

if TYPE_CHECKING:  # the server (http.server: ~15 ms to import) is imported when METRICS_PORT is set
    from operators.telemetry.server import BoundedHTTPServer

log = logging.getLogger(__name__)

PROMETHEUS_LABELS = {
    "messaging_destination_partition_id": "partition",
    "db_collection_name": "table",
    "error_type": "reason",
}
PROMETHEUS_NAMES = {
    "tallyflow_watermark_milliseconds": "tallyflow_watermark_ms",
    "tallyflow_watermark_delay_milliseconds": "tallyflow_watermark_delay_ms",
}


@dataclass
class Observability:
    """What ``configure_telemetry`` set up; :meth:`shutdown` undoes it (tests)."""

    settings: TelemetrySettings
    telemetry: Telemetry
    meter_provider: Any
    tracer_provider: Any = None
    server: BoundedHTTPServer | None = None
    collector: Any = None
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str | None:
        if self.server is None:
            return None
        host, port = self.server.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"

    def shutdown(self) -> None:
        global _current
        self._stop.set()
        metrics.uninstall()
        self.telemetry.drain()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.collector is not None:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self.collector)
        if hasattr(self.meter_provider, "shutdown"):  # the SDK's (the no-op one has none)
            self.meter_provider.shutdown()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if _current is self:
            _current = None


_current: Observability | None = None
_lock = threading.Lock()


def configure_telemetry(settings: TelemetrySettings | Mapping[str, str] = os.environ, *,
                        span_exporter: Any = None) -> Observability:
    """Set up metrics, tracing and the HTTP server once per process; later calls return the same.

    ``settings`` is the flow's ``Settings.telemetry`` (or an environment to read them from).
    ``span_exporter`` (tests) receives every finished span, beside OTLP if that is configured.
    """
    global _current
    with _lock:
        if _current is not None:
            return _current
        if not isinstance(settings, TelemetrySettings):
            settings = TelemetrySettings.from_env(settings)
        _current = _configure(settings, span_exporter)
        return _current


def _configure(settings: TelemetrySettings, span_exporter: Any) -> Observability:
    readers, collector = [], None
    if settings.metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import REGISTRY, CollectorRegistry

        private = CollectorRegistry(auto_describe=False)
        readers.append(PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False,
                                              registry=private))
        collector = RelabelledCollector(private)
        REGISTRY.register(collector)
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        exporter = OTLPMetricExporter(endpoint=settings.otlp_url("metrics"),
                                      timeout=settings.otlp_timeout_s)
        readers.append(PeriodicExportingMetricReader(
            exporter, export_interval_millis=settings.metric_export_interval_ms,
            export_timeout_millis=settings.otlp_timeout_s * 1000))
    meter_provider = _meter_provider(settings, readers)
    meter = meter_provider.get_meter("tallyflow")

    tracer_provider, tracing = None, None
    if settings.trace_sample_ratio > 0:
        tracer_provider = _tracer_provider(settings, _resource(settings), span_exporter)
        tracing = Tracing(tracer_provider.get_tracer("tallyflow"), settings.trace_sample_ratio)

    recorder = Telemetry(meter, StatusBoard(), tracing)
    observability = Observability(settings, recorder, meter_provider, tracer_provider, None, collector)
    metrics.install(recorder)
    atexit.register(recorder.drain)  # runs before the MeterProvider's own exit-time export
    if settings.metrics_port:
        from operators.telemetry.server import start_server

        observability.server = start_server(settings, recorder.board, metrics_text)
    threading.Thread(target=_sample, args=(recorder, observability._stop), name="tallyflow-status",
                     daemon=True).start()
    log.info("telemetry configured", extra={
        "metrics_url": observability.url, "otlp_endpoint": settings.otlp_endpoint,
        "trace_sample_ratio": settings.trace_sample_ratio})
    return observability


def _resource(settings: TelemetrySettings) -> Any:
    from opentelemetry.sdk.resources import Resource

    return Resource.create({
        "service.name": settings.service_name,
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
    })


def _meter_provider(settings: TelemetrySettings, readers: list) -> Any:
    """The SDK's provider with ``readers``; with none (no ``METRICS_PORT``, no OTLP) nothing
    would ever read the instruments, so the API's no-op provider (the SDK costs ~30 ms of
    every run's start-up to import)."""
    if not readers:
        from opentelemetry.metrics import NoOpMeterProvider

        return NoOpMeterProvider()
    from opentelemetry.sdk.metrics import MeterProvider

    return MeterProvider(resource=_resource(settings), metric_readers=readers)


def _tracer_provider(settings: TelemetrySettings, resource: Any, span_exporter: Any) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    # Which events to trace is decided at intake (the ratio); the sampler only honours a
    # parent's "not sampled" flag.
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=settings.otlp_url("traces"),
            timeout=settings.otlp_timeout_s)))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    if not settings.otlp_endpoint and span_exporter is None:
        log.warning("TRACE_SAMPLE_RATIO is set but OTEL_EXPORTER_OTLP_ENDPOINT is not: "
                    "spans are recorded and dropped")
    return provider


def shutdown_telemetry() -> None:
    """Undo :func:`configure_telemetry` (tests); a no-op if it did not run."""
    if _current is not None:
        _current.shutdown()


# ---- Prometheus ---------------------------------------------------------------------------------


class RelabelledCollector:
    """The OpenTelemetry exporter's families under the dashboard's metric and label names."""

    def __init__(self, source: Any) -> None:
        self.source = source

    def describe(self) -> list:
        return []

    def collect(self):
        from prometheus_client.metrics_core import Metric

        for family in self.source.collect():
            name = PROMETHEUS_NAMES.get(family.name, family.name)
            unit = family.unit if name == family.name else ""
            renamed = Metric(name, family.documentation, family.type, unit)
            for sample in family.samples:
                labels = {PROMETHEUS_LABELS.get(k, k): v for k, v in sample.labels.items()}
                renamed.samples.append(sample._replace(name=name + sample.name[len(family.name):],
                                                       labels=labels))
            yield renamed


def metrics_text() -> tuple[bytes, str]:
    """``/metrics``: the default registry in the Prometheus text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

    recorder = metrics.active()
    if recorder is not None:
        recorder.drain()
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def _sample(recorder: Telemetry, stop: threading.Event, every_s: float = 1.0) -> None:
    """Once a second: the status history, and queued sink figures into the instruments."""
    recorder.board.tick()
    while not stop.wait(every_s - (time.time() % every_s)):
        recorder.drain()
        recorder.board.tick()


