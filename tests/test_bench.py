"""Smoke test of the benchmark machinery (`make bench`): a tiny run, its JSON, no timings judged.

Figures from a run this small mean nothing; what must hold is that every part runs, the JSON
has the fields tracking depends on, and the flow's output was checked and found exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.bench import BenchOptions, format_report, run_bench, scaled_value, summarize_profile

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
    assert written["schema"] == 1 and written["date"].endswith("+00:00")
    machine = written["machine"]
    assert machine["nproc"] >= 1 and machine["python"].startswith("3.")
    assert machine["versions"]["bytewax"] == "0.21.1"
    assert {"cpu_model", "memory_gb", "git_commit", "load_average"} <= machine.keys()


def test_every_contender_reports_throughput_and_memory(bench):
    _, written = bench
    contenders = {c["name"]: c for c in written["contenders"]}
    assert list(contenders) == ["baseline", "read-ceiling", "tallyflow-w1", "quix"]
    assert "skipped" in contenders["quix"]
    for name in ("baseline", "read-ceiling", "tallyflow-w1"):
        c = contenders[name]
        assert c["events"] == EVENTS
        assert c["seconds"] > 0 and c["events_per_s"] > 0 and c["steady_events_per_s"] > 0
        assert c["peak_rss_mb"] > 10
        assert c["ratio_vs_baseline"] > 0
    assert contenders["baseline"]["ratio_vs_baseline"] == 1.0
    baseline = contenders["baseline"]
    assert baseline["counted"] + baseline["rejected"] == EVENTS, "the baseline decodes every record"
    assert baseline["rejected"] < EVENTS // 20


def test_the_flow_output_was_checked_and_is_exact(bench):
    _, written = bench
    stream = written["stream"]
    assert stream["records"] == EVENTS
    assert stream["counted"] == EVENTS - stream["invalid"] - stream["late"] - stream["duplicates"]
    check = written["correctness"]["tallyflow-w1"]
    assert check["ok"], check
    assert check["counted"] == check["expected_counted"] == stream["counted"]
    assert check["differing_rows"] == 0
    assert check["dead_letters"] == check["expected_dead_letters"] == stream["invalid"]


def test_dedup_memory_and_targets_are_reported(bench):
    results, written = bench
    dedup = written["dedup"]
    assert dedup["ids"] == 20_000
    assert dedup["tracemalloc_bytes_per_id"] > 8 and dedup["snapshot_bytes_per_id"] == 8.0
    assert written["latency"] == {"measured": False, "reason": "skipped (--no-latency)"}
    targets = {t["name"]: t for t in written["targets"]}
    assert {t["status"] for t in targets.values()} <= {"PASS", "MISS", "NOT MEASURED"}
    assert targets["p99 event->row latency"]["status"] == "NOT MEASURED"
    assert targets["output equals recomputation"]["status"] == "PASS"
    assert all(t["gap"] for t in targets.values() if t["status"] == "MISS")
    report = format_report(results)
    assert "tallyflow-w1" in report and "output correct" in report


def test_helpers_sum_exactly_and_summarize_profiles():
    assert scaled_value("0.000000000000000001") == 1
    assert scaled_value("12") == 12 * 10**18
    with pytest.raises(ValueError):
        scaled_value("1e5")
    text = summarize_profile("main (a/x.py:1);hot (a/y.py:9) 9\nmain (a/x.py:2) 1")
    assert "90.0%  hot (a/y.py)" in text and "100.0%  main (a/x.py)" in text
