"""`make bench` / `tallyflow bench`: throughput, memory and latency of the usage flow, in one run.

One generated stream (``--events`` records over 4 partitions, a few duplicates, malformed and
very late ones) is produced once into a local dev broker; then each contender reads all of it,
in its own child process, timed from process start to exit, its peak RSS taken from
``os.wait4`` (the kernel's ``ru_maxrss`` for exactly that child):

- ``baseline``: a plain confluent-kafka consumer, ``json`` and a dict of (org, code, minute) ->
  [count, exact scaled-integer sum], read to partition EOF (not end offsets: FIELD-NOTES);
- ``read-ceiling``: the same consumer with no decoding at all, to show how fast records can
  reach one Python process here (what no contender can beat on this broker);
- ``tallyflow-wN``: ``python -m bytewax.run dataflows.usage:flow -w N`` in stop-at-end mode on an
  embedded chdb directory with a recovery store (``-s 5 -b 30``), then checked against
  ``recovery.reconcile.recompute`` of the raw topic, so a fast but wrong run is flagged;
- ``quix``: Quix Streams 3.28 (its own venv ``.venv-quix``, see ``--with-quix``), a tumbling
  1-minute count+sum per message key (org:customer) and code, on the same topic to the end.

It also measures the dedup store's memory per remembered transaction id (in a child) and,
unless ``--no-latency``, the event->row latency of a tail-mode flow at a steady produce rate.
Results print as a table with the targets (PASS/MISS and the gap) and land as JSON in
``bench-results/bench-<UTC time>.json``. From Python::

    from deploy.bench import BenchOptions, run_bench
    results = run_bench(BenchOptions(events=5_000, workers=(1,), quix="skip", latency=False))
    results["correctness"]["tallyflow-w1"]["ok"]

This module imports only the standard library at the top: the Quix child runs it as a plain
script under ``.venv-quix/bin/python`` (``python deploy/bench.py _quix …``), where the project's
dependencies are absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent
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
TARGET_RATIO_VS_BASELINE = 2.0
TARGET_SCALING = 1.8
TARGET_DEDUP_BYTES_PER_ID = 64
TARGET_LATENCY_SLACK_MS = 2_000  # p99 event->row <= window + lateness + this


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
    flow_env: dict[str, str] = field(default_factory=dict)  # overrides of FLOW_SETTINGS
    out_dir: Path = RESULTS_DIR
    keep: bool = False
    verbose: bool = True

    def shapes(self) -> list["FlowShape"]:
        """chdb in process for each -w; then, if scaling is asked for, the same through the
        dev HTTP server, plus the process cluster (which needs it), to compare like with like."""
        shapes = [FlowShape(workers=w) for w in self.workers]
        if self.http_scaling:
            shapes += [FlowShape(workers=w, sink="http") for w in self.workers]
        if self.processes > 1:
            shapes.append(FlowShape(processes=self.processes, sink="http"))
        return shapes


# ---------------------------------------------------------------- helpers shared with the children


def scaled_value(value: object) -> int:
    """A JSON event ``value`` (None, int, or decimal text) as an exact integer * 10**18.

    >>> scaled_value("1.5"), scaled_value(2), scaled_value(None)
    (1500000000000000000, 2000000000000000000, 0)
    """
    if value is None:
        return 0
    if type(value) is int:
        return value * SCALE
    if type(value) is not str:
        raise ValueError(f"not a number: {value!r}")
    whole, _, fraction = value.partition(".")
    if len(fraction) > 18 or not whole.isdigit() or (fraction and not fraction.isdigit()):
        raise ValueError(f"not a plain decimal: {value!r}")
    return int(whole) * SCALE + (int(fraction.ljust(18, "0")) if fraction else 0)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)


def event_time_ms(timestamp: object) -> int:
    """Epoch ms from an event's ``timestamp`` (epoch ms or RFC 3339 with an offset)."""
    if type(timestamp) is int:
        return timestamp
    if type(timestamp) is not str:
        raise ValueError(f"not a timestamp: {timestamp!r}")
    moment = datetime.fromisoformat(timestamp)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp without offset: {timestamp!r}")
    return (moment - _EPOCH) // _ONE_MS


# ---------------------------------------------------------------- running and measuring children


@dataclass
class ChildRun:
    """Finished child processes: wall seconds from the first spawn to the last exit, the sum of
    their peak RSS, the first non-zero exit status (else 0)."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    log: Path
    peak_rss_mb_each: list[float] = field(default_factory=list)


def measure_child(command: list[str], *, log: Path, env: dict | None = None,
                  timeout: float = 1_800, cwd: Path = REPO_ROOT) -> ChildRun:
    """Run ``command`` to its exit, timing it and sampling its peak RSS."""
    return measure_children([command], logs=[log], env=env, timeout=timeout, cwd=cwd)


def peak_rss_bytes(pid: int) -> int | None:
    """``VmHWM`` of a live process: the peak RSS of its current program image.

    Not ``ru_maxrss`` from wait4: Linux carries the forking parent's peak into the child's
    across exec, so every child of a big benchmark process would report at least its size.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_children(commands: list[list[str]], *, logs: list[Path], env: dict | None = None,
                     timeout: float = 1_800, cwd: Path = REPO_ROOT) -> ChildRun:
    """Run ``commands`` side by side until all exit (one failing stops the others).

    Peak RSS is ``VmHWM`` sampled every 5 ms while each child lives (growth in its last few
    milliseconds can be missed).
    """
    started = time.perf_counter()
    processes = []
    for command, log in zip(commands, logs):
        with open(log, "ab") as out:
            processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=subprocess.STDOUT))
    peaks = {process.pid: 0 for process in processes}
    running = {process.pid: process for process in processes}
    returncode = 0
    while running:
        if time.perf_counter() > started + timeout:
            _kill_all(running.values())
            for process in running.values():
                process.wait()
            what = " ".join(Path(commands[0][0]).name if i == 0 else str(a)
                            for i, a in enumerate(commands[0][:6]))
            raise TimeoutError(f"{what} did not exit within {timeout:g}s; log {logs[0]}")
        for pid, process in list(running.items()):
            peaks[pid] = max(peaks[pid], peak_rss_bytes(pid) or 0)
            if process.poll() is None:
                continue
            del running[pid]
            if process.returncode and not returncode:
                returncode = process.returncode
                _kill_all(running.values())
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    each = [peaks[process.pid] / 2**20 for process in processes]
    return ChildRun(seconds, sum(each), returncode, logs[0], each)


def _kill_all(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()


def _tail(path: Path, limit: int = 3_000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def _check(run: ChildRun, what: str) -> None:
    if run.returncode != 0:
        raise RuntimeError(f"{what} exited with {run.returncode}; log {run.log}:\n{_tail(run.log)}")


def _bench_child(role: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "deploy.bench", role, *map(str, args)]


def _project_env(**extra: object) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _say(options: BenchOptions, text: str) -> None:
    if options.verbose:
        print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the benchmark


def run_bench(options: BenchOptions) -> dict:
    """Run every measurement of ``options``; return the results (also written as JSON)."""
    from deploy.broker import DevBroker

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix=f"tallyflow-bench-{stamp}-"))
    results: dict = {
        "schema": 1,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "work_dir": str(work) if options.keep else None,
        "flow_settings": {**FLOW_SETTINGS, **options.flow_env},
    }
    try:
        with DevBroker(log_path=work / "broker.log") as broker:
            _say(options, f"dev broker on {broker.bootstrap}; work dir {work}")
            topic = f"bench-usage-{stamp.lower()}"
            stream = produce_stream(broker.bootstrap, topic, options, results)
            contenders = [run_baseline(broker.bootstrap, topic, work, options),
                          run_baseline(broker.bootstrap, topic, work, options, "read-ceiling")]
            results["correctness"] = {}
            for shape in options.shapes():
                run, check = run_tallyflow(broker.bootstrap, topic, work, shape, stream, options)
                contenders.append(run)
                results["correctness"][run["name"]] = check
            quix = run_quix(broker.bootstrap, topic, work, options)
            if quix is not None:
                contenders.append(quix)
            results["contenders"] = _with_ratios(contenders)
            results["dedup"] = measure_dedup(options.dedup_ids, work, options)
            results["latency"] = (measure_latency(broker, work, options) if options.latency
                                  else {"measured": False, "reason": "skipped (--no-latency)"})
            if options.profile:
                results["profile"] = profile_flow(broker.bootstrap, topic, work, stamp, options)
        results["scaling"] = _scaling(results["contenders"])
        results["targets"] = evaluate_targets(results)
        options.out_dir.mkdir(parents=True, exist_ok=True)
        path = options.out_dir / f"bench-{stamp}.json"
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        results["json_path"] = str(path)
        return results
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


def produce_stream(bootstrap: str, topic: str, options: BenchOptions, results: dict) -> dict:
    """Produce the stream once, read it back to EOF, recompute what the flow must write."""
    from deploy.broker import ensure_topic
    from deploy.generator import generate, produce
    from recovery.reconcile import read_topic, recompute

    ensure_topic(bootstrap, topic, PARTITIONS)
    started = time.perf_counter()
    kinds = produce(bootstrap, topic, generate(
        options.events, seed=options.seed, partitions=PARTITIONS, start_ms=START_MS,
        span_ms=600_000, duplicate_share=0.02, malformed_share=0.001, very_late_share=0.001,
    ), total=options.events)
    produce_s = time.perf_counter() - started
    _say(options, f"produced {options.events:,} records in {produce_s:.1f}s: {kinds}")
    raw = read_topic(bootstrap, topic, timeout_s=900)
    if len(raw) != options.events:
        raise RuntimeError(f"read back {len(raw)} records of {topic}, produced {options.events}")
    expected = recompute(raw, window_size_ms=WINDOW_MS, max_out_of_orderness_ms=OUT_OF_ORDERNESS_MS)
    del raw
    counted = options.events - len(expected.invalid) - len(expected.late) - expected.duplicates
    stream = {
        "topic": topic, "partitions": PARTITIONS, "records": options.events, "kinds": kinds,
        "invalid": len(expected.invalid), "late": len(expected.late),
        "duplicates": expected.duplicates, "counted": counted,
        "aggregate_rows": len(expected.aggregates), "produce_seconds": round(produce_s, 2),
    }
    results["stream"] = stream
    return {"info": stream, "expected": expected}


def _contender(name: str, events: int, run: ChildRun, fixed_seconds: float, **extra) -> dict:
    """Figures of one contender; ``fixed_seconds`` is its start-up and shut-down time."""
    steady_seconds = max(run.seconds - fixed_seconds, 1e-3)
    return {"name": name, "events": events, "seconds": round(run.seconds, 3),
            "events_per_s": round(events / run.seconds), "peak_rss_mb": round(run.peak_rss_mb, 1),
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
    out = work / f"{name}.json"
    run = measure_child(_bench_child(role, bootstrap, topic, out), log=work / f"{name}.log",
                        env=_project_env())
    _check(run, f"the {name} consumer")
    report = json.loads(out.read_text())
    result = _contender(name, report["records"], run, run.seconds - report["loop_seconds"],
                        counted=report["counted"], rejected=report["rejected"], note=note)
    _say(options, f"{name}: {result['events_per_s']:,} records/s ({run.seconds:.1f}s)")
    return result


FLOW_SETTINGS = {
    "KAFKA_STOP_AT_END": "1", "WINDOW_SIZE": f"{WINDOW_MS}ms",
    "MAX_OUT_OF_ORDERNESS": f"{OUT_OF_ORDERNESS_MS}ms", "LOG_LEVEL": "WARNING",
    "REDIS_URL": "",  # Redis features (live totals, enrichment) off unless --redis-url
    "METRICS_PORT": "0",  # no metrics server: runs side by side would fight over its port
}
"""What every benchmarked flow run sets; the rest are the flow's defaults."""


def flow_env(bootstrap: str, topic: str, dlq_topic: str, clickhouse_url: str, **extra) -> dict:
    """Environment of a stop-at-end flow run (the settings contract of ``dataflows.settings``)."""
    settings = {
        **FLOW_SETTINGS, "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "USAGE_TOPIC": topic,
        "DLQ_TOPIC": dlq_topic, "CLICKHOUSE_URL": clickhouse_url,
    }
    settings.update(extra)
    return _project_env(**settings)


def _flow_commands(workers: int, processes: int, recovery: Path) -> list[list[str]]:
    """``bytewax.run`` command lines: one process with ``workers``, or a cluster of processes."""
    from deploy.broker import free_port
    from deploy.runner import bytewax_command, init_recovery_store

    init_recovery_store(recovery)
    if processes == 1:
        return [bytewax_command(workers=workers, recovery_dir=recovery, snapshot_s=5, backup_s=30)]
    addresses = [f"127.0.0.1:{free_port()}" for _ in range(processes)]
    return [bytewax_command(workers=workers, recovery_dir=recovery, snapshot_s=5, backup_s=30,
                            process_id=i, addresses=addresses) for i in range(processes)]


def _flow_command(workers: int, recovery: Path) -> list[str]:
    return _flow_commands(workers, 1, recovery)[0]


@contextmanager
def dev_clickhouse(data_dir: Path, log: Path) -> Iterator[str]:
    """``tallyflow dev-clickhouse`` on ``data_dir`` in a child process; yields its URL.

    A cluster of flow processes needs it: chdb opens a data directory in one process only.
    """
    from deploy.broker import free_port

    port = free_port()
    processes: list[subprocess.Popen] = []
    try:
        server = _spawn([sys.executable, "-m", "deploy.cli", "dev-clickhouse", "--data",
                         str(data_dir), "--port", str(port)], log, processes)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url, server)
        yield url
    finally:
        for process in processes:
            _stop(process)


@dataclass(frozen=True)
class FlowShape:
    """How the flow runs: ``processes`` x ``workers`` (threads in a process), and its ClickHouse.

    ``sink="chdb"``: the engine inside the flow process (one process only); ``"http"``: the dev
    ClickHouse HTTP server in its own process, which a cluster of processes needs.
    """

    workers: int = 1
    processes: int = 1
    sink: str = "chdb"

    @property
    def name(self) -> str:
        name = f"tallyflow-w{self.workers}" if self.processes == 1 else (
            f"tallyflow-p{self.processes}" + (f"w{self.workers}" if self.workers > 1 else ""))
        return name if self.sink == "chdb" else f"{name}-{self.sink}"

    def describe(self) -> str:
        where = ("chdb in the flow process" if self.sink == "chdb"
                 else "through the dev ClickHouse HTTP server (a separate process)")
        if self.processes == 1:
            return f"1 process, -w {self.workers}, {where}"
        return f"{self.processes} processes x -w {self.workers} (-i/-a), {where}"


@contextmanager
def _clickhouse_for(shape: FlowShape, data_dir: Path, log: Path) -> Iterator[str]:
    if shape.sink == "chdb":
        yield f"chdb://{data_dir}"
    else:
        with dev_clickhouse(data_dir, log) as url:
            yield url


def run_flow_timed(shape: FlowShape, bootstrap: str, topic: str, url: str, work: Path,
                   name: str, overrides: dict[str, str], timeout: float) -> ChildRun:
    """One stop-at-end run of ``dataflows.usage:flow`` on ``topic``; DLQ topic ``<name>-dlq``."""
    from deploy.broker import ensure_topic

    ensure_topic(bootstrap, f"{name}-dlq", 1)
    env = flow_env(bootstrap, topic, f"{name}-dlq", url, **overrides)
    commands = _flow_commands(shape.workers, shape.processes, work / f"{name}-recovery")
    logs = [work / f"{name}-{i}.log" for i in range(len(commands))]
    run = measure_children(commands, logs=logs, env=env, timeout=timeout)
    _check(run, f"the dataflow ({name})")
    return run


def run_tallyflow(bootstrap: str, topic: str, work: Path, shape: FlowShape, stream: dict,
                  options: BenchOptions) -> tuple[dict, dict]:
    """One measured run of the real flow in ``shape``; its figures and its correctness.

    A run that fails or does not exit in time is reported (``failed``), not raised: the
    other contenders are still worth having.
    """
    name = shape.name
    timeout = 60 + options.events / 10_000  # >= 10k records/s, or it is stuck
    try:
        fixed = measure_fixed_cost(bootstrap, topic, work, shape, options.flow_env)
        with _clickhouse_for(shape, work / f"{name}-clickhouse", work / f"{name}-server.log") as url:
            run = run_flow_timed(shape, bootstrap, topic, url, work, f"{topic}-{name}",
                                 options.flow_env, timeout)
            check = check_output(url, bootstrap, f"{topic}-{name}-dlq", stream)
    except (RuntimeError, TimeoutError) as err:
        lines = str(err).strip().splitlines()
        reason = " / ".join(dict.fromkeys(lines[:1] + lines[-2:]))  # first and last lines, once
        _say(options, f"{name}: FAILED: {reason}")
        failed = {"name": name, "failed": reason, "shape": shape.describe()}
        return failed, {"ok": False, "error": reason}
    result = _contender(name, stream["info"]["records"], run, fixed, workers=shape.workers,
                        processes=shape.processes, sink=shape.sink, shape=shape.describe(),
                        peak_rss_mb_each=[round(m, 1) for m in run.peak_rss_mb_each],
                        counted=check["counted"], correct=check["ok"])
    _say(options, f"{name}: {result['events_per_s']:,} records/s ({run.seconds:.1f}s), "
                  f"correct={check['ok']}")
    return result, check


def measure_fixed_cost(bootstrap: str, topic: str, work: Path, shape: FlowShape,
                       overrides: dict[str, str]) -> float:
    """Wall seconds of the same flow over a tiny topic: start-up and shut-down, nearly alone.

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
    with _clickhouse_for(shape, work / f"{name}-clickhouse", work / f"{name}-server.log") as url:
        return run_flow_timed(shape, bootstrap, tiny, url, work, name, overrides, 60).seconds


def check_output(url: str, bootstrap: str, dlq_topic: str, stream: dict) -> dict:
    """Compare what the flow wrote with the recomputation from the raw topic."""
    from recovery.reconcile import diff, read_aggregates, read_topic
    from sinks.clickhouse_backend import connect

    expected = stream["expected"]
    backend = connect(url)
    try:
        actual = read_aggregates(backend)
        _, [(late_rows,)] = backend.query("SELECT count() FROM usage_late_events FINAL")
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
    }
    check["ok"] = (not differences and counted == check["expected_counted"]
                   and check["late_rows"] == check["expected_late_rows"]
                   and dead_letters == check["expected_dead_letters"])
    if differences:
        check["first_differences"] = [str(d) for d in differences[:3]]
    return check


# ---------------------------------------------------------------- Quix Streams


def quix_python(options: BenchOptions) -> tuple[Path | None, str]:
    """The .venv-quix interpreter if it can import quixstreams (creating it on "install")."""
    python = QUIX_VENV / "bin" / "python"
    if options.quix == "skip":
        return None, "skipped (--no-quix)"
    if options.quix == "install" and not _quix_works(python):
        _say(options, f"creating {QUIX_VENV} with {QUIX_REQUIREMENT} …")
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
        _say(options, f"quix: {note}")
        return {"name": "quix", "skipped": note}
    out = work / "quix.json"
    command = [str(python), str(Path(__file__).resolve()), "_quix", bootstrap, topic,
               str(options.events), str(out), str(work / "quix-state")]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    try:
        run = measure_child(command, log=work / "quix.log", env=env, cwd=work,
                            timeout=120 + options.events / 5_000)
        _check(run, "the Quix Streams app")
    except (RuntimeError, TimeoutError) as err:
        lines = str(err).strip().splitlines()
        reason = " / ".join(dict.fromkeys(lines[:1] + lines[-1:]))
        _say(options, f"quix: FAILED: {reason}")
        return {"name": "quix", "failed": reason}
    report = json.loads(out.read_text())
    processing = report["loop_seconds"] - (report["first_record_after_s"] or 0)
    result = _contender("quix", report["records"], run, run.seconds - processing,
                        versions=_quix_version(python),
                        first_record_after_s=report["first_record_after_s"],
                        complete=report["records"] == options.events,
                        note="Quix Streams tumbling 1m reduce per message key (org:customer) "
                             "into {code: [count, exact sum]}; changelog topics on, "
                             "at-least-once; session.timeout.ms 6000 (Tansu makes a group join "
                             "wait about half of it); stops after reading every record")
    _say(options, f"quix: {result['events_per_s']:,} records/s ({run.seconds:.1f}s)")
    return result


# ---------------------------------------------------------------- dedup memory


def measure_dedup(ids: int, work: Path, options: BenchOptions) -> dict:
    out = work / "dedup.json"
    run = measure_child(_bench_child("_dedup", ids, out), log=work / "dedup.log", env=_project_env())
    _check(run, "the dedup measurement")
    report = json.loads(out.read_text())
    report["method"] = ("RSS growth of a fresh child (/proc/self/statm) while a DedupStore(24h) "
                        "takes N distinct digests through keep_first_sightings in batches of 5,000 "
                        "events (as a shard does), divided by N; tracemalloc figure from a second "
                        "store in the same child; snapshot = bytes of DedupSnapshot buckets")
    _say(options, f"dedup: {report['rss_bytes_per_id']:.1f} B/id RSS, "
                  f"{report['tracemalloc_bytes_per_id']:.1f} B/id tracemalloc")
    return report


# ---------------------------------------------------------------- latency at a steady rate


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
            producer = _spawn(_bench_child("_produce", broker.bootstrap, topic, rate, seconds,
                                           start_at_ms, producer_out),
                              work / "latency-producer.log", processes)
            env = flow_env(broker.bootstrap, topic, f"{topic}-dlq", url, **{
                "SINK_FLUSH_INTERVAL": options.latency_flush_interval,
                **options.flow_env, "KAFKA_STOP_AT_END": "0", "WINDOW_SIZE": f"{window}ms",
                "MAX_OUT_OF_ORDERNESS": f"{ooo}ms"})
            flow = _spawn(_flow_command(1, work / "latency-recovery"), work / "latency-flow.log",
                          processes, env)
            seen = _poll_rows(url, flow, producer, window, ooo)
            report = json.loads(producer_out.read_text())
        finally:
            for process in reversed(processes):
                _stop(process)
    summary = _latency_summary(seen, report, rate, window, ooo, count)
    summary["sink_flush_interval"] = options.flow_env.get("SINK_FLUSH_INTERVAL", options.latency_flush_interval)
    return summary


def _spawn(command: list[str], log: Path, processes: list, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env or _project_env(),
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    process.log = log  # type: ignore[attr-defined]
    processes.append(process)
    return process


def _stop(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_http(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dev ClickHouse exited: {_tail(server.log)}")  # type: ignore[attr-defined]
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"dev ClickHouse did not answer on {url}")


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
                                       f"{_tail(process.log)}")  # type: ignore[attr-defined]
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


# ---------------------------------------------------------------- profile


def profile_flow(bootstrap: str, topic: str, work: Path, stamp: str, options: BenchOptions) -> dict:
    """A -w 1 stop-at-end run under ``py-spy record --native``; summary in profile-<stamp>.txt."""
    from deploy.broker import ensure_topic

    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                         f"{os.environ.get('PATH', '')}")
    if py_spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    dlq_topic = f"{topic}-dlq-profile"
    ensure_topic(bootstrap, dlq_topic, 1)
    raw = work / "profile.raw"
    env = flow_env(bootstrap, topic, dlq_topic, f"chdb://{work / 'profile-clickhouse'}",
                   **options.flow_env)
    command = [py_spy, "record", "--format", "raw", "--native", "--rate", "200", "--output",
               str(raw), "--", *_flow_command(1, work / "profile-recovery")]
    _say(options, "profiling a -w 1 run with py-spy …")
    run = measure_child(command, log=work / "profile.log", env=env)
    _check(run, "the profiled dataflow")
    text = summarize_profile(raw.read_text(), title=f"tallyflow -w 1, {options.events:,} records, "
                                                    f"{run.seconds:.1f}s under py-spy --native")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    path = options.out_dir / f"profile-{stamp}.txt"
    path.write_text(text)
    shutil.copy(raw, options.out_dir / f"profile-{stamp}.raw")
    return {"path": str(path), "raw": str(options.out_dir / f"profile-{stamp}.raw"),
            "seconds_under_profiler": round(run.seconds, 2)}


def _frame_name(frame: str) -> str:
    """``fn (path/to/file.py:12)`` -> ``fn (to/file.py)``: group a function's lines together."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0] if where else ""
    short = "/".join(Path(path).parts[-2:]) if path else ""
    return f"{name} ({short})" if short else name


def summarize_profile(raw: str, *, title: str = "", top: int = 30) -> str:
    """Self and total sample shares per function from py-spy's ``--format raw`` (collapsed stacks).

    >>> print(summarize_profile("a (x/m.py:1);b (x/m.py:2) 3\\na (x/m.py:1) 1", top=2), end="")
    4 samples
    <BLANKLINE>
    == top 2 by self time
     75.0%  b (x/m.py)
     25.0%  a (x/m.py)
    <BLANKLINE>
    == top 2 by total time (inclusive)
    100.0%  a (x/m.py)
     75.0%  b (x/m.py)
    <BLANKLINE>
    == by file (self)
    100.0%  x/m.py
    """
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    file_counts: dict[str, int] = {}
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            total_counts[frame] = total_counts.get(frame, 0) + count
        where = frames[-1].rpartition(" (")[2].rstrip(")") if " (" in frames[-1] else "<native>"
        file_counts[where] = file_counts.get(where, 0) + count
    lines = [title] if title else []
    lines.append(f"{samples} samples")
    for heading, counts in ((f"top {top} by self time", self_counts),
                            (f"top {top} by total time (inclusive)", total_counts),
                            ("by file (self)", file_counts)):
        lines += ["", f"== {heading}"]
        for name, count in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100 * count / max(samples, 1):5.1f}%  {name}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- results


def _with_ratios(contenders: list[dict]) -> list[dict]:
    baseline = contenders[0]["events_per_s"]
    for contender in contenders:
        if "events_per_s" in contender:
            contender["ratio_vs_baseline"] = round(contender["events_per_s"] / baseline, 3)
    return contenders


def _scaling(contenders: list[dict]) -> dict:
    """1 -> 2 ratios of like with like: -w 2 vs -w 1 per sink, 2 processes vs -w 1 over HTTP."""
    by_name = {c["name"]: c for c in contenders if "events_per_s" in c}
    pairs = (("threads_chdb", "tallyflow-w1", "tallyflow-w2"),
             ("threads_http", "tallyflow-w1-http", "tallyflow-w2-http"),
             ("processes_http", "tallyflow-w1-http", "tallyflow-p2-http"))
    scaling: dict = {}
    for key, one_name, two_name in pairs:
        one, two = by_name.get(one_name), by_name.get(two_name)
        if one and two:
            scaling[key] = {"one": one_name, "two": two_name, "ratio":
                            round(two["events_per_s"] / one["events_per_s"], 3),
                            "ratio_excl_fixed": round(two["steady_events_per_s"]
                                                      / one["steady_events_per_s"], 3)}
    return scaling


def _target(name: str, goal: str, measured, ok: bool | None, gap: str = "") -> dict:
    status = "NOT MEASURED" if ok is None else ("PASS" if ok else "MISS")
    return {"name": name, "target": goal, "measured": measured, "status": status,
            "gap": "" if ok else gap}


def evaluate_targets(results: dict) -> list[dict]:
    by_name = {c["name"]: c for c in results["contenders"]}
    one = by_name.get("tallyflow-w1")
    targets = []
    if one:
        rate = one["events_per_s"]
        targets.append(_target(
            "tallyflow events/s per worker process", f">= {TARGET_EVENTS_PER_S:,}", f"{rate:,}",
            rate >= TARGET_EVENTS_PER_S,
            f"short by {TARGET_EVENTS_PER_S - rate:,}/s (needs {TARGET_EVENTS_PER_S / rate:.2f}x)"))
        ratio = one["ratio_vs_baseline"]
        targets.append(_target(
            "tallyflow vs plain consumer", f">= {TARGET_RATIO_VS_BASELINE:g}x", f"{ratio:.2f}x",
            ratio >= TARGET_RATIO_VS_BASELINE,
            f"short by {TARGET_RATIO_VS_BASELINE - ratio:.2f}x "
            f"(needs {TARGET_RATIO_VS_BASELINE / ratio:.2f}x faster)"))
    cores = results["machine"]["cpus_available"]
    for key, label in (("threads_chdb", "1 -> 2 workers (-w 2, chdb)"),
                       ("threads_http", "1 -> 2 workers (-w 2, http)"),
                       ("processes_http", "1 -> 2 workers (2 processes, http)")):
        scaling = results.get("scaling", {}).get(key)
        if scaling:
            ratio = scaling["ratio"]
            ok = ratio >= TARGET_SCALING if cores >= 2 else None
            targets.append(_target(label, f">= {TARGET_SCALING:g}x ({cores} cores)", f"{ratio:.2f}x",
                                   ok, f"short by {TARGET_SCALING - ratio:.2f}x"))
    dedup = results.get("dedup")
    if dedup:
        per_id = dedup["rss_bytes_per_id"]
        targets.append(_target(
            "dedup memory per transaction id", f"<= {TARGET_DEDUP_BYTES_PER_ID} B",
            f"{per_id:.1f} B", per_id <= TARGET_DEDUP_BYTES_PER_ID,
            f"over by {per_id - TARGET_DEDUP_BYTES_PER_ID:.1f} B/id"))
    targets.append(_latency_target(results.get("latency", {})))
    for contender in results["contenders"]:
        if "failed" in contender:
            targets.append(_target(f"{contender['name']} runs to its end", "exit 0", "failed",
                                   False, contender["failed"][:100]))
    correctness = results.get("correctness", {})
    checked = {name: check for name, check in correctness.items() if "error" not in check}
    if checked:
        wrong = [name for name, check in checked.items() if not check["ok"]]
        targets.append(_target("output equals recomputation", "exact", "all finished runs"
                               if not wrong else f"wrong: {', '.join(wrong)}", not wrong,
                               "see correctness"))
    return targets


def _latency_target(latency: dict) -> dict:
    name = "p99 event->row latency"
    if not latency.get("measured"):
        return _target(name, "<= window + lateness + 2 s", latency.get("reason", "not measured"), None)
    budget = latency["window_ms"] + latency["out_of_orderness_ms"] + TARGET_LATENCY_SLACK_MS
    p99 = latency["event_to_row_ms"]["p99"]
    return _target(name, f"<= {budget} ms at {latency['rate']:,}/s", f"{p99} ms", p99 <= budget,
                   f"over by {p99 - budget} ms")


def machine_info() -> dict:
    versions = {}
    for module in ("bytewax", "confluent_kafka", "chdb", "msgspec", "clickhouse_connect", "xxhash"):
        try:
            from importlib.metadata import version

            versions[module] = version(module.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing package is reported as such
            versions[module] = None
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT,
                           capture_output=True, text=True).stdout.strip()
    memory_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return {
        "nproc": os.cpu_count(), "cpus_available": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model, "memory_gb": round(memory_kb / 1024**2, 1),
        "platform": platform.platform(), "python": platform.python_version(),
        "versions": versions, "git_commit": commit + ("+dirty" if dirty else ""),
        # Other work on the machine skews every figure: worth knowing when comparing runs.
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def format_report(results: dict) -> str:
    from deploy.table import format_table

    columns = ["contender", "events", "seconds", "events/s", "vs baseline", "peak RSS MB",
               "fixed s", "events/s excl. fixed", "note"]
    rows = []
    for c in results["contenders"]:
        if "skipped" in c or "failed" in c:
            note = c.get("skipped") or f"FAILED: {c['failed']}"[:120]
            rows.append((c["name"], "", "", "", "", "", "", "", note))
            continue
        note = ""
        if "correct" in c:
            note = "output correct" if c["correct"] else "OUTPUT WRONG"
        if "complete" in c and not c["complete"]:
            note = "did not read every record"
        rows.append((c["name"], f"{c['events']:,}", f"{c['seconds']:.2f}", f"{c['events_per_s']:,}",
                     f"{c['ratio_vs_baseline']:.2f}x", f"{c['peak_rss_mb']:.0f}",
                     f"{c['fixed_seconds']:.2f}", f"{c['steady_events_per_s']:,}", note))
    parts = [format_table(columns, rows)]
    stream = results["stream"]
    parts.append(f"stream: {stream['records']:,} records over {stream['partitions']} partitions; "
                 f"counted {stream['counted']:,}, duplicates {stream['duplicates']:,}, "
                 f"late {stream['late']:,}, invalid {stream['invalid']:,}")
    dedup = results["dedup"]
    parts.append(f"dedup: {dedup['rss_bytes_per_id']:.1f} B/id (RSS), "
                 f"{dedup['tracemalloc_bytes_per_id']:.1f} B/id (tracemalloc), "
                 f"{dedup['snapshot_bytes_per_id']:.1f} B/id in a snapshot, {dedup['ids']:,} ids")
    latency = results["latency"]
    if latency.get("measured"):
        parts.append(f"latency at {latency['rate']:,}/s (producer reached {latency['producer_rate']:,}/s), "
                     f"{latency['window_ms']} ms windows, {latency['out_of_orderness_ms']} ms "
                     f"out-of-orderness, SINK_FLUSH_INTERVAL={latency.get('sink_flush_interval')}: event->row p50 {latency['event_to_row_ms']['p50']} ms, "
                     f"p99 {latency['event_to_row_ms']['p99']} ms, max {latency['event_to_row_ms']['max']}"
                     f" ms; overhead past window end + lateness p99 {latency['overhead_ms']['p99']} ms")
    else:
        parts.append(f"latency: not measured ({latency.get('reason', '')})")
    target_rows = [(t["name"], t["target"], str(t["measured"]), t["status"], t["gap"])
                   for t in results["targets"]]
    parts.append(format_table(["target", "goal", "measured", "status", "gap"], target_rows))
    if "profile" in results:
        parts.append(f"profile: {results['profile'].get('path') or results['profile'].get('skipped')}")
    load = results["machine"]["load_average"][0]
    if load > 0.5:
        parts.append(f"note: load average {load} when the run started; other work on this "
                     f"{results['machine']['nproc']}-core machine skews every figure")
    parts.append(f"results: {results.get('json_path', '(not written)')}")
    return "\n\n".join(parts)


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m deploy.bench`` and ``tallyflow bench``."""
    add = parser.add_argument
    add("--events", type=int, default=1_000_000, help="records in the stream (default 1000000)")
    add("--quick", action="store_true", help="200k records, 200k dedup ids, 10 s latency run")
    add("--workers", default="1,2", help="worker counts (-w) of one flow process (default 1,2)")
    add("--processes", type=int, default=2,
        help="also run a cluster of N one-worker processes (default 2; 0 = not)")
    add("--no-http-scaling", action="store_true",
        help="do not repeat each -w run through the dev HTTP ClickHouse server")
    add("--seed", type=int, default=42)
    quix = parser.add_mutually_exclusive_group()
    quix.add_argument("--with-quix", action="store_true",
                      help=f"create {QUIX_VENV.name}/ with {QUIX_REQUIREMENT} if missing, and run it")
    quix.add_argument("--no-quix", action="store_true", help="do not run Quix Streams")
    add("--dedup-ids", type=int, default=None, help="ids for the dedup memory figure (default 1M)")
    add("--no-latency", action="store_true", help="skip the steady-rate latency measurement")
    add("--latency-rate", type=int, default=50_000, help="records/s of the latency run")
    add("--latency-seconds", type=float, default=None, help="length of the latency run (default 20)")
    add("--latency-flush-interval", default="250ms",
        help="SINK_FLUSH_INTERVAL of the latency run (default 250ms; the flow's default is 2s)")
    add("--profile", action="store_true", help="also run -w 1 under py-spy; writes profile-*.txt")
    add("--flow-env", action="append", default=[], metavar="NAME=VALUE",
        help="a flow setting for every flow run, e.g. REDIS_URL=redis://127.0.0.1:6379/15 "
             "(repeatable; the bench sets REDIS_URL= and METRICS_PORT=0 unless given)")
    add("--out-dir", default=str(RESULTS_DIR), help="where the JSON goes (default bench-results/)")
    add("--keep", action="store_true", help="keep the work directory (chdb data, logs)")


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    events = 200_000 if args.quick else args.events
    if events < 1:
        raise ValueError(f"--events must be >= 1, got {events}")
    workers = tuple(int(w) for w in str(args.workers).split(",") if w.strip())
    return BenchOptions(
        events=events, seed=args.seed, workers=workers, processes=args.processes,
        http_scaling=not args.no_http_scaling,
        quix="install" if args.with_quix else "skip" if args.no_quix else "auto",
        dedup_ids=args.dedup_ids or (200_000 if args.quick else 1_000_000),
        latency=not args.no_latency, latency_rate=args.latency_rate,
        latency_seconds=args.latency_seconds or (10.0 if args.quick else 20.0),
        latency_flush_interval=args.latency_flush_interval,
        profile=args.profile, out_dir=Path(args.out_dir), keep=args.keep,
        flow_env=dict(_setting(text) for text in args.flow_env),
    )


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--flow-env wants NAME=VALUE, got {text!r}")
    return name.strip(), value


def run_cli(args: argparse.Namespace) -> int:
    results = run_bench(options_from_args(args))
    print(format_report(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in _CHILDREN:
        return _CHILDREN[argv[0]](*argv[1:])
    parser = argparse.ArgumentParser(prog="python -m deploy.bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


# ---------------------------------------------------------------- the children's entry points


def _baseline_child(bootstrap: str, topic: str, out: str) -> int:
    """Read every record to EOF, aggregate count and exact sum per (org, code, minute)."""
    return _plain_consumer(bootstrap, topic, out, count_events=True)


def _read_ceiling_child(bootstrap: str, topic: str, out: str) -> int:
    """Read every record to EOF and touch its value, nothing more: the read ceiling."""
    return _plain_consumer(bootstrap, topic, out, count_events=False)


def _plain_consumer(bootstrap: str, topic: str, out: str, *, count_events: bool) -> int:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    started = time.perf_counter()
    # librdkafka defaults but a short fetch wait; queued.min.messages stays at its default
    # (100000): 20000 caps Tansu reads at ~38k records/s (measured, see the report).
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "fetch.wait.max.ms": 50})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    decode = json.JSONDecoder(parse_float=str).decode  # keep decimals exact
    aggregates: dict[tuple, list[int]] = {}
    pending, records, rejected = set(partitions), 0, 0
    while pending:
        for message in consumer.consume(1_000, 0.1):
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                pending.discard(message.partition())
                continue
            records += 1
            if not count_events:
                message.value()
                continue
            try:
                event = decode(message.value().decode())
                key = (event["organization_id"], event["code"],
                       event_time_ms(event["timestamp"]) // WINDOW_MS)
                value = scaled_value(event.get("value"))
                aggregate = aggregates.get(key)  # TypeError: an id that is not a string
            except (ValueError, KeyError, TypeError, AttributeError):
                rejected += 1
                continue
            if aggregate is None:
                aggregates[key] = [1, value]
            else:
                aggregate[0] += 1
                aggregate[1] += value
    consumer.close()
    counted = sum(count for count, _ in aggregates.values())
    Path(out).write_text(json.dumps({"records": records, "counted": counted, "rejected": rejected,
                                     "keys": len(aggregates),
                                     "loop_seconds": round(time.perf_counter() - started, 3)}))
    return 0


def _quix_child(bootstrap: str, topic: str, total: str, out: str, state_dir: str) -> int:
    """Quix Streams: tumbling 1-minute count + exact sum per key and code, stop after ``total``."""
    from quixstreams import Application
    from quixstreams.models.serializers.json import JSONDeserializer

    total_records = int(total)
    read, first_at = [0], []

    def loads(data: bytes) -> dict:  # {} for anything without a usable event time
        try:
            event = json.loads(data, parse_float=str)
            event["_ms"] = event_time_ms(event["timestamp"])
        except (ValueError, KeyError, TypeError):
            return {}
        return event

    def event_time(value, headers, timestamp, timestamp_type) -> int:
        return value.get("_ms", 0)  # a record without one is filtered before the window

    def count_read(value) -> None:
        if not read[0]:
            first_at.append(time.perf_counter())
        read[0] += 1
        if read[0] >= total_records:
            app.stop()

    def usage(value):  # [code, whole units, 10**-18 units]: Quix state holds 64-bit ints only
        try:
            code = value["code"]
            if type(code) is not str or type(value["organization_id"]) is not str:
                return None
            return [code, *divmod(scaled_value(value.get("value")), SCALE)]
        except (KeyError, ValueError, TypeError):
            return None

    def initial(value) -> dict:
        return {value[0]: [1, value[1], value[2]]}

    def add(aggregate: dict, value) -> dict:
        slot = aggregate.get(value[0])
        if slot is None:
            aggregate[value[0]] = [1, value[1], value[2]]
        else:
            slot[0] += 1
            slot[1] += value[1]
            slot[2] += value[2]
            if slot[2] >= SCALE:
                slot[1] += 1
                slot[2] -= SCALE
        return aggregate

    app = Application(broker_address=bootstrap, consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
                      auto_offset_reset="earliest", state_dir=state_dir, loglevel="WARNING",
                      consumer_extra_config={"session.timeout.ms": 6_000})
    source = app.topic(topic, value_deserializer=JSONDeserializer(loads=loads),
                       timestamp_extractor=event_time)
    sdf = app.dataframe(source)
    sdf = sdf.update(count_read)
    sdf = sdf.apply(usage).filter(lambda value: value is not None)
    sdf = sdf.tumbling_window(WINDOW_MS, grace_ms=OUT_OF_ORDERNESS_MS).reduce(add, initial).final()
    started = time.perf_counter()
    app.run(timeout=60)
    Path(out).write_text(json.dumps({
        "records": read[0], "loop_seconds": round(time.perf_counter() - started, 3),
        "first_record_after_s": round(first_at[0] - started, 3) if first_at else None,
    }))
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dedup_child(ids: str, out: str) -> int:
    """RSS growth per id of a DedupStore holding ``ids`` digests; tracemalloc as a cross-check.

    The store is filled the way the flow fills it: keep_first_sightings on
    batches of 5,000 event tuples (digest first, event time fifth).
    """
    import gc
    import random
    import tracemalloc

    from state.dedup import DedupStore, transaction_digest

    n = int(ids)
    rng = random.Random(1)
    batch = 5_000

    def fill(store: DedupStore) -> None:
        for start in range(0, n, batch):
            events = []
            for i in range(start, min(n, start + batch)):
                txn = f"{rng.getrandbits(128):032x}"
                events.append((transaction_digest("org_001", txn), "org_001", "cust_001", "api_calls",
                               START_MS + i * 600_000 // n, SCALE, 0, i, txn, None))
            store.keep_first_sightings(events)

    gc.collect()
    before = _rss_bytes()
    store = DedupStore(horizon_ms=86_400_000)
    fill(store)
    gc.collect()
    rss_growth = _rss_bytes() - before
    remembered = len(store)
    snapshot_bytes = sum(len(b) for b in store.snapshot().buckets.values())
    del store
    gc.collect()
    tracemalloc.start()
    store = DedupStore(horizon_ms=86_400_000)
    fill(store)
    traced, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    Path(out).write_text(json.dumps({
        "ids": remembered, "rss_bytes_per_id": round(rss_growth / remembered, 1),
        "tracemalloc_bytes_per_id": round(traced / remembered, 1),
        "snapshot_bytes_per_id": round(snapshot_bytes / remembered, 1),
    }))
    return 0


def _produce_child(bootstrap: str, topic: str, rate: str, seconds: str, start_at_ms: str,
                   out: str) -> int:
    """Generate a steady stream whose event time is the wall clock from ``start_at_ms``; produce it."""
    from deploy.generator import generate, produce

    count, start = int(float(rate) * float(seconds)), int(start_at_ms)
    records = list(generate(count, seed=7, partitions=PARTITIONS, start_ms=start,
                            span_ms=int(float(seconds) * 1000), jitter_ms=500, duplicate_share=0.02,
                            malformed_share=0.001, very_late_share=0.0))
    late_ms = time.time() * 1000 - start
    if late_ms < 0:
        time.sleep(-late_ms / 1000)
    started_ms = time.time() * 1000
    kinds = produce(bootstrap, topic, records, rate=float(rate))
    Path(out).write_text(json.dumps({
        "start_at_ms": start, "end_at_ms": start + int(float(seconds) * 1000),
        "started_ms": started_ms, "finished_ms": time.time() * 1000,
        "started_late_ms": round(max(0.0, late_ms)), "kinds": kinds,
    }))
    return 0


_CHILDREN = {"_baseline": _baseline_child, "_read_ceiling": _read_ceiling_child,
             "_quix": _quix_child, "_dedup": _dedup_child, "_produce": _produce_child}


if __name__ == "__main__":
    sys.exit(main())
