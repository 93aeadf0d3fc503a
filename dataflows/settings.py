"""One typed settings object, read from the environment, in one section per concern.

The flow, every ``tallyflow`` command and ``tallyflow reconcile`` read this object; nothing
else parses the flow's environment. The variable names are a contract documented in the README::

    >>> s = Settings.from_env({"WINDOW_SIZE": "5m", "KAFKA_STOP_AT_END": "1"})
    >>> s.windows.size_ms, s.kafka.stop_at_end, s.dedup.horizon_ms
    (300000, True, 86400000)

==============  ===========================================================================
``kafka``       brokers, TLS/SASL, topics, batch size, stop-at-end, idle timeout
``windows``     window kind, size, slide, gap, lateness, out-of-orderness, future skew,
                rollups and the metric catalog file: everything that decides the results
``dedup``       the dedup horizon
``clickhouse``  the URL and the sink's batching
``redis``       the URL, enrichment fields and cache, the quotas file
``telemetry``   metrics port and host, OTLP, trace sampling
``shards``      how many shards the keyed steps use
==============  ===========================================================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Mapping

from operators.telemetry.settings import TelemetryError, TelemetrySettings
from sinks.kafka_client import KafkaConfigError, KafkaConnection, KafkaSecurity
from sinks.redaction import redact_url
from state.durations import DurationError, parse_duration_ms
from state.window_kinds import WindowKind, window_kind


class SettingsError(ValueError):
    """A setting from the environment cannot be used; the message names it."""


def _rollups(text: str) -> tuple[str, ...]:
    grains = tuple(g.strip().lower() for g in text.split(",") if g.strip() and g.strip().lower() != "off")
    unknown = set(grains) - {"hour", "day"}
    if unknown:
        raise SettingsError(f"ROLLUPS: unknown grain(s) {sorted(unknown)}; use hour, day or off")
    return grains


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _enrich_fields(text: str) -> tuple[str, ...]:
    """``ENRICH_FIELDS``: comma-separated hash fields, each becoming a String column.

    >>> _enrich_fields("plan, region"), _enrich_fields("off")
    (('plan', 'region'), ())
    """
    fields = tuple(f.strip() for f in text.split(",") if f.strip())
    if fields in (("off",), ("none",)):
        return ()
    for name in fields:
        if not _IDENTIFIER.match(name):
            raise SettingsError(f"ENRICH_FIELDS: {name!r} is not a column name (letters, digits, _)")
    if len(set(fields)) != len(fields):
        raise SettingsError(f"ENRICH_FIELDS: a field is named twice: {text!r}")
    return fields


def env_integer(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    """An integer setting: ``default`` when unset or blank, SettingsError naming it when bad.

    >>> env_integer({"N": " 4 "}, "N", 1)
    4
    """
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}: not an integer: {raw!r}") from None
    if value < minimum:
        raise SettingsError(f"{name}: must be >= {minimum}, got {value}")
    return value


def _kafka_security(env: Mapping[str, str]) -> KafkaSecurity:
    try:
        return KafkaSecurity.from_env(env)
    except KafkaConfigError as err:
        raise SettingsError(str(err)) from None


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


class _Env:
    """Typed reads of one environment mapping (default: ``os.environ``); errors name the variable."""

    def __init__(self, env: "Mapping[str, str] | _Env | None" = None) -> None:
        if isinstance(env, _Env):
            env = env.env
        self.env = os.environ if env is None else env

    def text(self, name: str, default: str) -> str:
        return self.env.get(name, default)

    def optional_text(self, name: str) -> str | None:
        return self.env.get(name) or None

    def duration(self, name: str, default_ms: int) -> int:
        raw = self.env.get(name)
        if raw is None or raw.strip() == "":
            return default_ms
        try:
            return parse_duration_ms(raw)
        except DurationError as err:
            raise SettingsError(f"{name}: {err}") from None

    def optional_duration(self, name: str) -> int | None:
        raw = self.env.get(name, "").strip().lower()
        if raw in ("", "off", "none"):
            return None
        return self.duration(name, 0)

    def integer(self, name: str, default: int, minimum: int = 1) -> int:
        return env_integer(self.env, name, default, minimum)


@dataclass(frozen=True)
class KafkaSettings:
    """Where the flow reads and writes Kafka, and how it connects (TLS/SASL)."""

    bootstrap_servers: str = "localhost:9092"
    security: KafkaSecurity = field(default_factory=KafkaSecurity)
    usage_topic: str = "usage-events"
    dlq_topic: str = "usage-events-dlq"
    late_topic: str | None = None
    alerts_topic: str = "usage-alerts"
    stop_at_end: bool = False
    batch_size: int = 5_000
    idle_timeout_ms: int | None = None

    @classmethod
    def from_env(cls, env: "Mapping[str, str] | _Env | None" = None) -> "KafkaSettings":
        """This section of ``env`` (default: ``os.environ``)."""
        env = _Env(env)
        d = cls()
        return cls(
            bootstrap_servers=env.text("KAFKA_BOOTSTRAP_SERVERS", d.bootstrap_servers),
            security=_kafka_security(env.env),
            usage_topic=env.text("USAGE_TOPIC", d.usage_topic),
            dlq_topic=env.text("DLQ_TOPIC", d.dlq_topic),
            late_topic=env.optional_text("LATE_TOPIC"),
            alerts_topic=env.text("ALERTS_TOPIC", d.alerts_topic).strip() or d.alerts_topic,
            stop_at_end=_flag(env.env.get("KAFKA_STOP_AT_END")),
            batch_size=env.integer("KAFKA_BATCH_SIZE", d.batch_size),
            idle_timeout_ms=env.optional_duration("IDLE_TIMEOUT"),
        )

    @property
    def brokers(self) -> list[str]:
        return [b.strip() for b in self.bootstrap_servers.split(",") if b.strip()]

    @property
    def connection(self) -> KafkaConnection:
        """How every Kafka client of the flow connects (bootstrap servers, TLS, SASL)."""
        return KafkaConnection(",".join(self.brokers), self.security)


@dataclass(frozen=True)
class WindowSettings:
    """Everything that decides what the flow computes (reconcile recomputes with the same)."""

    kind: str = "tumbling"
    size_ms: int = 60_000
    slide_ms: int | None = None
    gap_ms: int | None = None
    allowed_lateness_ms: int = 0
    max_out_of_orderness_ms: int = 10_000
    max_future_skew_ms: int | None = 3_600_000
    rollups: tuple[str, ...] = ("hour", "day")
    metrics_file: str | None = None

    @classmethod
    def from_env(cls, env: "Mapping[str, str] | _Env | None" = None) -> "WindowSettings":
        """This section of ``env`` (default: ``os.environ``)."""
        env = _Env(env)
        d = cls()
        return cls(
            kind=env.text("WINDOW_KIND", d.kind).strip().lower() or d.kind,
            size_ms=env.duration("WINDOW_SIZE", d.size_ms),
            slide_ms=env.optional_duration("WINDOW_SLIDE"),
            gap_ms=env.optional_duration("SESSION_GAP"),
            allowed_lateness_ms=env.duration("ALLOWED_LATENESS", d.allowed_lateness_ms),
            max_out_of_orderness_ms=env.duration("MAX_OUT_OF_ORDERNESS", d.max_out_of_orderness_ms),
            max_future_skew_ms=(d.max_future_skew_ms if not env.env.get("MAX_FUTURE_SKEW", "").strip()
                                else env.optional_duration("MAX_FUTURE_SKEW")),
            rollups=_rollups(env.text("ROLLUPS", ",".join(d.rollups))),
            metrics_file=env.optional_text("METRICS_FILE"),
        )

    def check(self) -> None:
        if self.kind not in ("tumbling", "sliding", "session"):
            raise SettingsError(f"WINDOW_KIND: {self.kind!r} is not tumbling, sliding or session")
        if self.size_ms <= 0:
            raise SettingsError("WINDOW_SIZE: must be longer than 0")
        if self.kind == "sliding" and not self.slide_ms:
            raise SettingsError("WINDOW_SLIDE: sliding windows need a slide, e.g. 10s")
        if self.kind == "sliding" and self.slide_ms > self.size_ms:
            raise SettingsError("WINDOW_SLIDE: must not be longer than WINDOW_SIZE")
        if self.kind == "session" and not self.gap_ms:
            raise SettingsError("SESSION_GAP: session windows need a gap, e.g. 30m")

    def window_kind(self) -> WindowKind:
        """The windows of these settings.

        >>> WindowSettings(kind="sliding", size_ms=60_000, slide_ms=20_000).window_kind().starts_for(65_000)
        [20000, 40000, 60000]
        """
        return window_kind(self.kind, size_ms=self.size_ms, slide_ms=self.slide_ms, gap_ms=self.gap_ms)

    @property
    def span_ms(self) -> int:
        """How long one key's window can stay open: its size, or two gaps for a session."""
        return self.gap_ms * 2 if self.kind == "session" else self.size_ms


@dataclass(frozen=True)
class DedupSettings:
    """How long a transaction id is remembered."""

    horizon_ms: int = 86_400_000

    @classmethod
    def from_env(cls, env: "Mapping[str, str] | _Env | None" = None) -> "DedupSettings":
        """This section of ``env`` (default: ``os.environ``)."""
        env = _Env(env)
        return cls(horizon_ms=env.duration("DEDUP_HORIZON", cls.horizon_ms))


@dataclass(frozen=True)
class ClickHouseSettings:
    """Where the tables are and how the sink batches its inserts."""

    url: str = "chdb://./var/clickhouse"
    batch_rows: int = 50_000
    flush_interval_ms: int = 2_000

    @classmethod
    def from_env(cls, env: "Mapping[str, str] | _Env | None" = None) -> "ClickHouseSettings":
        """This section of ``env`` (default: ``os.environ``)."""
        env = _Env(env)
        d = cls()
        return cls(
            url=env.text("CLICKHOUSE_URL", d.url),
            batch_rows=env.integer("SINK_BATCH_ROWS", d.batch_rows),
            flush_interval_ms=env.duration("SINK_FLUSH_INTERVAL", d.flush_interval_ms),
        )

    def __repr__(self) -> str:
        return (f"ClickHouseSettings(url={redact_url(self.url)!r}, batch_rows={self.batch_rows!r}, "
                f"flush_interval_ms={self.flush_interval_ms!r})")


@dataclass(frozen=True)
class RedisSettings:
    """Redis features: enrichment, live totals and quota alerts (all off when ``url`` is empty)."""

    url: str = "redis://127.0.0.1:6379/0"
    enrich_fields: tuple[str, ...] = ("plan",)
    enrich_cache_ttl_ms: int = 60_000
    quotas_file: str | None = None

    @classmethod
    def from_env(cls, env: "Mapping[str, str] | _Env | None" = None) -> "RedisSettings":
        """This section of ``env`` (default: ``os.environ``)."""
        env = _Env(env)
        d = cls()
        return cls(
            url=env.text("REDIS_URL", d.url).strip(),
            enrich_fields=_enrich_fields(env.text("ENRICH_FIELDS", ",".join(d.enrich_fields))),
            enrich_cache_ttl_ms=env.duration("ENRICH_CACHE_TTL", d.enrich_cache_ttl_ms),
            quotas_file=env.optional_text("QUOTAS_FILE"),
        )

    @property
    def enabled(self) -> bool:
        """Redis features (enrichment, live totals, alerts) are on unless ``REDIS_URL`` is empty."""
        return bool(self.url)

    def check(self) -> None:
        """A URL scheme redis-py does not speak, a field that would shadow a column of
        ``usage_aggregates``, alerts without Redis."""
        from sinks.schema import USAGE_AGGREGATES_COLUMNS

        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(f"REDIS_URL: use redis://host:port/db (or rediss://, unix://), "
                                f"got {redact_url(self.url)!r}")
        clash = set(self.enrich_fields) & set(USAGE_AGGREGATES_COLUMNS)
        if clash:
            raise SettingsError(f"ENRICH_FIELDS: {sorted(clash)} would replace columns of "
                                "usage_aggregates; rename the fields")
        if self.quotas_file and not self.url:
            raise SettingsError("QUOTAS_FILE: alerts need Redis (their fences); set REDIS_URL")

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["url"] = redact_url(self.url)
        return f"RedisSettings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _telemetry(env: Mapping[str, str]) -> TelemetrySettings:
    try:
        return TelemetrySettings.from_env(env)
    except TelemetryError as err:
        raise SettingsError(str(err)) from None


@dataclass(frozen=True)
class Settings:
    """Everything the usage flow reads from its environment, one section per concern."""

    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    windows: WindowSettings = field(default_factory=WindowSettings)
    dedup: DedupSettings = field(default_factory=DedupSettings)
    clickhouse: ClickHouseSettings = field(default_factory=ClickHouseSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    shards: int = 16

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``env`` (default: ``os.environ``); bad values raise SettingsError."""
        read = _Env(env)
        settings = cls(
            kafka=KafkaSettings.from_env(read),
            windows=WindowSettings.from_env(read),
            dedup=DedupSettings.from_env(read),
            clickhouse=ClickHouseSettings.from_env(read),
            redis=RedisSettings.from_env(read),
            telemetry=_telemetry(read.env),
            shards=read.integer("TALLYFLOW_SHARDS", cls.shards),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Reject combinations that would make results wrong rather than slow."""
        self.windows.check()
        minimum_horizon = (self.windows.span_ms + self.windows.allowed_lateness_ms
                           + self.windows.max_out_of_orderness_ms)
        if self.dedup.horizon_ms < minimum_horizon:
            raise SettingsError(
                "DEDUP_HORIZON: must cover the window (2 × SESSION_GAP for sessions) + "
                "ALLOWED_LATENESS + MAX_OUT_OF_ORDERNESS "
                f"({minimum_horizon} ms), or a duplicate could be counted twice; "
                f"got {self.dedup.horizon_ms} ms"
            )
        self.redis.check()
