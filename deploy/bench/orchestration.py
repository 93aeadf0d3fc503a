"""The benchmark run: a dev broker, one stream per traffic profile, every contender on it.

``run_bench`` produces each profile's stream once (``deploy.generator``), recomputes what the
flow must write (``recovery.reconcile.recompute``), runs the contenders of
``deploy.bench.contenders`` on it, then the dedup, latency and profiling measurements, and
evaluates the targets (``deploy.bench.report``). ``--scaling`` runs ``deploy.bench.scaling``
instead. Standard library only at import (``tallyflow bench --help`` stays cheap).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from deploy.bench.contenders import (
    measure_dedup,
    run_baseline,
    run_quix,
    run_tallyflow,
)
from deploy.bench.latency import measure_latency
from deploy.bench.process import compile_project, private_redis, say
from deploy.bench.profiling import profile_flow
from deploy.bench.report import (
    evaluate_targets,
    format_report,
    machine_info,
    thread_scaling,
    with_ratios,
)
from deploy.bench.settings import (
    FLOW_SETTINGS,
    OUT_OF_ORDERNESS_MS,
    PARTITIONS,
    PROFILES,
    QUIX_REQUIREMENT,
    QUIX_VENV,
    RESULTS_DIR,
    START_MS,
    WINDOW_MS,
    BenchOptions,
    TrafficProfile,
)


def run_bench(options: BenchOptions) -> dict:
    """Run every measurement of ``options``; return the results (also written as JSON)."""
    from deploy.broker import DevBroker

    compile_project()  # the children start from bytecode, as in the image
    if options.scaling:
        from deploy.bench.scaling import run_scaling

        return run_scaling(options)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix=f"tallyflow-bench-{stamp}-"))
    results = _header(options, work)
    try:
        with DevBroker(log_path=work / "broker.log") as broker, _redis_for(options, work) as redis_url:
            say(options, f"dev broker on {broker.bootstrap}; work dir {work}")
            results["profiles"] = {}
            for name in options.profiles:
                topic = f"bench-{name}-{stamp.lower()}"
                results["profiles"][name] = run_profile(broker.bootstrap, topic, PROFILES[name],
                                                        work, options, redis_url, stamp)
            results["dedup"] = measure_dedup(options.dedup_ids, work, options)
            results["latency"] = (measure_latency(broker, work, options) if options.latency
                                  else {"measured": False, "reason": "skipped (--no-latency)"})
        results["targets"] = evaluate_targets(results)
        return write_results(results, options, stamp)
    finally:
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)


def _header(options: BenchOptions, work: Path) -> dict:
    return {
        "schema": 2,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "work_dir": str(work) if options.keep else None,
        "flow_settings": {**FLOW_SETTINGS, **options.flow_env},
    }


def write_results(results: dict, options: BenchOptions, stamp: str) -> dict:
    """Write ``results`` as ``bench-<stamp>.json`` under the output directory; note the path."""
    options.out_dir.mkdir(parents=True, exist_ok=True)
    path = options.out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    results["json_path"] = str(path)
    return results


def _redis_for(options: BenchOptions, work: Path):
    """The Redis of the live-totals runs: ``--redis-url``, else a private server (or None)."""
    if not options.live_totals:
        return nullcontext(None)
    if options.redis_url:
        return nullcontext(options.redis_url)
    return private_redis(work / "redis", work / "redis.log")


def run_profile(bootstrap: str, topic: str, profile: TrafficProfile, work: Path,
                options: BenchOptions, redis_url: str | None, stamp: str) -> dict:
    """Every contender of one traffic profile on its own stream; the profile's results."""
    say(options, f"== {profile.name}-cardinality profile: {profile.describe()}")
    stream = produce_stream(bootstrap, topic, profile, options)
    contenders = [run_baseline(bootstrap, topic, work, options),
                  run_baseline(bootstrap, topic, work, options, "read-ceiling")]
    correctness = {}
    for shape in options.shapes(profile.name):
        if shape.redis and not redis_url:
            contenders.append({"name": shape.name, "skipped": "no redis-server here (--redis-url)"})
            continue
        run, check = run_tallyflow(bootstrap, topic, work, shape, stream, options, redis_url)
        contenders.append(run)
        correctness[run["name"]] = check
    if profile.name == options.profiles[0]:
        contenders.append(run_quix(bootstrap, topic, work, options))
    section = {"profile": {**asdict(profile), "keys": profile.keys}, "stream": stream["info"],
               "contenders": with_ratios(contenders), "correctness": correctness}
    section["scaling"] = thread_scaling(section["contenders"])
    if options.profile:
        section["py_spy"] = profile_flow(bootstrap, topic, work, f"{stamp}-{profile.name}", options)
    return section


def produce_stream(bootstrap: str, topic: str, profile: TrafficProfile, options: BenchOptions,
                   partitions: int = PARTITIONS) -> dict:
    """Produce the profile's stream once, read it back to EOF, recompute what the flow must write."""
    from deploy.broker import ensure_topic
    from deploy.generator import generate, produce
    from recovery.reconcile import read_topic, recompute

    ensure_topic(bootstrap, topic, partitions)
    started = time.perf_counter()
    kinds = produce(bootstrap, topic, generate(
        options.events, seed=options.seed, partitions=partitions, start_ms=START_MS,
        organizations=profile.organizations, customers_per_org=profile.customers_per_org,
        codes=profile.code_names(), span_ms=600_000, duplicate_share=0.02,
        malformed_share=0.001, very_late_share=0.001,
    ), total=options.events)
    produce_s = time.perf_counter() - started
    say(options, f"produced {options.events:,} records in {produce_s:.1f}s: {kinds}")
    raw = read_topic(bootstrap, topic, timeout_s=900)
    if len(raw) != options.events:
        raise RuntimeError(f"read back {len(raw)} records of {topic}, produced {options.events}")
    expected = recompute(raw, window_size_ms=WINDOW_MS, max_out_of_orderness_ms=OUT_OF_ORDERNESS_MS)
    del raw
    counted = options.events - len(expected.invalid) - len(expected.late) - expected.duplicates
    stream = {
        "topic": topic, "partitions": partitions, "records": options.events, "kinds": kinds,
        "invalid": len(expected.invalid), "late": len(expected.late),
        "duplicates": expected.duplicates, "counted": counted,
        "aggregate_rows": len(expected.aggregates), "produce_seconds": round(produce_s, 2),
        "open_window_keys": open_window_keys(expected.aggregates),
    }
    return {"info": stream, "expected": expected}


def open_window_keys(aggregates: dict, window_ms: int = WINDOW_MS) -> int:
    """Estimated peak of window keys the flow holds at once (rollups on, the default).

    Two consecutive minute windows are open together (out-of-orderness and jitter hold the
    older one), and every hour and day rollup key of the stream stays open to its end (the
    stream spans ten minutes of one hour). So: the largest pair of consecutive windows' keys,
    plus the distinct (org, customer, code) per hour and per day.

        >>> aggs = {("o", "c", "x", 0): 1, ("o", "d", "x", 0): 1, ("o", "c", "x", 60_000): 1,
        ...         ("o", "c", "x", 120_000): 1}
        >>> open_window_keys(aggs)   # 2 + 1 minute keys, 2 hour keys, 2 day keys
        7
    """
    per_window = Counter(key[3] for key in aggregates)
    pairs = [n + per_window.get(start + window_ms, 0) for start, n in per_window.items()]
    hours = {(*key[:3], key[3] // 3_600_000) for key in aggregates}
    days = {(*key[:3], key[3] // 86_400_000) for key in aggregates}
    return max(pairs, default=0) + len(hours) + len(days)


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
    add("--profiles", default="low,high",
        help="traffic profiles, the first also gets every -w/http/cluster shape (default low,high)")
    add("--no-live-totals", action="store_true",
        help="no -w 1 run with live totals (Redis) per profile")
    add("--redis-url", default="",
        help="Redis of the live-totals runs (default: a private redis-server started for it)")
    add("--scaling", action="store_true",
        help="scaling mode only: 1, 2, 4... one-worker processes up to the cores, ClickHouse "
             "writes discarded, Redis off; events/s and the factor over one process")
    add("--scaling-max-processes", type=int, default=0,
        help="largest cluster of the scaling mode (default: the cores available)")
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
        profiles=_profiles(args.profiles), live_totals=not args.no_live_totals,
        redis_url=args.redis_url, scaling=args.scaling,
        scaling_max_processes=args.scaling_max_processes,
    )


def _profiles(text: str) -> tuple[str, ...]:
    """``--profiles`` as names of :data:`PROFILES`.

    >>> _profiles("high, low")
    ('high', 'low')
    >>> _profiles("medium")
    Traceback (most recent call last):
    ...
    ValueError: --profiles: unknown profile 'medium' (known: low, high)
    """
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    for name in names:
        if name not in PROFILES:
            raise ValueError(f"--profiles: unknown profile {name!r} (known: {', '.join(PROFILES)})")
    if not names:
        raise ValueError("--profiles: name at least one profile")
    return names


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--flow-env wants NAME=VALUE, got {text!r}")
    return name.strip(), value


def run_cli(args: argparse.Namespace) -> int:
    results = run_bench(options_from_args(args))
    if results.get("mode") == "scaling":
        from deploy.bench.scaling import format_scaling

        print(format_scaling(results))
    else:
        print(format_report(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from deploy.bench.children import CHILDREN

    if argv and argv[0] in CHILDREN:
        return CHILDREN[argv[0]](*argv[1:])
    parser = argparse.ArgumentParser(prog="python -m deploy.bench",
                                     description="throughput, memory and latency of the usage flow")
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


