"""The settings reconcile recomputes with: the flow's, read from its one Settings object.

Reconcile imports nothing of the flow's logic, so it takes the flow's ``Settings``
(or any object with the same attributes) and keeps only what decides the totals::

    >>> from types import SimpleNamespace
    >>> flow_settings = SimpleNamespace(window_kind="sliding", window_size_ms=60_000,
    ...     window_slide_ms=20_000, session_gap_ms=None, allowed_lateness_ms=0,
    ...     max_out_of_orderness_ms=10_000, dedup_horizon_ms=86_400_000, rollups=("hour",),
    ...     metrics_file=None, max_future_skew_ms=3_600_000)
    >>> rules = Rules.from_settings(flow_settings)
    >>> rules.window_starts(65_000), rules.last_window_end(65_000)
    ([20000, 40000, 60000], 120000)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from recovery.reconcile.catalog import MetricSpec, parse_catalog, read_catalog
from recovery.reconcile.windows import DAY_MS, Windows


@dataclass(frozen=True)
class Rules:
    """Everything that decides the flow's tables, as reconcile understands it."""

    windows: Windows = field(default_factory=Windows)
    allowed_lateness_ms: int = 0
    max_out_of_orderness_ms: int = 10_000
    dedup_horizon_ms: int = DAY_MS
    rollups: tuple[str, ...] = ("hour", "day")
    metrics: tuple[MetricSpec, ...] = ()
    metrics_skipped: tuple[str, ...] = ()  # catalog metrics reconcile cannot recompute
    max_future_skew_ms: int | None = None  # None: no check

    @classmethod
    def from_settings(cls, settings) -> "Rules":
        """The rules of the flow run with ``settings`` (the flow's ``Settings``)."""
        metrics, skipped = read_catalog(settings.metrics_file) if settings.metrics_file else ((), ())
        return cls(
            Windows(settings.window_kind, settings.window_size_ms, settings.window_slide_ms,
                    settings.session_gap_ms),
            settings.allowed_lateness_ms, settings.max_out_of_orderness_ms,
            settings.dedup_horizon_ms, tuple(settings.rollups), metrics, skipped,
            getattr(settings, "max_future_skew_ms", None))

    @classmethod
    def of(cls, *, window_size_ms: int = 60_000, max_out_of_orderness_ms: int = 10_000,
           allowed_lateness_ms: int = 0, window_kind: str = "tumbling",
           window_slide_ms: int | None = None, session_gap_ms: int | None = None,
           dedup_horizon_ms: int = DAY_MS, rollups: tuple[str, ...] = ("hour", "day"),
           catalog_text: str | None = None, max_future_skew_ms: int | None = None) -> "Rules":
        """Rules from keyword settings (tests and scripts)."""
        metrics, skipped = parse_catalog(catalog_text) if catalog_text else ((), ())
        return cls(Windows(window_kind, window_size_ms, window_slide_ms, session_gap_ms),
                   allowed_lateness_ms, max_out_of_orderness_ms, dedup_horizon_ms, tuple(rollups),
                   metrics, skipped, max_future_skew_ms)

    def window_starts(self, timestamp_ms: int) -> list[int]:
        return self.windows.starts(timestamp_ms)

    def last_window_end(self, timestamp_ms: int) -> int:
        return self.windows.last_end(timestamp_ms)
