"""Metrics, traces and the live status page, configured from the environment.

``configure_telemetry()`` (called once at flow import) sets up OpenTelemetry and installs the
recorder ``operators.telemetry`` writes to. What it reads:

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
import errno
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping

from operators import telemetry

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9464
STATUS_PAGE = Path(__file__).with_name("status_page.html")

PROMETHEUS_LABELS = {
    "messaging_destination_partition_id": "partition",
    "db_collection_name": "table",
    "error_type": "reason",
}
PROMETHEUS_NAMES = {
    "tallyflow_watermark_milliseconds": "tallyflow_watermark_ms",
    "tallyflow_watermark_delay_milliseconds": "tallyflow_watermark_delay_ms",
}


class ObservabilityError(ValueError):
    """A telemetry setting from the environment cannot be used; the message names it."""


@dataclass(frozen=True)
class ObservabilitySettings:
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = "0.0.0.0"
    otlp_endpoint: str | None = None
    otlp_timeout_s: float = 10.0
    metric_export_interval_ms: int = 60_000
    trace_sample_ratio: float = 0.0
    service_name: str = "tallyflow"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "ObservabilitySettings":
        """Read the settings; bad values raise ObservabilityError.

        >>> s = ObservabilitySettings.from_env({"METRICS_PORT": "0", "TRACE_SAMPLE_RATIO": "0.01"})
        >>> s.metrics_port, s.trace_sample_ratio, s.otlp_endpoint
        (0, 0.01, None)
        """

        def number(name: str, default: float, kind=float, low: float = 0, high: float | None = None):
            raw = (env.get(name) or "").strip()
            if not raw:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ObservabilityError(f"{name}: not a number: {raw!r}") from None
            if value < low or (high is not None and value > high):
                raise ObservabilityError(f"{name}: must lie in [{low}, {high}], got {raw}")
            return value

        return cls(
            metrics_port=number("METRICS_PORT", DEFAULT_METRICS_PORT, int, 0, 65535),
            metrics_host=(env.get("METRICS_HOST") or "").strip() or cls.metrics_host,
            otlp_endpoint=(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip() or None,
            otlp_timeout_s=number("OTEL_EXPORTER_OTLP_TIMEOUT", 10.0, float, 0.1),
            metric_export_interval_ms=number("OTEL_METRIC_EXPORT_INTERVAL", 60_000, int, 100),
            trace_sample_ratio=number("TRACE_SAMPLE_RATIO", 0.0, float, 0, 1),
            service_name=(env.get("OTEL_SERVICE_NAME") or "").strip() or cls.service_name,
        )


@dataclass
class Observability:
    """What ``configure_telemetry`` set up; :meth:`shutdown` undoes it (tests)."""

    settings: ObservabilitySettings
    telemetry: telemetry.Telemetry
    meter_provider: Any
    tracer_provider: Any = None
    server: ThreadingHTTPServer | None = None
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
        telemetry.uninstall()
        self.telemetry.drain()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.collector is not None:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self.collector)
        self.meter_provider.shutdown()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if _current is self:
            _current = None


_current: Observability | None = None
_lock = threading.Lock()


def configure_telemetry(settings_env: Mapping[str, str] = os.environ, *,
                        span_exporter: Any = None) -> Observability:
    """Set up metrics, tracing and the HTTP server once per process; later calls return the same.

    ``span_exporter`` (tests) receives every finished span, beside OTLP if that is configured.
    """
    global _current
    with _lock:
        if _current is not None:
            return _current
        settings = ObservabilitySettings.from_env(settings_env)
        _current = _configure(settings, settings_env, span_exporter)
        return _current


def _configure(settings: ObservabilitySettings, env: Mapping[str, str], span_exporter: Any) -> Observability:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({
        "service.name": settings.service_name,
        "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
    })
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

        exporter = OTLPMetricExporter(endpoint=_otlp_url(env, "METRICS", settings.otlp_endpoint, "v1/metrics"),
                                      timeout=settings.otlp_timeout_s)
        readers.append(PeriodicExportingMetricReader(
            exporter, export_interval_millis=settings.metric_export_interval_ms,
            export_timeout_millis=settings.otlp_timeout_s * 1000))
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    meter = meter_provider.get_meter("tallyflow")

    tracer_provider, tracing = None, None
    if settings.trace_sample_ratio > 0:
        tracer_provider = _tracer_provider(settings, env, resource, span_exporter)
        tracing = telemetry.Tracing(tracer_provider.get_tracer("tallyflow"), settings.trace_sample_ratio)

    recorder = telemetry.Telemetry(meter, telemetry.StatusBoard(), tracing)
    observability = Observability(settings, recorder, meter_provider, tracer_provider, None, collector)
    telemetry.install(recorder)
    atexit.register(recorder.drain)  # runs before the MeterProvider's own exit-time export
    if settings.metrics_port:
        observability.server = _start_server(settings, observability)
    threading.Thread(target=_sample, args=(recorder, observability._stop), name="tallyflow-status",
                     daemon=True).start()
    log.info("telemetry configured", extra={
        "metrics_url": observability.url, "otlp_endpoint": settings.otlp_endpoint,
        "trace_sample_ratio": settings.trace_sample_ratio})
    return observability


def _otlp_url(env: Mapping[str, str], signal: str, base: str, path: str) -> str:
    specific = (env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or "").strip()
    return specific or f"{base.rstrip('/')}/{path}"


def _tracer_provider(settings: ObservabilitySettings, env: Mapping[str, str], resource: Any,
                     span_exporter: Any) -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    # Which events to trace is decided at intake (the ratio); the sampler only honours a
    # parent's "not sampled" flag.
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(
            endpoint=_otlp_url(env, "TRACES", settings.otlp_endpoint, "v1/traces"),
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

    recorder = telemetry.active()
    if recorder is not None:
        recorder.drain()
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


# ---- HTTP ---------------------------------------------------------------------------------------


def _start_server(settings: ObservabilitySettings, observability: Observability) -> ThreadingHTTPServer | None:
    board = observability.telemetry.board
    page = STATUS_PAGE.read_bytes()
    recovery = recovery_configured()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, kind = metrics_text()
            elif path in ("/", "/status"):
                body, kind = page, "text/html; charset=utf-8"
            elif path == "/status.json":
                status = board.status()
                status["trace_sample_ratio"] = settings.trace_sample_ratio
                status["recovery"] = recovery
                body, kind = json.dumps(status).encode(), "application/json"
            elif path == "/healthz":
                body, kind = b"ok\n", "text/plain; charset=utf-8"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
            return

    try:
        server = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), Handler)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        log.warning("metrics port in use: no /metrics or status page in this process "
                    "(give each process of a cluster its own METRICS_PORT)",
                    extra={"host": settings.metrics_host, "port": settings.metrics_port})
        return None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="tallyflow-metrics", daemon=True).start()
    return server


def recovery_configured(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> bool:
    """Whether this ``bytewax.run`` process has a recovery store (``-r`` or its env variable).

    Bytewax snapshots state at every epoch either way; only with a store is it kept.

    >>> recovery_configured(["bytewax.run", "dataflows.usage:flow", "-r", "/var/recovery"], {})
    True
    >>> recovery_configured(["bytewax.run", "dataflows.usage:flow"], {})
    False
    """
    import sys

    argv = sys.argv if argv is None else argv
    flags = ("-r", "--recovery-directory")
    return bool(env.get("BYTEWAX_RECOVERY_DIRECTORY")) or any(
        arg in flags or arg.startswith("--recovery-directory=") for arg in argv)


def _sample(recorder: telemetry.Telemetry, stop: threading.Event, every_s: float = 1.0) -> None:
    """Once a second: the status history, and queued sink figures into the instruments."""
    recorder.board.tick()
    while not stop.wait(every_s - (time.time() % every_s)):
        recorder.drain()
        recorder.board.tick()


# ---- `tallyflow lag` ----------------------------------------------------------------------------


def fetch_status(url: str, timeout: float = 5.0) -> dict:
    """GET ``<url>/status.json`` of a running flow; ObservabilityError if nothing answers."""
    import urllib.error
    import urllib.request

    target = url.rstrip("/") + "/status.json"
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:  # noqa: S310 - operator's URL
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise ObservabilityError(f"{target} answered {err.code}") from err
    except (urllib.error.URLError, OSError) as err:
        raise ObservabilityError(
            f"no flow answers at {target}: {getattr(err, 'reason', err)} "
            "(is it running with METRICS_PORT set to that port?)") from err
    except json.JSONDecodeError as err:
        raise ObservabilityError(f"{target} did not answer JSON: {err}") from err


def merge_status(statuses: list[Mapping[str, Any]]) -> dict:
    """One cluster-wide status from each process's ``/status.json`` (``tallyflow lag --url … --url …``).

    Counters, rates and lag add up; partitions are listed together, and each one's delay is
    recomputed against the newest event seen anywhere in the cluster.

    >>> a = {"partitions": [{"partition": 0, "consumed": 5, "lag": 1, "watermark_ms": 90, "max_event_ms": 100}],
    ...      "totals": {"consumed": 5}, "rates": {"events_per_s": 2.0}, "lag_total": 1}
    >>> b = {"partitions": [{"partition": 1, "consumed": 7, "lag": 0, "watermark_ms": 150, "max_event_ms": 160}],
    ...      "totals": {"consumed": 7}, "rates": {"events_per_s": 3.5}, "lag_total": 0}
    >>> merged = merge_status([b, a])
    >>> [(p["partition"], p["watermark_delay_ms"]) for p in merged["partitions"]], merged["totals"], merged["lag_total"]
    ([(0, 70), (1, 10)], {'consumed': 12}, 1)
    """
    if len(statuses) == 1:
        return dict(statuses[0])
    partitions = sorted((dict(p) for s in statuses for p in s.get("partitions", [])),
                        key=lambda p: p["partition"])
    newest = max((p["max_event_ms"] for p in partitions if p.get("max_event_ms") is not None), default=None)
    for p in partitions:
        if newest is not None and p.get("watermark_ms") is not None:
            p["watermark_delay_ms"] = max(0, newest - p["watermark_ms"])
    totals: dict[str, Any] = {}
    rates: dict[str, float] = {}
    for s in statuses:
        for name, value in s.get("totals", {}).items():
            totals[name] = totals.get(name, 0) + value
        for name, value in s.get("rates", {}).items():
            rates[name] = round(rates.get(name, 0.0) + value, 1)
    return {"partitions": partitions, "totals": totals, "rates": rates,
            "lag_total": sum(s.get("lag_total", 0) for s in statuses)}


def format_lag(status: Mapping[str, Any]) -> str:
    """The per-partition table ``tallyflow lag`` prints.

    >>> print(format_lag({"partitions": [{"partition": 0, "consumed": 1200, "lag": 0,
    ...     "watermark_ms": 1767225590000, "watermark_delay_ms": 2500}],
    ...     "totals": {"consumed": 1200, "invalid": 3, "late": 1, "duplicates": 7},
    ...     "rates": {"events_per_s": 410.5}, "lag_total": 0}))
    partition | consumed | lag | watermark (UTC)      | behind newest (s)
    ----------+----------+-----+----------------------+------------------
            0 |     1200 |   0 | 2025-12-31T23:59:50Z |               2.5
    <BLANKLINE>
    total lag 0 · 410.5 events/s · consumed 1200 · invalid 3 · late 1 · duplicates 7
    """
    from datetime import datetime, timezone

    from state.text_table import format_table

    def when(ms: int | None) -> str | None:
        if ms is None:
            return None
        return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def delay(ms: int | None) -> float | None:
        return None if ms is None else round(ms / 1000, 1)

    rows = [(p["partition"], p["consumed"], p.get("lag"), when(p.get("watermark_ms")),
             delay(p.get("watermark_delay_ms"))) for p in status.get("partitions", [])]
    table = format_table(["partition", "consumed", "lag", "watermark (UTC)", "behind newest (s)"], rows)
    totals, rates = status.get("totals", {}), status.get("rates", {})
    summary = (f"total lag {status.get('lag_total', 0)} · {rates.get('events_per_s', 0)} events/s · "
               f"consumed {totals.get('consumed', 0)} · invalid {totals.get('invalid', 0)} · "
               f"late {totals.get('late', 0)} · duplicates {totals.get('duplicates', 0)}")
    return f"{table}\n\n{summary}"
