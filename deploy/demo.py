"""`make run`: a local broker, sample traffic, the dataflow to the end, the rows.

Everything lives under ``var/demo`` and is started afresh on each run.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from deploy.broker import DevBroker, ensure_topic
from deploy.generator import generate, produce
from deploy.runner import REPO_ROOT, flow_environment, init_recovery_store, run_flow
from state.text_table import format_table

DEMO_DIR = REPO_ROOT / "var" / "demo"
PARTITIONS = 4
EVENTS = 50_000

SUMMARY_SQL = """
SELECT count() AS rows, sum(event_count) AS events, sum(total_value) AS total_value,
       min(window_start) AS first_window, max(window_end) AS last_window
FROM usage_aggregates FINAL
"""
ROWS_SQL = """
SELECT organization_id, code, window_start, sum(event_count) AS events, sum(total_value) AS total_value
FROM usage_aggregates FINAL
GROUP BY organization_id, code, window_start
ORDER BY window_start, organization_id, code
LIMIT 24
"""
LATE_SQL = "SELECT reason, count() AS late_events FROM usage_late_events FINAL GROUP BY reason"


def main() -> int:
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    DEMO_DIR.mkdir(parents=True)
    with DevBroker(log_path=DEMO_DIR / "broker.log") as broker:
        print(f"dev broker on {broker.bootstrap}", flush=True)
        ensure_topic(broker.bootstrap, "usage-events", PARTITIONS)
        ensure_topic(broker.bootstrap, "usage-events-dlq", 1)
        start_ms = (int(time.time() * 1000) // 60_000 - 10) * 60_000
        counts = produce(
            broker.bootstrap, "usage-events",
            generate(EVENTS, seed=7, partitions=PARTITIONS, start_ms=start_ms, span_ms=600_000),
            progress=True, total=EVENTS,
        )
        print(f"produced {counts}", flush=True)
        recovery = DEMO_DIR / "recovery"
        init_recovery_store(recovery)
        env = flow_environment(
            KAFKA_BOOTSTRAP_SERVERS=broker.bootstrap,
            CLICKHOUSE_URL=f"chdb://{DEMO_DIR / 'clickhouse'}",
            KAFKA_STOP_AT_END="1",
            LOG_LEVEL="WARNING",
        )
        port = env.get("METRICS_PORT", "9464")
        if port != "0":
            print(f"while it runs: http://127.0.0.1:{port}/status (live page), /metrics", flush=True)
        started = time.monotonic()
        run_flow(env, recovery_dir=recovery, snapshot_s=5, backup_s=30)
        print(f"dataflow finished in {time.monotonic() - started:.1f}s\n", flush=True)
    print_results(f"chdb://{DEMO_DIR / 'clickhouse'}")
    return 0


def print_results(url: str) -> None:
    from sinks.clickhouse_backend import connect

    backend = connect(url)
    try:
        for title, sql in (("usage_aggregates FINAL", SUMMARY_SQL),
                           ("per organization, code and minute (first 24)", ROWS_SQL),
                           ("usage_late_events", LATE_SQL)):
            columns, rows = backend.query(sql)
            print(f"== {title}\n{format_table(columns, rows)}\n")
    finally:
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
