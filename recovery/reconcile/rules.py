"""The settings reconcile recomputes with: the flow's, read from its one Settings object.

Reconcile imports nothing of the flow's logic, so it takes the flow's ``Settings``
(``dataflows.settings``, a layer above; any object with its ``windows`` and ``dedup``
sections will do) and keeps only what decides the totals::

    >>> from types import SimpleNamespace
    >>> flow_settings = SimpleNamespace(dedup=SimpleNamespace(horizon_ms=86_400_000),
    ...     windows=SimpleNamespace(kind="sliding", size_ms=60_000, slide_ms=20_000, gap_ms=None,
    ...         allowed_lateness_ms=0, max_out_of_orderness_ms=10_000, max_future_skew_ms=3_600_000,
    ...         rollups=("hour",), metrics_file=None))
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
        """The rules of the flow run with ``settings`` (the flow's ``Settings``: its ``windows``
        and ``dedup`` sections)."""
        windows = settings.windows
        metrics, skipped = read_catalog(windows.metrics_file) if windows.metrics_file else ((), ())
        return cls(
            Windows(windows.kind, windows.size_ms, windows.slide_ms, windows.gap_ms),
            windows.allowed_lateness_ms, windows.max_out_of_orderness_ms, settings.dedup.horizon_ms,
            tuple(windows.rollups), metrics, skipped, windows.max_future_skew_ms)

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
