"""What a benchmark run does: its options, the traffic profiles, the flow shapes, the targets.

Standard library only (the Quix child imports this package under another venv).

    >>> [p.name for p in PROFILES.values()]
    ['low', 'high']
    >>> PROFILES["high"].keys
    10000000
    >>> FlowShape(workers=1, redis=True).name
    'tallyflow-w1-redis'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "bench-results"
QUIX_VENV = REPO_ROOT / ".venv-quix"
QUIX_REQUIREMENT = "quixstreams==3.28.1"

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the throughput stream's event time
PARTITIONS = 4
WINDOW_MS = 60_000
OUT_OF_ORDERNESS_MS = 10_000
SCALE = 10**18  # values are summed as integers scaled by 10**18, like the flow
FIXED_COST_RECORDS = 1_000  # the run that measures a contender's start-up and shut-down

# Targets of the benchmark issue. Reported against, never asserted.
TARGET_EVENTS_PER_S = 300_000
TARGET_RATIO_VS_BASELINE = 2.0  # the low-cardinality profile, Redis off
TARGET_RATIO_HIGH = 1.0  # the high-cardinality profile, Redis off (issue 14)
TARGET_RATIO_HIGH_REDIS = 0.6  # the high-cardinality profile with live totals (issue 14)
TARGET_SCALING = 1.8
TARGET_DEDUP_BYTES_PER_ID = 64
TARGET_LATENCY_SLACK_MS = 2_000  # p99 event->row <= window + lateness + this


@dataclass(frozen=True)
class TrafficProfile:
    """How many distinct keys the generated traffic has: ``organizations`` x ``customers`` x ``codes``.

    ``low`` is the historic stream (400 keys: a minute window is a few hundred rows whatever the
    rate); ``high`` is billing-like (10M keys: about one output row per event).
    """

    name: str
    organizations: int
    customers_per_org: int
    codes: int
    note: str = ""

    @property
    def keys(self) -> int:
        return self.organizations * self.customers_per_org * self.codes

    def code_names(self) -> tuple[str, ...]:
        """The event codes: the generator's four defaults, then ``code_05``, ``code_06``...

        >>> PROFILES["low"].code_names()
        ('api_calls', 'storage_gb', 'compute_seconds', 'egress_bytes')
        >>> PROFILES["high"].code_names()[4:6]
        ('code_05', 'code_06')
        """
        base = ("api_calls", "storage_gb", "compute_seconds", "egress_bytes")
        return (base + tuple(f"code_{i:02d}" for i in range(len(base) + 1, self.codes + 1)))[:self.codes]

    def describe(self) -> str:
        return (f"{self.organizations:,} orgs x {self.customers_per_org:,} customers x "
                f"{self.codes} codes ({self.keys:,} keys)")


PROFILES = {
    "low": TrafficProfile("low", 5, 20, 4, "400 keys: few rows per window"),
    "high": TrafficProfile("high", 200, 5_000, 10, "about one output row per event"),
}
"""The traffic profiles, by name; ``make bench`` runs both."""


@dataclass
class BenchOptions:
    """What one benchmark run does. ``quix``: "auto" (if .venv-quix works), "install", "skip"."""

    events: int = 1_000_000
    seed: int = 42
    workers: tuple[int, ...] = (1, 2)
    processes: int = 2  # also a cluster of this many 1-worker processes (0 or 1: none)
    http_scaling: bool = True  # also run each -w through the dev HTTP ClickHouse server
    quix: str = "auto"
    dedup_ids: int = 1_000_000
    latency: bool = True
    latency_rate: int = 50_000
    latency_seconds: float = 20.0
    latency_window_ms: int = 1_000
    latency_out_of_orderness_ms: int = 1_000
    latency_flush_interval: str = "250ms"  # SINK_FLUSH_INTERVAL of the latency run (default 2s)
    profile: bool = False
    profiles: tuple[str, ...] = ("low", "high")  # names in PROFILES; the first gets every shape
    live_totals: bool = True  # also a -w 1 run with Redis on (live totals), per profile
    redis_url: str = ""  # Redis for that run; empty: a private redis-server started for it
    scaling: bool = False  # run the scaling mode (1, 2, 4... processes) instead
    scaling_max_processes: int = 0  # 0: up to the cores available
    flow_env: dict[str, str] = field(default_factory=dict)  # overrides of FLOW_SETTINGS
    out_dir: Path = RESULTS_DIR
    keep: bool = False
    verbose: bool = True

    def shapes(self, profile: str = "low") -> list["FlowShape"]:
        """The first profile: chdb in process for each -w; then, if asked for, the same through
        the dev HTTP server, plus the process cluster (which needs it), to compare like with like.
        Later profiles: -w 1 only. Each profile: a -w 1 run with live totals (Redis on), last.

        >>> [s.name for s in BenchOptions(processes=0, http_scaling=False).shapes("high")]
        ['tallyflow-w1', 'tallyflow-w1-redis']
        """
        redis = [FlowShape(workers=1, redis=True)] if self.live_totals else []
        if profile != self.profiles[0]:
            return [FlowShape(workers=1), *redis]
        shapes = [FlowShape(workers=w) for w in self.workers]
        if self.http_scaling:
            shapes += [FlowShape(workers=w, sink="http") for w in self.workers]
        if self.processes > 1:
            shapes.append(FlowShape(processes=self.processes, sink="http"))
        return shapes + redis


FLOW_SETTINGS = {
    "KAFKA_STOP_AT_END": "1", "WINDOW_SIZE": f"{WINDOW_MS}ms",
    "MAX_OUT_OF_ORDERNESS": f"{OUT_OF_ORDERNESS_MS}ms", "LOG_LEVEL": "WARNING",
    "REDIS_URL": "",  # Redis features (live totals, enrichment) off unless --redis-url
    "METRICS_PORT": "0",  # no metrics server: runs side by side would fight over its port
}
"""What every benchmarked flow run sets; the rest are the flow's defaults."""


@dataclass(frozen=True)
class FlowShape:
    """How the flow runs: ``processes`` x ``workers`` (threads in a process), and its ClickHouse.

    ``sink="chdb"``: the engine inside the flow process (one process only); ``"http"``: the dev
    ClickHouse HTTP server in its own process, which a cluster of processes needs; ``"discard"``:
    a backend that drops every insert (the scaling mode: no output to check). ``redis``: live
    totals and enrichment on (``REDIS_URL`` set), else Redis is off.
    """

    workers: int = 1
    processes: int = 1
    sink: str = "chdb"
    redis: bool = False

    @property
    def name(self) -> str:
        name = f"tallyflow-w{self.workers}" if self.processes == 1 else (
            f"tallyflow-p{self.processes}" + (f"w{self.workers}" if self.workers > 1 else ""))
        name = name if self.sink == "chdb" else f"{name}-{self.sink}"
        return f"{name}-redis" if self.redis else name

    def describe(self) -> str:
        where = {"chdb": "chdb in the flow process",
                 "http": "through the dev ClickHouse HTTP server (a separate process)",
                 "discard": "ClickHouse writes discarded"}[self.sink]
        if self.redis:
            where += ", live totals in Redis"
        if self.processes == 1:
            return f"1 process, -w {self.workers}, {where}"
        return f"{self.processes} processes x -w {self.workers} (-i/-a), {where}"
