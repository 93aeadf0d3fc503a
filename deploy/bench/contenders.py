"""The contenders: the plain consumers, the real flow in each shape (checked against the
recomputation), Quix Streams; and the dedup store's memory. Standard library only at import."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from deploy.bench.process import (
    ChildRun,
    bench_child,
    check_run,
    dev_clickhouse,
    measure_child,
    measure_children,
    project_env,
    say,
)
from deploy.bench.settings import (
    FIXED_COST_RECORDS,
    FLOW_SETTINGS,
    PARTITIONS,
    QUIX_REQUIREMENT,
    QUIX_VENV,
    REPO_ROOT,
    START_MS,
    BenchOptions,
    FlowShape,
)


def contender_figures(name: str, events: int, run: ChildRun, fixed_seconds: float, **extra) -> dict:
    """Figures of one contender; ``fixed_seconds`` is its start-up and shut-down time."""
    steady_seconds = max(run.seconds - fixed_seconds, 1e-3)
    return {"name": name, "events": events, "seconds": round(run.seconds, 3),
            "events_per_s": round(events / run.seconds), "peak_rss_mb": round(run.peak_rss_mb, 1),
            "cpu_seconds": round(run.cpu_seconds, 2),
            "events_per_cpu_s": round(events / max(run.cpu_seconds, 1e-3)),
            "fixed_seconds": round(fixed_seconds, 3),
            "steady_events_per_s": round(events / steady_seconds), **extra}


PLAIN_CONSUMERS = {
    "baseline": ("_baseline", "confluent-kafka + json + dict (org, code, minute); no dedup, "
                              "no late handling, no output"),
    "read-ceiling": ("_read_ceiling", "confluent-kafka reading every record, no decode: what "
                                      "the broker and client deliver to one Python process here"),
}
"""The plain-consumer contenders: name -> (child role, what it does)."""


def run_baseline(bootstrap: str, topic: str, work: Path, options: BenchOptions,
                 name: str = "baseline") -> dict:
    """Run one plain consumer of :data:`PLAIN_CONSUMERS` over the whole topic."""
    role, note = PLAIN_CONSUMERS[name]
    out = work / f"{topic}-{name}.json"
    run = measure_child(bench_child(role, bootstrap, topic, out), log=work / f"{topic}-{name}.log",
                        env=project_env())
    check_run(run, f"the {name} consumer")
    report = json.loads(out.read_text())
    result = contender_figures(name, report["records"], run, run.seconds - report["loop_seconds"],
                               counted=report["counted"], rejected=report["rejected"], note=note)
    say(options, f"{name}: {result['events_per_s']:,} records/s ({run.seconds:.1f}s)")
    return result


def flow_env(bootstrap: str, topic: str, dlq_topic: str, clickhouse_url: str, **extra) -> dict:
    """Environment of a stop-at-end flow run (the settings contract of ``dataflows.settings``)."""
    settings = {
        **FLOW_SETTINGS, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "USAGE_TOPIC": topic,
        "DLQ_TOPIC": dlq_topic, "CLICKHOUSE_URL": clickhouse_url,
    }
    settings.update(extra)
    return project_env(**settings)


def flow_commands(workers: int, processes: int, recovery: Path) -> list[list[str]]:
    """``bytewax.run`` command lines: one process with ``workers``, or a cluster of processes."""
    from deploy.broker import free_port
    from deploy.runner import bytewax_command, init_recovery_store

    init_recovery_store(recovery)
    if processes == 1:
        return [bytewax_command(workers=workers, recovery_dir=recovery, snapshot_s=5, backup_s=30)]
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(processes)]
    return [bytewax_command(workers=workers, recovery_dir=recovery, snapshot_s=5, backup_s=30,
                            process_id=i, addresses=addresses) for i in range(processes)]


def flow_command(workers: int, recovery: Path) -> list[str]:
    return flow_commands(workers, 1, recovery)[0]


@contextmanager
def clickhouse_for(shape: FlowShape, data_dir: Path, log: Path) -> Iterator[str]:
    if shape.sink == "chdb":
        yield f"chdb://{data_dir}"
    elif shape.sink == "discard":
        yield "discard://"
    else:
        with dev_clickhouse(data_dir, log) as url:
            yield url


def run_flow_timed(shape: FlowShape, bootstrap: str, topic: str, url: str, work: Path,
                   name: str, overrides: dict[str, str], timeout: float) -> ChildRun:
    """One stop-at-end run of ``dataflows.usage:flow`` on ``topic``; DLQ topic ``<name>-dlq``."""
    from deploy.broker import ensure_topic

    ensure_topic(bootstrap, f"{name}-dlq", 1)
    env = flow_env(bootstrap, topic, f"{name}-dlq", url, **overrides)
    commands = flow_commands(shape.workers, shape.processes, work / f"{name}-recovery")
    logs = [work / f"{name}-{i}.log" for i in range(len(commands))]
    run = measure_children(commands, logs=logs, env=env, timeout=timeout)
    check_run(run, f"the dataflow ({name})")
    return run


def shape_settings(shape: FlowShape, options: BenchOptions, redis_url: str | None) -> dict[str, str]:
    """Flow settings of ``shape`` on top of ``--flow-env``: ``REDIS_URL`` for a live-totals run.

    >>> shape_settings(FlowShape(redis=True), BenchOptions(), "redis://h:1/0")["REDIS_URL"]
    'redis://h:1/0'
    """
    settings = dict(options.flow_env)
    if shape.redis:
        if not redis_url:
            raise ValueError(f"{shape.name} needs a Redis URL")
        settings["REDIS_URL"] = redis_url
    return settings


def flush_redis(url: str) -> None:
    """Empty the bench's Redis so that each live-totals run starts from nothing."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def run_tallyflow(bootstrap: str, topic: str, work: Path, shape: FlowShape, stream: dict,
                  options: BenchOptions, redis_url: str | None = None) -> tuple[dict, dict]:
    """One measured run of the real flow in ``shape``; its figures and its correctness.

    A run that fails or does not exit in time is reported (``failed``), not raised: the
    other contenders are still worth having.
    """
    name = shape.name
    timeout = 120 + options.events / 5_000  # >= 5k records/s, or it is stuck
    settings = shape_settings(shape, options, redis_url)
    try:
        if shape.redis:
            flush_redis(settings["REDIS_URL"])
        fixed = measure_fixed_cost(bootstrap, topic, work, shape, settings)
        if shape.redis:
            flush_redis(settings["REDIS_URL"])
        with clickhouse_for(shape, work / f"{topic}-{name}-clickhouse",
                            work / f"{topic}-{name}-server.log") as url:
            run = run_flow_timed(shape, bootstrap, topic, url, work, f"{topic}-{name}",
                                 settings, timeout)
            check = check_output(url, bootstrap, f"{topic}-{name}-dlq", stream)
    except (RuntimeError, TimeoutError) as err:
        lines = str(err).strip().splitlines()
        reason = " / ".join(dict.fromkeys(lines[:1] + lines[-2:]))  # first and last lines, once
        say(options, f"{name}: FAILED: {reason}")
        failed = {"name": name, "failed": reason, "shape": shape.describe()}
        return failed, {"ok": False, "error": reason}
    result = contender_figures(
        name, stream["info"]["records"], run, fixed.seconds, workers=shape.workers,
        processes=shape.processes, sink=shape.sink, redis=shape.redis, shape=shape.describe(),
        peak_rss_mb_each=[round(m, 1) for m in run.peak_rss_mb_each],
        counted=check["counted"], correct=check["ok"],
        **memory_and_rows(run, fixed, check["rows_written"], stream["info"]["open_window_keys"]))
    say(options, f"{name}: {result['events_per_s']:,} records/s ({run.seconds:.1f}s), "
                 f"{result['rows_per_s']:,} rows/s, peak RSS {result['peak_rss_mb']:.0f} MB "
                 f"({result['rss_bytes_per_open_key']:,.0f} B per open window key), "
                 f"correct={check['ok']}")
    return result, check


def memory_and_rows(run: ChildRun, fixed: ChildRun, rows_written: int, open_keys: int) -> dict:
    """Rows written per second, and the peak RSS above the tiny run's per open window key.

    The tiny run (start-up and shut-down on 1,000 records) holds the interpreter, Bytewax,
    chdb and the clients; what the big run holds above it is its state: open windows, the
    dedup store's ids, buffers. So the per-key figure includes the dedup ids (see the dedup
    figure for their share).

    >>> big = ChildRun(10.0, 600.0, 0, Path("x"))
    >>> memory_and_rows(big, ChildRun(2.0, 200.0, 0, Path("y")), 500_000, 1_000_000)
    {'rows_written': 500000, 'rows_per_s': 50000, 'rss_above_tiny_run_mb': 400.0, 'rss_bytes_per_open_key': 419}
    """
    above_mb = max(run.peak_rss_mb - fixed.peak_rss_mb, 0.0)
    return {"rows_written": rows_written, "rows_per_s": round(rows_written / run.seconds),
            "rss_above_tiny_run_mb": round(above_mb, 1),
            "rss_bytes_per_open_key": round(above_mb * 2**20 / max(open_keys, 1))}


def measure_fixed_cost(bootstrap: str, topic: str, work: Path, shape: FlowShape,
                       overrides: dict[str, str]) -> ChildRun:
    """The same flow over a tiny topic: start-up and shut-down (seconds, peak RSS), nearly alone.

    Not an empty topic: Bytewax builds a sink partition (and so opens chdb and creates the
    tables) only when the first item reaches it.
    """
    from deploy.broker import ensure_topic, topic_partitions
    from deploy.generator import generate, produce

    tiny = f"{topic}-tiny"
    if topic_partitions(bootstrap, tiny) is None:
        ensure_topic(bootstrap, tiny, PARTITIONS)
        produce(bootstrap, tiny, generate(FIXED_COST_RECORDS, seed=1, partitions=PARTITIONS,
                                          start_ms=START_MS))
    name = f"{tiny}-{shape.name}"
    with clickhouse_for(shape, work / f"{name}-clickhouse", work / f"{name}-server.log") as url:
        return run_flow_timed(shape, bootstrap, tiny, url, work, name, overrides, 90)


def check_output(url: str, bootstrap: str, dlq_topic: str, stream: dict) -> dict:
    """Compare what the flow wrote with the recomputation from the raw topic."""
    from recovery.reconcile import diff, read_aggregates, read_topic
    from sinks.clickhouse_backend import connect

    expected = stream["expected"]
    backend = connect(url)
    try:
        actual = read_aggregates(backend)
        _, [(late_rows,)] = backend.query("SELECT count() FROM usage_late_events FINAL")
        rows_written = int(late_rows) + sum(
            int(backend.query(f"SELECT count() FROM {table} FINAL")[1][0][0])
            for table in ("usage_aggregates", "usage_aggregates_hourly", "usage_aggregates_daily"))
    finally:
        backend.close()
    differences = diff(expected.aggregates, actual)
    dead_letters = len(read_topic(bootstrap, dlq_topic, timeout_s=300))
    counted = sum(count for count, _ in actual.values())
    check = {
        "counted": counted, "expected_counted": stream["info"]["counted"],
        "aggregate_rows": len(actual), "expected_aggregate_rows": len(expected.aggregates),
        "differing_rows": len(differences), "late_rows": int(late_rows),
        "expected_late_rows": len(expected.late), "dead_letters": dead_letters,
        "expected_dead_letters": len(expected.invalid),
        "rows_written": rows_written,  # final rows of the aggregate, rollup and late tables
    }
    check["ok"] = (not differences and counted == check["expected_counted"]
                   and check["late_rows"] == check["expected_late_rows"]
                   and dead_letters == check["expected_dead_letters"])
    if differences:
        check["first_differences"] = [str(d) for d in differences[:3]]
    return check


def quix_python(options: BenchOptions) -> tuple[Path | None, str]:
    """The .venv-quix interpreter if it can import quixstreams (creating it on "install")."""
    python = QUIX_VENV / "bin" / "python"
    if options.quix == "skip":
        return None, "skipped (--no-quix)"
    if options.quix == "install" and not _quix_works(python):
        say(options, f"creating {QUIX_VENV} with {QUIX_REQUIREMENT} …")
        base = shutil.which("python3.11") or shutil.which("python3") or sys.executable
        subprocess.run([base, "-m", "venv", str(QUIX_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", QUIX_REQUIREMENT], check=True)
    if _quix_works(python):
        return python, ""
    return None, (f"skipped: no {QUIX_VENV.name}/ with quixstreams (make bench-quix, "
                  "or tallyflow bench --with-quix)")


def _quix_works(python: Path) -> bool:
    if not python.exists():
        return False
    probe = subprocess.run([str(python), "-c", "import quixstreams"], capture_output=True)
    return probe.returncode == 0


def _quix_version(python: Path) -> str:
    probe = subprocess.run([str(python), "-c", "import quixstreams, confluent_kafka; "
                            "print(quixstreams.__version__, confluent_kafka.version()[0])"],
                           capture_output=True, text=True)
    return probe.stdout.strip()


def run_quix(bootstrap: str, topic: str, work: Path, options: BenchOptions) -> dict:
    python, note = quix_python(options)
    if python is None:
        say(options, f"quix: {note}")
        return {"name": "quix", "skipped": note}
    out = work / "quix.json"
    command = [str(python), "-m", "deploy.bench.quix_app", bootstrap, topic,
               str(options.events), str(out), str(work / "quix-state")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        run = measure_child(command, log=work / "quix.log", env=env, cwd=REPO_ROOT,
                            timeout=120 + options.events / 5_000)
        check_run(run, "the Quix Streams app")
    except (RuntimeError, TimeoutError) as err:
        lines = str(err).strip().splitlines()
        reason = " / ".join(dict.fromkeys(lines[:1] + lines[-1:]))
        say(options, f"quix: FAILED: {reason}")
        return {"name": "quix", "failed": reason}
    report = json.loads(out.read_text())
    processing = report["loop_seconds"] - (report["first_record_after_s"] or 0)
    result = contender_figures("quix", report["records"], run, run.seconds - processing,
                               versions=_quix_version(python),
                               first_record_after_s=report["first_record_after_s"],
                               complete=report["records"] == options.events,
                               note="Quix Streams tumbling 1m reduce per message key (org:customer) "
                                    "into {code: [count, exact sum]}; changelog topics on, "
                                    "at-least-once; session.timeout.ms 6000 (Tansu makes a group "
                                    "join wait about half of it); stops after reading every record")
    say(options, f"quix: {result['events_per_s']:,} records/s ({run.seconds:.1f}s)")
    return result


def measure_dedup(ids: int, work: Path, options: BenchOptions) -> dict:
    out = work / "dedup.json"
    run = measure_child(bench_child("_dedup", ids, out), log=work / "dedup.log", env=project_env())
    check_run(run, "the dedup measurement")
    report = json.loads(out.read_text())
    report["method"] = ("RSS growth of a fresh child (/proc/self/statm) while the shard's "
                        "CountedCopies(24h) counts N distinct digests in batches of 5,000 "
                        "(as a shard decides them), divided by N; tracemalloc figure from a second "
                        "store in the same child; snapshot = bytes of its digest and time columns")
    say(options, f"dedup: {report['rss_bytes_per_id']:.1f} B/id RSS, "
                  f"{report['tracemalloc_bytes_per_id']:.1f} B/id tracemalloc")
    return report


