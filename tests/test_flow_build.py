"""The flow is importable: building it in-process has no side effects; running it does them."""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from dataflows.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def process_state() -> tuple:
    return (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), gc.get_threshold(),
            list(logging.getLogger().handlers), threading.active_count())


def step_names(flow) -> list[str]:
    return [step.step_name for step in flow.substeps]


def test_building_the_flow_in_process_changes_nothing_in_the_process():
    before = process_state()
    import dataflows.usage as usage

    flow = usage.build_flow(Settings.from_env({"REDIS_URL": "", "LATE_TOPIC": "late"}))
    assert step_names(flow) == [
        "kafka_in", "to_shards",
        "usage_windows",  # the stateful step; then its typed streams, split in one place
        # ("usage_windows_rows" is the branch whose other side the rarer kinds are split from)
        "usage_windows_rows", "usage_windows_metric_rows", "usage_windows_late",
        "usage_windows_counted", "usage_windows_traces",
        "dead_letters", "dlq_out",
        "rows_and_traces", "clickhouse_out", "clickhouse_metrics_out", "clickhouse_late_out",
        "late_records", "late_topic_out",
    ]
    assert process_state() == before
    assert "flow" not in vars(usage)  # made only when bytewax.run asks for it


def test_the_built_flow_follows_its_settings():
    import dataflows.usage as usage

    with_redis = usage.build_flow(Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"}))
    assert {"live_totals", "live_totals_totals", "live_totals_alerts", "redis_totals_out"} \
        <= set(step_names(with_redis))
    assert "late_topic_out" not in step_names(with_redis)


def test_importing_the_flow_module_reads_no_environment():
    """A bad setting fails when the flow is made, not when the module is imported."""
    env = {**os.environ, "WINDOW_SIZE": "bogus", "METRICS_PORT": "0", "PYTHONPATH": str(REPO)}
    code = ("import dataflows.usage as u, signal; "
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL; "
            "u.flow")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "WINDOW_SIZE: not a duration: 'bogus'" in result.stderr
    assert "in __getattr__" in result.stderr  # raised on access, after the import succeeded


def loaded_after(code: str) -> set[str]:
    """The top-level packages a fresh interpreter has loaded after running ``code``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", f"{code}; import sys; print(*sys.modules)"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=120, check=True)
    return {name.split(".")[0] for name in result.stdout.split()}


def test_a_flow_without_redis_never_imports_redis():
    """redis-py (~0.15 s of every run's start-up) is imported only when a Redis feature is on."""
    code = ("import dataflows.usage as u; from dataflows.settings import Settings; "
            "u.build_flow(Settings.from_env({{'REDIS_URL': {!r}}}))")
    assert "redis" not in loaded_after(code.format(""))
    assert "redis" in loaded_after(code.format("redis://127.0.0.1:1/0"))


def test_arrow_batches_of_the_flow_never_import_pandas():
    """pyarrow imports pandas on its first array conversion (0.2-0.3 s of start-up) unless its
    probe is settled first; the sinks' batches then need no pandas, and pyarrow still converts
    to pandas when asked."""
    code = ("from dataflows.usage import settle_arrow_pandas_probe; settle_arrow_pandas_probe(); "
            "import sys; from sinks.columnar import in_key_order, window_batch; "
            "from state.records import WindowRow; "
            "rows = [WindowRow('o', f'c{i % 3}', 'x', 60_000 * i, 60_000 * (i + 1), 2, 10**20 + i, 1, False) "
            "for i in range(5)]; "
            "batch = in_key_order(window_batch(rows, 'usage_aggregates'), 'usage_aggregates'); "
            "print('pandas loaded:', 'pandas' in sys.modules, 'rows:', len(batch.to_pandas()))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.split() == ["pandas", "loaded:", "False", "rows:", "5"]


def test_a_clean_run_exits_without_teardown_and_loses_no_output(tmp_path):
    """The exit hook ends the process at once, after the hooks registered later, with the log
    handlers and standard streams flushed; an uncaught exception keeps the normal exit."""
    log_file = tmp_path / "flow.log"
    code = textwrap.dedent(f"""
        import atexit, logging, sys
        from dataflows.usage import exit_without_teardown

        atexit.register(exit_without_teardown)
        logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)
        atexit.register(lambda: logging.getLogger("flow").info("later hook ran"))

        class Torn:
            def __del__(self):
                print("torn down", file=sys.stderr)

        keep = Torn()
        sys.stdout.write("buffered, no newline")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert (clean.returncode, clean.stdout, clean.stderr) == (0, "buffered, no newline", "")
    assert log_file.read_text() == "INFO:flow:later hook ran\n"

    failed = subprocess.run([sys.executable, "-c", code + "\nraise RuntimeError('boom')"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert "RuntimeError: boom" in failed.stderr and "torn down" in failed.stderr


def test_a_flow_without_a_metrics_endpoint_loads_no_metrics_sdk_or_http_server():
    """With no METRICS_PORT and no OTLP endpoint nothing reads the instruments: the API's no-op
    provider takes every figure (the SDK is ~30 ms of start-up, http.server ~15 ms)."""
    code = textwrap.dedent("""
        import dataflows.usage as u
        from dataflows.settings import Settings
        from operators.telemetry import metrics
        u.prepare_process(Settings.from_env({"REDIS_URL": "", "METRICS_PORT": "0"}))
        metrics.declare_partition(0); metrics.declare_tables(["usage_aggregates"])
        metrics.record_consumed(0, 5); metrics.record_sink_write("usage_aggregates", 3, 0.01)
        metrics.record_snapshot(0.02); metrics.record_consumer_lag(0, 7)
        metrics.active().drain()
        import sys
        print(*sorted(name for name in sys.modules if name.startswith(("opentelemetry.sdk", "http.server"))))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert (run.returncode, run.stdout.strip()) == (0, ""), run.stderr
