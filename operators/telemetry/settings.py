"""What telemetry reads from the environment (see :mod:`operators.telemetry.setup` for the table).

    >>> TelemetrySettings().metrics_port
    9464
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

DEFAULT_METRICS_PORT = 9464


class TelemetryError(ValueError):
    """A telemetry setting from the environment cannot be used; the message names it."""


@dataclass(frozen=True)
class TelemetrySettings:
    """Where metrics and the status page are served, where OTLP goes, how many events are traced."""

    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_host: str = "0.0.0.0"
    otlp_endpoint: str | None = None
    otlp_metrics_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, if not the base's
    otlp_traces_endpoint: str | None = None  # OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, if not the base's
    otlp_timeout_s: float = 10.0
    metric_export_interval_ms: int = 60_000
    trace_sample_ratio: float = 0.0
    service_name: str = "tallyflow"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TelemetrySettings":
        """Read the settings; bad values raise TelemetryError.

        >>> s = TelemetrySettings.from_env({"METRICS_PORT": "0", "TRACE_SAMPLE_RATIO": "0.01"})
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
                raise TelemetryError(f"{name}: not a number: {raw!r}") from None
            if value < low or (high is not None and value > high):
                raise TelemetryError(f"{name}: must lie in [{low}, {high}], got {raw}")
            return value

        return cls(
            metrics_port=number("METRICS_PORT", DEFAULT_METRICS_PORT, int, 0, 65535),
            metrics_host=(env.get("METRICS_HOST") or "").strip() or cls.metrics_host,
            otlp_endpoint=(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip() or None,
            otlp_metrics_endpoint=(env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or "").strip() or None,
            otlp_traces_endpoint=(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or "").strip() or None,
            otlp_timeout_s=number("OTEL_EXPORTER_OTLP_TIMEOUT", 10.0, float, 0.1),
            metric_export_interval_ms=number("OTEL_METRIC_EXPORT_INTERVAL", 60_000, int, 100),
            trace_sample_ratio=number("TRACE_SAMPLE_RATIO", 0.0, float, 0, 1),
            service_name=(env.get("OTEL_SERVICE_NAME") or "").strip() or cls.service_name,
        )

    def otlp_url(self, signal: str) -> str:
        """The OTLP/HTTP URL of ``signal`` ("metrics" or "traces"): its own setting, else the base's.

        >>> TelemetrySettings(otlp_endpoint="http://c:4318/").otlp_url("traces")
        'http://c:4318/v1/traces'
        """
        specific = self.otlp_metrics_endpoint if signal == "metrics" else self.otlp_traces_endpoint
        return specific or f"{(self.otlp_endpoint or '').rstrip('/')}/v1/{signal}"
