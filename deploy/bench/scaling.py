"""Scaling mode (``--scaling``): the flow as a Bytewax cluster of 1, 2, 4... one-worker processes.

Each profile gets its own stream with as many partitions as the largest cluster has processes
(at least 4), so every process owns input. The plain consumer runs once per profile as the
reference; then each cluster size reads the whole stream in stop-at-end mode with a recovery
store, Redis off, and ``CLICKHOUSE_URL=discard://``: a backend that accepts and drops every
insert, so the figure is the flow's own throughput and not that of a ClickHouse stand-in
sharing the machine (one chdb process per data directory would otherwise serialise the
cluster's writes through the dev HTTP server). Nothing is written, so these runs are not
checked against the recomputation; the main runs are. Standard library only at import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from deploy.bench.contenders import contender_figures, run_baseline, run_flow_timed
from deploy.bench.process import say
from deploy.bench.settings import PARTITIONS, PROFILES, START_MS, BenchOptions, FlowShape


def process_counts(largest: int) -> list[int]:
    """1, 2, 4, 8... up to ``largest``, and ``largest`` itself.

    >>> process_counts(1), process_counts(2), process_counts(12)
    ([1], [1, 2], [1, 2, 4, 8, 12])
    """
    counts, n = [], 1
    while n < largest:
        counts.append(n)
        n *= 2
    return counts + [max(largest, 1)]


def cores_available() -> int:
    return len(os.sched_getaffinity(0))


def run_scaling(options: BenchOptions) -> dict:
    """Every cluster size of every profile; the results (also written as JSON)."""
    from deploy.bench.orchestration import _header, write_results
    from deploy.broker import DevBroker

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix=f"tallyflow-scaling-{stamp}-"))
    cores = cores_available()
    largest = options.scaling_max_processes or cores
    results = {**_header(options, work), "mode": "scaling", "cores": cores,
               "process_counts": process_counts(largest), "profiles": {}}
    partitions = max(PARTITIONS, largest)
    say(options, f"scaling mode: {cores} cores available; clusters of {results['process_counts']} "
                 f"processes x -w 1 over {partitions} partitions; ClickHouse writes discarded")
    try:
        with DevBroker(log_path=work / "broker.log") as broker:
            for name in options.profiles:
                topic = f"scaling-{name}-{stamp.lower()}"
                _produce(broker.bootstrap, topic, name, partitions, options)
                results["profiles"][name] = scaling_profile(
                    broker.bootstrap, topic, work, results["process_counts"], options)
        return write_results(results, options, stamp)
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


def _produce(bootstrap: str, topic: str, profile_name: str, partitions: int,
             options: BenchOptions) -> None:
    from deploy.broker import ensure_topic
    from deploy.generator import generate, produce

    profile = PROFILES[profile_name]
    ensure_topic(bootstrap, topic, partitions)
    produce(bootstrap, topic, generate(
        options.events, seed=options.seed, partitions=partitions, start_ms=START_MS,
        organizations=profile.organizations, customers_per_org=profile.customers_per_org,
        codes=profile.code_names(), span_ms=600_000, duplicate_share=0.02,
        malformed_share=0.001, very_late_share=0.001), total=options.events)


def scaling_profile(bootstrap: str, topic: str, work: Path, counts: list[int],
                    options: BenchOptions) -> dict:
    """The plain consumer, then each cluster size, on one stream; factors over one process."""
    baseline = run_baseline(bootstrap, topic, work, options)
    runs = []
    for n in counts:
        shape = FlowShape(processes=n, sink="discard")
        name = f"{topic}-{shape.name}"
        run = run_flow_timed(shape, bootstrap, topic, "discard://", work, name, options.flow_env,
                             timeout=120 + options.events / 2_000)
        figures = contender_figures(shape.name, options.events, run, 0.0, processes=n,
                                    shape=shape.describe(),
                                    peak_rss_mb_each=[round(m, 1) for m in run.peak_rss_mb_each])
        runs.append(figures)
        say(options, f"{shape.name}: {figures['events_per_s']:,} events/s ({run.seconds:.1f}s)")
    return {"baseline": baseline, "runs": with_factors(runs, baseline["events_per_s"])}


def with_factors(runs: list[dict], baseline_events_per_s: int) -> list[dict]:
    """Add each run's factor over the one-process run and its ratio over the plain consumer.

    >>> with_factors([{"events_per_s": 10}, {"events_per_s": 25}], 20)
    [{'events_per_s': 10, 'factor_over_one': 1.0, 'ratio_vs_baseline': 0.5}, {'events_per_s': 25, 'factor_over_one': 2.5, 'ratio_vs_baseline': 1.25}]
    """
    one = runs[0]["events_per_s"]
    for run in runs:
        run["factor_over_one"] = round(run["events_per_s"] / one, 3)
        run["ratio_vs_baseline"] = round(run["events_per_s"] / baseline_events_per_s, 3)
    return runs


def format_scaling(results: dict) -> str:
    """The scaling mode's printout: per profile, events/s and the factor per cluster size."""
    from state.text_table import format_table

    parts = [f"scaling mode: {results['cores']} cores available here; clusters of one-worker "
             f"processes; ClickHouse writes discarded (discard://), Redis off, recovery on"]
    for name, section in results["profiles"].items():
        baseline = section["baseline"]
        rows = [("plain consumer, 1 process", f"{baseline['events_per_s']:,}", "", "1.00x",
                 f"{baseline.get('cpu_seconds', 0):.1f}")]
        rows += [(f"tallyflow, {r['processes']} process(es)", f"{r['events_per_s']:,}",
                  f"{r['factor_over_one']:.2f}x", f"{r['ratio_vs_baseline']:.2f}x",
                  f"{r.get('cpu_seconds', 0):.1f}")
                 for r in section["runs"]]
        parts.append(f"== {name}-cardinality profile\n" + format_table(
            ["run", "events/s", "factor over 1 process", "vs plain consumer", "CPU s (all processes)"],
            rows))
    parts.append(f"results: {results.get('json_path', '(not written)')}")
    return "\n\n".join(parts)
