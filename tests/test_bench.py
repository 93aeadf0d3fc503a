"""Smoke test of the benchmark machinery (`make bench`): tiny runs, their JSON, no timings judged.

Figures from runs this small mean nothing; what must hold is that every part runs for both
traffic profiles, the JSON has the fields tracking depends on, the flow's output was checked
and found exact, and the scaling mode runs a real cluster against the discarding backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.bench import (
    PROFILES,
    BenchOptions,
    format_report,
    run_bench,
    scaled_value,
    summarize_profile,
)
from deploy.bench.orchestration import open_window_keys
from deploy.bench.scaling import format_scaling

REPO = Path(__file__).resolve().parents[1]

EVENTS = 5_000


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[dict, dict]:
    out_dir = tmp_path_factory.mktemp("bench-results")
    results = run_bench(BenchOptions(
        events=EVENTS, workers=(1,), processes=0, http_scaling=False, quix="skip",
        dedup_ids=20_000, latency=False, out_dir=out_dir, verbose=False,
    ))
    written = json.loads(Path(results["json_path"]).read_text())
    return results, written


def test_json_lands_in_the_output_directory_with_a_utc_stamp(bench):
    results, written = bench
    path = Path(results["json_path"])
    assert path.name.startswith("bench-") and path.name.endswith("Z.json")
    assert written["schema"] == 2 and written["date"].endswith("+00:00")
    machine = written["machine"]
    assert machine["nproc"] >= 1 and machine["python"].startswith("3.")
    assert machine["versions"]["bytewax"] == "0.21.1"
    assert {"cpu_model", "memory_gb", "git_commit", "load_average"} <= machine.keys()


def test_make_bench_runs_both_profiles_by_default(bench):
    _, written = bench
    assert BenchOptions().profiles == ("low", "high")
    assert list(written["profiles"]) == ["low", "high"]
    for name, section in written["profiles"].items():
        assert section["profile"]["keys"] == PROFILES[name].keys
    assert PROFILES["high"].keys == 200 * 5_000 * 10


def test_the_high_profile_has_about_one_row_per_event(bench):
    _, written = bench
    low, high = (written["profiles"][p]["stream"] for p in ("low", "high"))
    assert high["aggregate_rows"] > 0.8 * high["counted"], high
    windows = 11  # ten minutes of stream, plus jitter across one more window boundary
    assert low["aggregate_rows"] <= PROFILES["low"].keys * windows, low


def test_every_contender_reports_throughput_rows_and_memory(bench):
    _, written = bench
    for profile, section in written["profiles"].items():
        contenders = {c["name"]: c for c in section["contenders"]}
        expected = ["baseline", "read-ceiling", "tallyflow-w1", "tallyflow-w1-redis"]
        assert list(contenders) == expected + (["quix"] if profile == "low" else [])
        for name in expected:
            c = contenders[name]
            assert c["events"] == EVENTS
            assert c["seconds"] > 0 and c["events_per_s"] > 0 and c["steady_events_per_s"] > 0
            assert c["peak_rss_mb"] > 10
            assert c["ratio_vs_baseline"] > 0
        for name in ("tallyflow-w1", "tallyflow-w1-redis"):
            c = contenders[name]
            check = section["correctness"][name]
            assert c["rows_written"] == check["rows_written"] >= check["aggregate_rows"] > 0
            assert c["rows_per_s"] > 0 and c["rss_bytes_per_open_key"] >= 0
        assert contenders["tallyflow-w1-redis"]["redis"] is True
        baseline = contenders["baseline"]
        assert baseline["ratio_vs_baseline"] == 1.0
        assert baseline["counted"] + baseline["rejected"] == EVENTS, "the baseline decodes every record"
        assert baseline["rejected"] < EVENTS // 20


def test_the_flow_output_was_checked_and_is_exact(bench):
    _, written = bench
    for section in written["profiles"].values():
        stream = section["stream"]
        assert stream["records"] == EVENTS
        assert stream["counted"] == EVENTS - stream["invalid"] - stream["late"] - stream["duplicates"]
        for name in ("tallyflow-w1", "tallyflow-w1-redis"):
            check = section["correctness"][name]
            assert check["ok"], check
            assert check["counted"] == check["expected_counted"] == stream["counted"]
            assert check["differing_rows"] == 0
            assert check["dead_letters"] == check["expected_dead_letters"] == stream["invalid"]


def test_dedup_memory_and_targets_are_reported(bench):
    results, written = bench
    dedup = written["dedup"]
    assert dedup["ids"] == 20_000
    # a digest and its event time, 8 bytes each, per remembered id (state/counted.py)
    assert dedup["tracemalloc_bytes_per_id"] > 8 and dedup["snapshot_bytes_per_id"] == 16.0
    assert written["latency"] == {"measured": False, "reason": "skipped (--no-latency)"}
    targets = {t["name"]: t for t in written["targets"]}
    assert {t["status"] for t in targets.values()} <= {"PASS", "MISS", "NOT MEASURED"}
    assert targets["p99 event->row latency"]["status"] == "NOT MEASURED"
    for name in ("low: output equals recomputation", "high: output equals recomputation"):
        assert targets[name]["status"] == "PASS"
    assert {"low: tallyflow-w1 vs plain consumer", "high: tallyflow-w1 vs plain consumer",
            "high: tallyflow-w1-redis vs plain consumer"} <= targets.keys()
    assert all(t["gap"] for t in targets.values() if t["status"] == "MISS")
    report = format_report(results)
    assert "== low-cardinality" in report and "== high-cardinality" in report
    assert "tallyflow-w1-redis" in report and "output correct" in report and "rows/s" in report


def test_scaling_mode_runs_clusters_against_the_discarding_backend(tmp_path):
    results = run_bench(BenchOptions(events=3_000, profiles=("high",), scaling=True,
                                     scaling_max_processes=2, out_dir=tmp_path, verbose=False))
    assert results["mode"] == "scaling" and results["cores"] >= 1
    runs = results["profiles"]["high"]["runs"]
    assert [r["processes"] for r in runs] == [1, 2]
    assert runs[0]["factor_over_one"] == 1.0 and all(r["events_per_s"] > 0 for r in runs)
    assert len(runs[1]["peak_rss_mb_each"]) == 2, "two processes, each measured"
    text = format_scaling(results)
    assert f"{results['cores']} cores" in text and "discard://" in text


def test_open_window_keys_counts_two_minute_windows_and_the_rollups():
    minute = 60_000
    aggregates = {("o", f"c{i}", "x", w * minute): None for w in range(5) for i in range(w + 1)}
    # windows hold 1..5 keys: the largest consecutive pair is 4 + 5; hours and days: 5 each
    assert open_window_keys(aggregates) == 9 + 5 + 5


def test_helpers_sum_exactly_and_summarize_profiles():
    assert scaled_value("0.000000000000000001") == 1
    assert scaled_value("12") == 12 * 10**18
    with pytest.raises(ValueError):
        scaled_value("1e5")
    text = summarize_profile("main (a/x.py:1);hot (a/y.py:9) 9\nmain (a/x.py:2) 1")
    assert "90.0%  hot (a/y.py)" in text and "100.0%  main (a/x.py)" in text


def test_cpu_time_is_measured_for_every_child(bench):
    _, written = bench
    for section in written["profiles"].values():
        for c in section["contenders"]:
            if "events_per_s" in c:
                assert c["cpu_seconds"] > 0 and c["events_per_cpu_s"] > 0, c
                assert "cpu_ratio_vs_baseline" in c


def test_the_bench_children_start_from_bytecode_of_every_project_module():
    """The bench byte-compiles the project as the image does, so each flow process loads
    bytecode that matches its source instead of compiling it (PYTHONDONTWRITEBYTECODE)."""
    import importlib.util
    import tomllib

    from deploy.bench.process import PROJECT_PACKAGES, compile_project

    layers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]
    assert sorted(PROJECT_PACKAGES) == sorted(layers)
    compile_project()
    for package in PROJECT_PACKAGES:
        for source in (REPO / package).rglob("*.py"):
            header = Path(importlib.util.cache_from_source(str(source))).read_bytes()[:16]
            assert header[:4] == importlib.util.MAGIC_NUMBER, source
            assert int.from_bytes(header[8:12], "little") == int(source.stat().st_mtime), source
            assert int.from_bytes(header[12:16], "little") == source.stat().st_size, source
