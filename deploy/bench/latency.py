"""Event->row latency of a tail-mode flow at a steady produce rate. Standard library only at import."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path

from deploy.bench.contenders import flow_command, flow_env
from deploy.bench.process import bench_child, dev_clickhouse, spawn, stop_process, tail_of
from deploy.bench.settings import PARTITIONS, BenchOptions


def measure_latency(broker, work: Path, options: BenchOptions) -> dict:
    """Tail-mode flow, HTTP ClickHouse stand-in, steady producer; when each row becomes visible.

    Event times follow the producer's wall clock, so a row of window ``[w, w + size)`` can be
    visible at ``w + size + out_of_orderness`` at the earliest; the latency of its first event is
    ``visible - w``. Only windows that close while production still runs, after a warm-up, count.
    """
    from deploy.broker import ensure_topic

    rate, seconds = options.latency_rate, options.latency_seconds
    window, ooo = options.latency_window_ms, options.latency_out_of_orderness_ms
    count = int(rate * seconds)
    topic = f"bench-latency-{uuid.uuid4().hex[:8]}"
    ensure_topic(broker.bootstrap, topic, PARTITIONS)
    ensure_topic(broker.bootstrap, f"{topic}-dlq", 1)
    processes: list[subprocess.Popen] = []
    with dev_clickhouse(work / "latency-clickhouse", work / "latency-server.log") as url:
        try:
            start_at_ms = int(time.time() * 1000 + 6_000 + count / 60)  # after generating `count`
            producer_out = work / "latency-producer.json"
            producer = spawn(bench_child("_produce", broker.bootstrap, topic, rate, seconds,
                                           start_at_ms, producer_out),
                              work / "latency-producer.log", processes)
            env = flow_env(broker.bootstrap, topic, f"{topic}-dlq", url, **{
                "SINK_FLUSH_INTERVAL": options.latency_flush_interval,
                **options.flow_env, "KAFKA_STOP_AT_END": "0", "WINDOW_SIZE": f"{window}ms",
                "MAX_OUT_OF_ORDERNESS": f"{ooo}ms"})
            flow = spawn(flow_command(1, work / "latency-recovery"), work / "latency-flow.log",
                          processes, env)
            seen = _poll_rows(url, flow, producer, window, ooo)
            report = json.loads(producer_out.read_text())
        finally:
            for process in reversed(processes):
                stop_process(process)
    summary = _latency_summary(seen, report, rate, window, ooo, count)
    summary["sink_flush_interval"] = options.flow_env.get("SINK_FLUSH_INTERVAL", options.latency_flush_interval)
    return summary


LATENCY_SQL = ("SELECT toUnixTimestamp64Milli(window_start) AS w, "
               "uniqExact(organization_id, external_customer_id, code) AS n "
               "FROM usage_aggregates GROUP BY w")


def _poll_rows(url: str, flow: subprocess.Popen, producer: subprocess.Popen, window: int,
               ooo: int) -> list[tuple[int, float]]:
    """(window start, wall ms when the row was first seen), one pair per row, until the drain."""
    from sinks.clickhouse_backend import ClickHouseError, connect

    backend = connect(url)
    visible: dict[int, int] = {}
    seen: list[tuple[int, float]] = []
    drain_until = None
    try:
        while drain_until is None or time.time() < drain_until:
            for process, what in ((flow, "flow"), (producer, "producer")):
                code = process.poll()
                if code not in (None, 0) or (process is flow and code is not None):
                    raise RuntimeError(f"latency {what} exited with {code}: "
                                       f"{tail_of(process.log)}")  # type: ignore[attr-defined]
            if drain_until is None and producer.poll() == 0:
                drain_until = time.time() + (window + ooo) / 1000 + 5
            try:
                _, rows = backend.query(LATENCY_SQL)
            except ClickHouseError:  # the flow has not created its tables yet
                rows = []
            now_ms = time.time() * 1000
            for start, n in rows:
                start, n = int(start), int(n)
                seen.extend((start, now_ms) for _ in range(n - visible.get(start, 0)))
                visible[start] = max(n, visible.get(start, 0))
            time.sleep(0.1)
    finally:
        backend.close()
    return seen


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _latency_summary(seen: list[tuple[int, float]], producer: dict, rate: int, window: int,
                     ooo: int, count: int) -> dict:
    # Event time runs from start_at_ms; windows must close (end + lateness) while production runs.
    start, end = producer["start_at_ms"], min(producer["finished_ms"], producer["end_at_ms"])
    warmup_ms = 3_000
    steady = [(w, t) for w, t in seen if w >= start + warmup_ms and w + window + ooo + 500 <= end]
    summary = {
        "measured": bool(steady), "rate": rate, "records": count, "window_ms": window,
        "out_of_orderness_ms": ooo,
        "producer_started_late_ms": producer["started_late_ms"],
        "producer_seconds": round((producer["finished_ms"] - producer["started_ms"]) / 1000, 2),
        "producer_rate": round(count / max((producer["finished_ms"] - producer["started_ms"]) / 1000,
                                           1e-9)),
        "rows_measured": len(steady), "windows_measured": len({w for w, _ in steady}),
        "method": ("tail-mode flow (-w 1, recovery -s 5) -> dev ClickHouse HTTP server; steady "
                   "producer whose event time follows its wall clock; rows polled every 100 ms "
                   "(uniqExact per window); latency = visible - window start; overhead = "
                   "visible - (window end + out-of-orderness); windows after a 3 s warm-up "
                   "that close while production runs"),
    }
    if not steady:
        summary["reason"] = "no window closed during steady production (the flow fell behind?)"
        return summary
    latency = [t - w for w, t in steady]
    overhead = [t - (w + window + ooo) for w, t in steady]
    for name, values in (("event_to_row_ms", latency), ("overhead_ms", overhead)):
        summary[name] = {"p50": round(_percentile(values, 0.5)), "p99": round(_percentile(values, 0.99)),
                         "max": round(max(values))}
    return summary


