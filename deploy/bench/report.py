"""Results: ratios, scaling pairs, the targets (PASS/MISS and the gap), the machine, the printout.

Standard library only at import.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from deploy.bench.settings import (
    REPO_ROOT,
    TARGET_DEDUP_BYTES_PER_ID,
    TARGET_EVENTS_PER_S,
    TARGET_LATENCY_SLACK_MS,
    TARGET_RATIO_HIGH,
    TARGET_RATIO_HIGH_REDIS,
    TARGET_RATIO_VS_BASELINE,
    TARGET_SCALING,
)

RATIO_TARGETS = {
    ("low", "tallyflow-w1"): TARGET_RATIO_VS_BASELINE,
    ("high", "tallyflow-w1"): TARGET_RATIO_HIGH,
    ("high", "tallyflow-w1-redis"): TARGET_RATIO_HIGH_REDIS,
}
"""(profile, contender) -> the ratio over the plain consumer it should reach (issue 14)."""


def with_ratios(contenders: list[dict]) -> list[dict]:
    """Each contender's events/s over the first's (the plain consumer), by wall time and by CPU.

    >>> with_ratios([{"events_per_s": 10, "events_per_cpu_s": 20}, {"events_per_s": 5, "events_per_cpu_s": 30}])[1]
    {'events_per_s': 5, 'events_per_cpu_s': 30, 'ratio_vs_baseline': 0.5, 'cpu_ratio_vs_baseline': 1.5}
    """
    baseline = contenders[0]
    for contender in contenders:
        if "events_per_s" in contender:
            contender["ratio_vs_baseline"] = round(contender["events_per_s"] / baseline["events_per_s"], 3)
        if "events_per_cpu_s" in contender and baseline.get("events_per_cpu_s"):
            contender["cpu_ratio_vs_baseline"] = round(
                contender["events_per_cpu_s"] / baseline["events_per_cpu_s"], 3)
    return contenders


def thread_scaling(contenders: list[dict]) -> dict:
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
    """Every target against the figures of ``results`` (schema 2: per-profile sections)."""
    targets = []
    cores = results["machine"]["cpus_available"]
    for profile, section in results["profiles"].items():
        targets += _profile_targets(profile, section, cores)
    dedup = results.get("dedup")
    if dedup:
        per_id = dedup["rss_bytes_per_id"]
        targets.append(_target(
            "dedup memory per transaction id", f"<= {TARGET_DEDUP_BYTES_PER_ID} B",
            f"{per_id:.1f} B", per_id <= TARGET_DEDUP_BYTES_PER_ID,
            f"over by {per_id - TARGET_DEDUP_BYTES_PER_ID:.1f} B/id"))
    targets.append(_latency_target(results.get("latency", {})))
    return targets


def _profile_targets(profile: str, section: dict, cores: int) -> list[dict]:
    by_name = {c["name"]: c for c in section["contenders"]}
    targets = []
    one = by_name.get("tallyflow-w1")
    if one and "events_per_s" in one and profile == "low":
        rate = one["events_per_s"]
        targets.append(_target(
            f"{profile}: tallyflow events/s per worker process", f">= {TARGET_EVENTS_PER_S:,}",
            f"{rate:,}", rate >= TARGET_EVENTS_PER_S,
            f"short by {TARGET_EVENTS_PER_S - rate:,}/s (needs {TARGET_EVENTS_PER_S / rate:.2f}x)"))
    for (target_profile, name), goal in RATIO_TARGETS.items():
        contender = by_name.get(name)
        if target_profile != profile or not contender or "ratio_vs_baseline" not in contender:
            continue
        ratio = contender["ratio_vs_baseline"]
        cpu = contender.get("cpu_ratio_vs_baseline")
        measured = f"{ratio:.2f}x" + (f" (CPU time: {cpu:.2f}x)" if cpu is not None else "")
        targets.append(_target(
            f"{profile}: {name} vs plain consumer", f">= {goal:g}x", measured, ratio >= goal,
            f"short by {goal - ratio:.2f}x (needs {goal / ratio:.2f}x faster)"))
    for key, label in (("threads_chdb", "1 -> 2 workers (-w 2, chdb)"),
                       ("threads_http", "1 -> 2 workers (-w 2, http)"),
                       ("processes_http", "1 -> 2 workers (2 processes, http)")):
        scaling = section.get("scaling", {}).get(key)
        if scaling:
            ratio = scaling["ratio"]
            ok = ratio >= TARGET_SCALING if cores >= 2 else None
            targets.append(_target(f"{profile}: {label}", f">= {TARGET_SCALING:g}x ({cores} cores)",
                                   f"{ratio:.2f}x", ok, f"short by {TARGET_SCALING - ratio:.2f}x"))
    for contender in section["contenders"]:
        if "failed" in contender:
            targets.append(_target(f"{profile}: {contender['name']} runs to its end", "exit 0",
                                   "failed", False, contender["failed"][:100]))
    checked = {name: check for name, check in section["correctness"].items() if "error" not in check}
    if checked:
        wrong = [name for name, check in checked.items() if not check["ok"]]
        targets.append(_target(f"{profile}: output equals recomputation", "exact",
                               "all finished runs" if not wrong else f"wrong: {', '.join(wrong)}",
                               not wrong, "see correctness"))
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
    """The printout: a table per traffic profile, then dedup, latency, targets."""
    parts = [format_profile(name, section) for name, section in results["profiles"].items()]
    dedup = results["dedup"]
    parts.append(f"dedup: {dedup['rss_bytes_per_id']:.1f} B/id (RSS), "
                 f"{dedup['tracemalloc_bytes_per_id']:.1f} B/id (tracemalloc), "
                 f"{dedup['snapshot_bytes_per_id']:.1f} B/id in a snapshot, {dedup['ids']:,} ids")
    parts.append(format_latency(results["latency"]))
    parts.append(format_targets(results["targets"]))
    load = results["machine"]["load_average"][0]
    if load > 0.5:
        parts.append(f"note: load average {load} when the run started; other work on this "
                     f"{results['machine']['nproc']}-core machine skews every figure")
    parts.append(f"results: {results.get('json_path', '(not written)')}")
    return "\n\n".join(parts)


def format_targets(targets: list[dict]) -> str:
    from state.text_table import format_table

    rows = [(t["name"], t["target"], str(t["measured"]), t["status"], t["gap"]) for t in targets]
    return format_table(["target", "goal", "measured", "status", "gap"], rows)


def format_profile(name: str, section: dict) -> str:
    """One profile's contenders as a table, with its stream and the memory per open key."""
    from state.text_table import format_table

    columns = ["contender", "events", "seconds", "events/s", "vs baseline", "CPU s",
               "vs baseline (CPU)", "rows/s", "peak RSS MB", "B/open key", "fixed s",
               "events/s excl. fixed", "note"]
    rows = []
    for c in section["contenders"]:
        if "skipped" in c or "failed" in c:
            note = c.get("skipped") or f"FAILED: {c['failed']}"[:120]
            rows.append((c["name"], *[""] * 11, note))
            continue
        note = ""
        if "correct" in c:
            note = "output correct" if c["correct"] else "OUTPUT WRONG"
        if "complete" in c and not c["complete"]:
            note = "did not read every record"
        rows.append((c["name"], f"{c['events']:,}", f"{c['seconds']:.2f}", f"{c['events_per_s']:,}",
                     f"{c['ratio_vs_baseline']:.2f}x", f"{c.get('cpu_seconds', 0):.1f}",
                     f"{c.get('cpu_ratio_vs_baseline', 0):.2f}x", _maybe(c, "rows_per_s"),
                     f"{c['peak_rss_mb']:.0f}", _maybe(c, "rss_bytes_per_open_key"),
                     f"{c['fixed_seconds']:.2f}", f"{c['steady_events_per_s']:,}", note))
    stream, profile = section["stream"], section["profile"]
    lines = [f"== {name}-cardinality profile: {profile['organizations']:,} orgs x "
             f"{profile['customers_per_org']:,} customers x {profile['codes']} codes",
             format_table(columns, rows),
             f"stream: {stream['records']:,} records over {stream['partitions']} partitions; "
             f"counted {stream['counted']:,}, duplicates {stream['duplicates']:,}, "
             f"late {stream['late']:,}, invalid {stream['invalid']:,}; "
             f"{stream['aggregate_rows']:,} minute rows, ~{stream['open_window_keys']:,} window keys "
             f"open at the peak (rollups included)"]
    if "py_spy" in section:
        lines.append(f"profile: {section['py_spy'].get('path') or section['py_spy'].get('skipped')}")
    return "\n".join(lines)


def _maybe(contender: dict, key: str) -> str:
    return f"{contender[key]:,}" if key in contender else ""


def format_latency(latency: dict) -> str:
    if not latency.get("measured"):
        return f"latency: not measured ({latency.get('reason', '')})"
    return (f"latency at {latency['rate']:,}/s (producer reached {latency['producer_rate']:,}/s), "
            f"{latency['window_ms']} ms windows, {latency['out_of_orderness_ms']} ms "
            f"out-of-orderness, SINK_FLUSH_INTERVAL={latency.get('sink_flush_interval')}: "
            f"event->row p50 {latency['event_to_row_ms']['p50']} ms, "
            f"p99 {latency['event_to_row_ms']['p99']} ms, max {latency['event_to_row_ms']['max']}"
            f" ms; overhead past window end + lateness p99 {latency['overhead_ms']['p99']} ms")
