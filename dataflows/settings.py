"""One typed settings object, read from the environment.

The variable names are a contract documented in the README::

    >>> s = Settings.from_env({"WINDOW_SIZE": "5m", "KAFKA_STOP_AT_END": "1"})
    >>> s.window_size_ms, s.stop_at_end
    (300000, True)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from typing import Mapping

from sinks.kafka_client import KafkaConfigError, KafkaConnection, KafkaSecurity
from sinks.redaction import redact_url
from state.durations import DurationError, parse_duration_ms


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


@dataclass(frozen=True)
class Settings:
    """Everything the usage flow reads from its environment."""

    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_security: KafkaSecurity = field(default_factory=KafkaSecurity)
    usage_topic: str = "usage-events"
    dlq_topic: str = "usage-events-dlq"
    clickhouse_url: str = "chdb://./var/clickhouse"
    stop_at_end: bool = False
    window_kind: str = "tumbling"
    window_size_ms: int = 60_000
    window_slide_ms: int | None = None
    session_gap_ms: int | None = None
    allowed_lateness_ms: int = 0
    idle_timeout_ms: int | None = None
    late_topic: str | None = None
    metrics_file: str | None = None
    rollups: tuple[str, ...] = ("hour", "day")
    max_out_of_orderness_ms: int = 10_000
    max_future_skew_ms: int | None = 3_600_000
    dedup_horizon_ms: int = 86_400_000
    shards: int = 16
    sink_batch_rows: int = 50_000
    sink_flush_interval_ms: int = 2_000
    kafka_batch_size: int = 5_000
    redis_url: str = "redis://127.0.0.1:6379/0"
    enrich_fields: tuple[str, ...] = ("plan",)
    enrich_cache_ttl_ms: int = 60_000
    quotas_file: str | None = None
    alerts_topic: str = "usage-alerts"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Build settings from ``env`` (default: ``os.environ``); bad values raise SettingsError."""
        env = os.environ if env is None else env
        d = cls()

        def duration(name: str, default_ms: int) -> int:
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                return default_ms
            try:
                return parse_duration_ms(raw)
            except DurationError as err:
                raise SettingsError(f"{name}: {err}") from None

        def optional_duration(name: str) -> int | None:
            raw = env.get(name, "").strip().lower()
            if raw in ("", "off", "none"):
                return None
            return duration(name, 0)

        def integer(name: str, default: int, minimum: int = 1) -> int:
            return env_integer(env, name, default, minimum)

        settings = cls(
            kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS", d.kafka_bootstrap_servers),
            kafka_security=_kafka_security(env),
            usage_topic=env.get("USAGE_TOPIC", d.usage_topic),
            dlq_topic=env.get("DLQ_TOPIC", d.dlq_topic),
            clickhouse_url=env.get("CLICKHOUSE_URL", d.clickhouse_url),
            stop_at_end=_flag(env.get("KAFKA_STOP_AT_END")),
            window_kind=env.get("WINDOW_KIND", d.window_kind).strip().lower() or d.window_kind,
            window_size_ms=duration("WINDOW_SIZE", d.window_size_ms),
            window_slide_ms=optional_duration("WINDOW_SLIDE"),
            session_gap_ms=optional_duration("SESSION_GAP"),
            allowed_lateness_ms=duration("ALLOWED_LATENESS", d.allowed_lateness_ms),
            idle_timeout_ms=optional_duration("IDLE_TIMEOUT"),
            late_topic=env.get("LATE_TOPIC") or None,
            metrics_file=env.get("METRICS_FILE") or None,
            rollups=_rollups(env.get("ROLLUPS", ",".join(d.rollups))),
            max_out_of_orderness_ms=duration("MAX_OUT_OF_ORDERNESS", d.max_out_of_orderness_ms),
            max_future_skew_ms=(d.max_future_skew_ms if not env.get("MAX_FUTURE_SKEW", "").strip()
                                else optional_duration("MAX_FUTURE_SKEW")),
            dedup_horizon_ms=duration("DEDUP_HORIZON", d.dedup_horizon_ms),
            shards=integer("TALLYFLOW_SHARDS", d.shards),
            sink_batch_rows=integer("SINK_BATCH_ROWS", d.sink_batch_rows),
            sink_flush_interval_ms=duration("SINK_FLUSH_INTERVAL", d.sink_flush_interval_ms),
            kafka_batch_size=integer("KAFKA_BATCH_SIZE", d.kafka_batch_size),
            redis_url=env.get("REDIS_URL", d.redis_url).strip(),
            enrich_fields=_enrich_fields(env.get("ENRICH_FIELDS", ",".join(d.enrich_fields))),
            enrich_cache_ttl_ms=duration("ENRICH_CACHE_TTL", d.enrich_cache_ttl_ms),
            quotas_file=env.get("QUOTAS_FILE") or None,
            alerts_topic=env.get("ALERTS_TOPIC", d.alerts_topic).strip() or d.alerts_topic,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Reject combinations that would make results wrong rather than slow."""
        if self.window_kind not in ("tumbling", "sliding", "session"):
            raise SettingsError(f"WINDOW_KIND: {self.window_kind!r} is not tumbling, sliding or session")
        if self.window_size_ms <= 0:
            raise SettingsError("WINDOW_SIZE: must be longer than 0")
        if self.window_kind == "sliding" and not self.window_slide_ms:
            raise SettingsError("WINDOW_SLIDE: sliding windows need a slide, e.g. 10s")
        if self.window_kind == "sliding" and self.window_slide_ms > self.window_size_ms:
            raise SettingsError("WINDOW_SLIDE: must not be longer than WINDOW_SIZE")
        if self.window_kind == "session" and not self.session_gap_ms:
            raise SettingsError("SESSION_GAP: session windows need a gap, e.g. 30m")
        span = self.session_gap_ms * 2 if self.window_kind == "session" else self.window_size_ms
        minimum_horizon = span + self.allowed_lateness_ms + self.max_out_of_orderness_ms
        if self.dedup_horizon_ms < minimum_horizon:
            raise SettingsError(
                "DEDUP_HORIZON: must cover the window (2 × SESSION_GAP for sessions) + "
                "ALLOWED_LATENESS + MAX_OUT_OF_ORDERNESS "
                f"({minimum_horizon} ms), or a duplicate could be counted twice; "
                f"got {self.dedup_horizon_ms} ms"
            )
        self.check_redis()

    def check_redis(self) -> None:
        """Redis settings that cannot work: a URL scheme redis-py does not speak, a field
        that would shadow a column of ``usage_aggregates``."""
        from sinks.schema import USAGE_AGGREGATES_COLUMNS

        if self.redis_url and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(f"REDIS_URL: use redis://host:port/db (or rediss://, unix://), "
                                f"got {redact_url(self.redis_url)!r}")
        clash = set(self.enrich_fields) & set(USAGE_AGGREGATES_COLUMNS)
        if clash:
            raise SettingsError(f"ENRICH_FIELDS: {sorted(clash)} would replace columns of "
                                "usage_aggregates; rename the fields")
        if self.quotas_file and not self.redis_url:
            raise SettingsError("QUOTAS_FILE: alerts need Redis (their fences); set REDIS_URL")

    def __repr__(self) -> str:
        """Every setting, URLs without their passwords (the Kafka secrets redact themselves)."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("clickhouse_url", "redis_url"):
            shown[name] = redact_url(shown[name])
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def redis_enabled(self) -> bool:
        """Redis features (enrichment, live totals, alerts) are on unless ``REDIS_URL`` is empty."""
        return bool(self.redis_url)

    @property
    def kafka(self) -> KafkaConnection:
        """How every Kafka client of the flow connects (bootstrap servers, TLS, SASL)."""
        return KafkaConnection(",".join(self.brokers), self.kafka_security)

    @property
    def brokers(self) -> list[str]:
        return [b.strip() for b in self.kafka_bootstrap_servers.split(",") if b.strip()]
