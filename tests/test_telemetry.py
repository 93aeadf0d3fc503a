"""The telemetry API and its endpoints, without a flow: names, labels, no-ops, exporters, traces."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.broker import free_port
from deploy.cli import main as tallyflow
from deploy.runner import REPO_ROOT, flow_environment
from operators.intake import IntakeLogic
from operators.telemetry import metrics
from operators.telemetry.board import StatusBoard
from operators.telemetry.lag import LagProbe
from operators.telemetry.settings import TelemetryError
from operators.telemetry.setup import configure_telemetry, shutdown_telemetry
from operators.telemetry.tracing import MAX_TRACED_PER_BATCH, IntakeTracing, WindowTracing, trace_sink
from operators.usage_windows import UsageWindowLogic, UsageWindowParams
from state.records import ShardBatch
from state.window_kinds import TumblingWindows

START_MS = 1_767_225_600_000


@pytest.fixture(autouse=True)
def no_telemetry_left():
    shutdown_telemetry()
    yield
    shutdown_telemetry()


def configure(**env: str):
    settings = {"METRICS_PORT": str(free_port()), "METRICS_HOST": "127.0.0.1", **env}
    return configure_telemetry(settings)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, "", ""


def samples(url: str) -> dict:
    """{family name: (type, [(sample name, labels, value)])} of ``url``/metrics."""
    _status, _kind, text = get(url + "/metrics")
    return {family.name: (family.type, [(s.name, s.labels, s.value) for s in family.samples])
            for family in text_string_to_metric_families(text)}


def intake_batch(partition: int, consumed: int, dead: list[str], watermark: int) -> SimpleNamespace:
    """What ``record_intake`` reads of an ``operators.intake.IntakeBatch``."""
    return SimpleNamespace(partition=partition, consumed_count=consumed, valid_count=consumed - len(dead),
                           dead_letters=[SimpleNamespace(reason=reason) for reason in dead],
                           late_by_shard={}, metric_field_missing=0, watermark=watermark)


def record_a_run() -> None:
    dead = ["malformed_json"] * 6 + ["missing_field"] * 4
    metrics.record_intake(intake_batch(0, 600, dead, START_MS + 50_000), START_MS + 60_000)
    metrics.record_intake(intake_batch(1, 400, [], START_MS + 20_000), START_MS + 30_000)
    metrics.record_duplicates(40)
    metrics.record_late(3)
    metrics.record_windows_closed(120)
    metrics.record_sink_write("usage_aggregates", 120, 0.02)
    metrics.record_sink_write("usage_late_events", 3, 0.004)
    metrics.record_sink_retry("usage_aggregates")
    metrics.record_snapshot(0.003)
    metrics.record_consumer_lag(0, 25)
    metrics.record_consumer_lag(1, -7)  # the dev broker under-reports its end offset


def event(txn: str, ts: int, org: str = "org-1") -> bytes:
    return json.dumps({"transaction_id": txn, "organization_id": org, "external_customer_id": "c",
                       "code": "api_calls", "timestamp": ts, "value": "1.5"}).encode()


class RaisingConsumer:
    def get_watermark_offsets(self, *args, **kwargs):
        raise AssertionError("the lag probe must not touch Kafka while telemetry is off")


def test_every_call_is_a_cheap_no_op_before_configure():
    assert metrics.active() is None
    record_a_run()
    metrics.record_intake(intake_batch(0, 0, [], -(2**63)), None)
    metrics.record_source_snapshot()
    LagProbe("t", 0).maybe_record(RaisingConsumer(), 10)
    assert IntakeTracing("t", 0).begin([(0, None, b"{}", [("traceparent", b"x")])]) is None
    items = [object()]
    with trace_sink(items) as flushed:
        assert flushed is items
    assert WindowTracing().closed([object()]) == []

    calls = 200_000
    started = time.perf_counter()
    for _ in range(calls):
        metrics.record_consumed(0, 500)
    per_call = (time.perf_counter() - started) / calls
    assert per_call < 2e-6, f"a no-op record call costs {per_call * 1e9:.0f} ns"


def test_metrics_come_out_under_the_dashboard_names():
    observability = configure()
    record_a_run()
    families = samples(observability.url)

    def values(name: str, kind: str) -> dict:
        assert name in families, f"{name} missing from /metrics: {sorted(families)}"
        assert families[name][0] == kind
        return {(sample, tuple(sorted(labels.items()))): value
                for sample, labels, value in families[name][1]}

    assert values("tallyflow_events_consumed", "counter") == {
        ("tallyflow_events_consumed_total", (("partition", "0"),)): 600,
        ("tallyflow_events_consumed_total", (("partition", "1"),)): 400,
    }
    counted = {"malformed_json": 6, "missing_field": 4}  # every other known reason reads 0
    assert values("tallyflow_events_invalid", "counter") == {
        ("tallyflow_events_invalid_total", (("reason", reason),)): counted.get(reason, 0)
        for reason in INVALID_REASONS
    }
    for name, value in [("tallyflow_events_valid", 990), ("tallyflow_events_duplicate", 40),
                        ("tallyflow_events_late", 3), ("tallyflow_windows_closed", 120)]:
        assert values(name, "counter") == {(name + "_total", ()): value}
    assert values("tallyflow_rows_written", "counter") == {
        ("tallyflow_rows_written_total", (("table", "usage_aggregates"),)): 120,
        ("tallyflow_rows_written_total", (("table", "usage_late_events"),)): 3,
    }
    assert values("tallyflow_sink_retries", "counter") == {  # a table written to reads 0, not nothing
        ("tallyflow_sink_retries_total", (("table", "usage_aggregates"),)): 1,
        ("tallyflow_sink_retries_total", (("table", "usage_late_events"),)): 0}

    batch_rows = values("tallyflow_sink_batch_rows", "histogram")
    assert batch_rows[("tallyflow_sink_batch_rows_count", (("table", "usage_aggregates"),))] == 1
    assert batch_rows[("tallyflow_sink_batch_rows_sum", (("table", "usage_aggregates"),))] == 120
    assert batch_rows[("tallyflow_sink_batch_rows_bucket", (("le", "500"), ("table", "usage_aggregates")))] == 1
    write = values("tallyflow_sink_write_seconds", "histogram")
    assert write[("tallyflow_sink_write_seconds_sum", (("table", "usage_aggregates"),))] == pytest.approx(0.02)
    snapshot = values("tallyflow_snapshot_seconds", "histogram")
    assert snapshot[("tallyflow_snapshot_seconds_count", ())] == 1

    assert values("tallyflow_watermark_ms", "gauge") == {
        ("tallyflow_watermark_ms", (("partition", "0"),)): START_MS + 50_000,
        ("tallyflow_watermark_ms", (("partition", "1"),)): START_MS + 20_000,
    }
    # Behind the newest event this process has seen (partition 0's, at +60 s).
    assert values("tallyflow_watermark_delay_ms", "gauge") == {
        ("tallyflow_watermark_delay_ms", (("partition", "0"),)): 10_000,
        ("tallyflow_watermark_delay_ms", (("partition", "1"),)): 40_000,
    }
    assert values("tallyflow_consumer_lag", "gauge") == {
        ("tallyflow_consumer_lag", (("partition", "0"),)): 25,
        ("tallyflow_consumer_lag", (("partition", "1"),)): 0,
    }
    # Nothing leaks the OpenTelemetry naming (scope labels, target_info, unit suffixes).
    tallyflow_families = {name for name in families if name.startswith("tallyflow")}
    expected = {
        "tallyflow_events_consumed", "tallyflow_events_invalid", "tallyflow_events_valid",
        "tallyflow_events_duplicate", "tallyflow_events_late", "tallyflow_windows_closed",
        "tallyflow_rows_written", "tallyflow_sink_batch_rows", "tallyflow_sink_write_seconds",
        "tallyflow_sink_retries", "tallyflow_snapshot_seconds", "tallyflow_watermark_ms",
        "tallyflow_watermark_delay_ms", "tallyflow_consumer_lag", "tallyflow_enrichment_lookups",
        "tallyflow_alerts", "tallyflow_live_totals_written", "tallyflow_live_totals_redis_errors",
        "tallyflow_live_totals_resyncs", "tallyflow_metric_field_missing",
    }
    assert tallyflow_families == expected  # one metrics system: nothing beside the instruments
    assert "target_info" not in families
    # prometheus_client's default registry comes along (process metrics, Bytewax's Python side).
    assert any(name.startswith("process_") or name.startswith("python_") for name in families)


def test_status_endpoints():
    observability = configure()
    record_a_run()
    status, kind, body = get(observability.url + "/status.json")
    assert status == 200 and kind == "application/json"
    data = json.loads(body)
    assert data["totals"] == {"consumed": 1000, "valid": 990, "invalid": 10, "duplicates": 40,
                              "late": 3, "windows_closed": 120, "rows_written": 123, "sink_retries": 1,
                              "metric_field_missing": 0}
    assert data["invalid_by_reason"] == {"malformed_json": 6, "missing_field": 4}
    assert [(p["partition"], p["consumed"], p["lag"]) for p in data["partitions"]] == [(0, 600, 25), (1, 400, 0)]
    assert data["lag_total"] == 25
    assert data["sink"]["table"] == "usage_late_events" and data["sink"]["rows"] == 3
    assert data["snapshot"]["age_s"] >= 0

    for path in ("/", "/status"):
        status, kind, page = get(observability.url + path)
        assert status == 200 and kind.startswith("text/html")
        assert "status.json" in page
        # The network is closed: the page must not load anything from elsewhere.
        assert "http://" not in page and "https://" not in page and "src=" not in page
    assert get(observability.url + "/healthz")[:1] == (200,)
    assert get(observability.url + "/nope")[0] == 404


def test_status_history_gives_rates():
    now = [1_000.0]
    board = StatusBoard(clock=lambda: now[0])
    board.tick()
    for _ in range(3):
        now[0] += 1
        board.consumed(0, 2_000)
        board.consumer_lag(0, 500)
        board.tick()
    status = board.status()
    assert status["history"]["events_per_s"] == [2_000.0, 2_000.0, 2_000.0]
    assert status["history"]["lag"] == [500, 500, 500]
    assert status["rates"]["events_per_s"] == 2_000.0


def test_snapshot_age_follows_source_snapshots_and_keeps_the_shard_duration():
    now = [50.0]
    board = StatusBoard(clock=lambda: now[0])
    board.snapshot_taken(0.004)
    now[0] += 3
    board.snapshot_taken(None)  # the source's offsets: a resume point, no duration
    now[0] += 0.5
    assert board.status()["snapshot"] == {"last_ms": 53_000, "age_s": 0.5, "seconds": 0.004}


def test_lag_probe_reads_the_cached_end_offset_at_most_once_a_second():
    configure(METRICS_PORT="0")
    now = [100.0]
    calls = []

    class Consumer:
        def get_watermark_offsets(self, tp, cached=False):
            calls.append((tp.partition, cached))
            return 0, 1_000

    probe = LagProbe("usage", 3, clock=lambda: now[0])
    probe.maybe_record(Consumer(), 400)
    probe.maybe_record(Consumer(), 500)  # within the second: skipped
    now[0] += 1.5
    probe.maybe_record(Consumer(), 1_200)  # past the reported end: clamped
    assert calls == [(3, True), (3, True)]
    assert metrics.active().board.lags() == [(3, 0)]

    metrics.record_consumer_lag(3, 40)
    probe.maybe_record(Consumer(), 1_300, eof_offset=1_300)  # at the end: 0 at once, no call
    assert calls == [(3, True), (3, True)]
    assert metrics.active().board.lags() == [(3, 0)]
    fresh = LagProbe("usage", 4, clock=lambda: now[0])
    fresh.maybe_record(Consumer(), -2, eof_offset=0)  # an empty partition: nothing read, no lag
    assert dict(metrics.active().board.lags())[4] == 0


def test_intake_batches_report_metric_values_that_are_missing(tmp_path):
    from operators.catalog import load_catalog
    from operators.intake import IntakeLogic
    from state.window_kinds import TumblingWindows

    catalog_file = tmp_path / "metrics.toml"
    catalog_file.write_text('[[metric]]\nname = "gb"\ncode = "api_calls"\naggregation = "sum"\n'
                            'field = "properties.gb"\n')
    observability = configure()
    intake = IntakeLogic("usage", 0, 1, 2, TumblingWindows(60_000), 0, catalog=load_catalog(str(catalog_file)))
    batch = intake.process([(0, None, event("t1", START_MS), None), (1, None, event("t2", START_MS), None)])
    metrics.record_intake(batch, intake.watermark.max_event_ms)
    families = samples(observability.url)
    assert [s[2] for s in families["tallyflow_metric_field_missing"][1]] == [2]
    assert observability.telemetry.board.status()["totals"]["metric_field_missing"] == 2


def test_metrics_port_zero_serves_nothing_and_still_counts():
    observability = configure(METRICS_PORT="0")
    assert observability.server is None and observability.url is None
    metrics.record_consumed(2, 7)
    assert observability.telemetry.board.status()["totals"]["consumed"] == 7


def test_a_taken_port_is_a_warning_not_a_crash(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.WARNING):
            observability = configure(METRICS_PORT=str(port))
    assert observability.server is None
    assert any("metrics port in use" in r.getMessage() for r in caplog.records)
    metrics.record_consumed(0, 1)


@pytest.mark.parametrize("env, message", [
    ({"METRICS_PORT": "http"}, "METRICS_PORT"),
    ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
    ({"TRACE_SAMPLE_RATIO": "2"}, "TRACE_SAMPLE_RATIO"),
])
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(TelemetryError, match=message):
        configure_telemetry(env)


def test_otlp_endpoint_with_nothing_listening_does_not_break_start_up(tmp_path):
    metrics_port, dead_port = free_port(), free_port()
    script = textwrap.dedent(f"""
        import json, urllib.request
        from operators.telemetry import metrics
        from operators.telemetry.setup import configure_telemetry
        observability = configure_telemetry()
        metrics.record_consumed(0, 5)
        with urllib.request.urlopen("{{}}/metrics".format(observability.url), timeout=5) as r:
            assert b'tallyflow_events_consumed_total{{partition="0"}} 5.0' in r.read()
        print("started")
    """)
    env = flow_environment(
        METRICS_PORT=str(metrics_port), METRICS_HOST="127.0.0.1",
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{dead_port}", OTEL_EXPORTER_OTLP_TIMEOUT="1",
        OTEL_METRIC_EXPORT_INTERVAL="200", TRACE_SAMPLE_RATIO="1",
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "started"
    assert time.monotonic() - started < 30, "exit waits on a dead collector for too long"


def test_a_sampled_event_is_traced_decode_window_sink():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    # A ratio this small picks nothing by chance: only the sampled traceparent is followed.
    configure_telemetry({"METRICS_PORT": "0", "TRACE_SAMPLE_RATIO": "0.000000001"}, span_exporter=spans)
    upstream_trace, upstream_span = 0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7
    sampled = [("traceparent", f"00-{upstream_trace:032x}-{upstream_span:016x}-01".encode())]
    not_sampled = [("traceparent", f"00-{upstream_trace + 1:032x}-{upstream_span:016x}-00".encode())]
    records = [
        (0, None, event("t0", START_MS + 1_000), None),
        (1, None, event("t1", START_MS + 2_000), sampled),
        (2, None, event("t2", START_MS + 3_000), not_sampled),
        (3, None, b"{oops", sampled),
    ]
    windows = TumblingWindows(60_000)
    intake = IntakeLogic("usage", 0, 1, 1, windows, 0)
    tracing = IntakeTracing("usage", 0)
    begun = tracing.begin(records)
    batch = intake.process(records)
    tracing.end(batch, begun)
    assert [len(c) for c in batch.traces_by_shard.values()] == [1]

    logic = UsageWindowLogic(UsageWindowParams(windows, 86_400_000, 1))
    window_tracing = WindowTracing()
    shard_batch = ShardBatch(0, 1, batch.watermark, True, batch.events_by_shard[0])
    window_tracing.add(batch.traces_by_shard[0])
    rows, _ = logic.on_batch([shard_batch])
    carriers = window_tracing.closed(rows)
    assert len(carriers) == 1 and carriers[0].table == "usage_aggregates"
    with trace_sink(list(rows) + carriers) as flushed:  # the traces stream merged into the rows'
        assert flushed == list(rows)  # the sink never sees the carriers

    decoded = {s.attributes["messaging.kafka.offset"]: s for s in spans.get_finished_spans()
               if s.name == "decode usage"}
    assert sorted(decoded) == [1, 3]  # offset 2's upstream said "not sampled"
    assert decoded[3].attributes["tallyflow.outcome"] == "invalid"
    assert decoded[3].attributes["error.type"] == "malformed_json"
    finished = {span.name: span for span in spans.get_finished_spans()}
    assert sorted(finished) == ["decode usage", "insert usage_aggregates", "window"]
    decode, window, sink = decoded[1], finished["window"], finished["insert usage_aggregates"]
    assert {s.context.trace_id for s in (decode, window, sink)} == {upstream_trace}
    assert decode.parent.span_id == upstream_span
    assert window.parent.span_id == decode.context.span_id
    assert sink.parent.span_id == window.context.span_id
    assert decode.attributes["messaging.destination.partition.id"] == "0"
    assert decode.attributes["messaging.kafka.offset"] == 1
    assert window.attributes["tallyflow.window_start_ms"] == START_MS
    assert metrics.active().board.status()["recent_traces"] == [f"{upstream_trace:032x}"] * 2


def test_the_ratio_picks_records_without_a_parent():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    configure_telemetry({"METRICS_PORT": "0", "TRACE_SAMPLE_RATIO": "1"}, span_exporter=spans)
    records = [(i, None, event(f"t{i}", START_MS + i), None) for i in range(100)]
    intake = IntakeLogic("usage", 0, 1, 2, TumblingWindows(60_000), 0)
    tracing = IntakeTracing("usage", 0)
    begun = tracing.begin(records)
    tracing.end(intake.process(records), begun)
    decoded = [s for s in spans.get_finished_spans() if s.name == "decode usage"]
    assert len(decoded) == MAX_TRACED_PER_BATCH
    assert all(s.parent is None and s.attributes["tallyflow.outcome"] == "windowed" for s in decoded)


def test_lag_command_prints_the_partition_table(capsys):
    observability = configure()
    record_a_run()
    assert tallyflow(["lag", "--url", observability.url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split("|")[0].strip() == "partition"
    assert [line.split("|")[2].strip() for line in lines[2:4]] == ["25", "0"]
    assert "total lag 25" in out


def test_lag_command_merges_the_processes_of_a_cluster(capsys):
    """Two processes' status servers (one is this process's, one a canned answer): one table."""
    observability = configure()
    record_a_run()  # partitions 0 and 1, lag 25 and 0
    other = {"partitions": [{"partition": 2, "consumed": 300, "lag": 5, "watermark_ms": START_MS + 70_000,
                             "max_event_ms": START_MS + 80_000}],
             "totals": {"consumed": 300, "invalid": 1, "late": 0, "duplicates": 2},
             "rates": {"events_per_s": 10.0}, "lag_total": 5}

    class Canned(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(other).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Canned)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert tallyflow(["lag", "--url", url, "--url", observability.url]) == 0
    finally:
        server.shutdown()
        server.server_close()
    out = capsys.readouterr().out
    rows = [[cell.strip() for cell in line.split("|")] for line in out.splitlines()[2:5]]
    # partition, consumed, lag, watermark, behind the cluster's newest event (partition 2's)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [
        ("0", "600", "25", "30.0"), ("1", "400", "0", "60.0"), ("2", "300", "5", "10.0")]
    assert "total lag 30" in out and "consumed 1300" in out


def test_lag_command_says_when_no_flow_answers(capsys):
    assert tallyflow(["lag", "--url", f"http://127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert "no flow answers" in capsys.readouterr().err


# ---- every documented counter exists from the start ----------------------------------------------

README = (REPO_ROOT / "README.md").read_text()


def documented_counters() -> set[str]:
    """The ``*_total`` series of the README's /metrics table (``a_total`` / ``_b_total`` rows too)."""
    names = set()
    for line in README.splitlines():
        cells = line.strip().split("|")
        if len(cells) < 3 or not cells[1].strip().startswith("`tallyflow_"):
            continue
        listed = [name.strip().strip("`") for name in cells[1].split("/")]
        first = listed[0]
        for name in listed:
            if name.startswith("_"):
                name = first[:first.rfind("_", 0, first.rfind("_total"))] + name
            if name.endswith("_total"):
                names.add(name)
    return names


def documented_invalid_reasons() -> set[str]:
    """The DLQ reasons the README lists (section "Input, and what bad input gets")."""
    sentence = README.split("Reasons: ", 1)[1].split("The flow never", 1)[0]
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", sentence))


INVALID_REASONS = sorted(documented_invalid_reasons())


def counter_values(url: str) -> dict[str, list[tuple[dict, float]]]:
    """{sample name: [(labels, value)]} of every ``*_total`` sample at ``url``/metrics."""
    out: dict[str, list] = {}
    for _family, (_kind, found) in samples(url).items():
        for name, labels, value in found:
            if name.endswith("_total"):
                out.setdefault(name, []).append((labels, value))
    return out


def test_the_readme_documents_the_counters_this_test_checks():
    assert {"tallyflow_events_late_total", "tallyflow_events_invalid_total",
            "tallyflow_live_totals_resyncs_total", "tallyflow_sink_rows_rejected_total"} \
        <= documented_counters()
    assert {"malformed_json", "future_timestamp", "invalid_value"} <= set(INVALID_REASONS)


def test_counters_read_zero_before_their_first_event():
    observability = configure()
    counters = counter_values(observability.url)
    assert counters["tallyflow_events_late_total"] == [({}, 0.0)]
    assert sorted(labels["reason"] for labels, _ in counters["tallyflow_events_invalid_total"]) \
        == INVALID_REASONS
    not_per_partition_or_table = {name for name in documented_counters()
                                  if name not in ("tallyflow_events_consumed_total",
                                                  "tallyflow_rows_written_total",
                                                  "tallyflow_sink_retries_total",
                                                  "tallyflow_sink_rows_rejected_total")}
    for name in not_per_partition_or_table:
        assert name in counters, f"{name} is not on /metrics before its first event"
        assert all(value == 0 for _labels, value in counters[name]), (name, counters[name])


@pytest.mark.integration
def test_a_flow_scraped_right_after_start_shows_every_documented_counter_at_zero(kafka_broker, chdb_url):
    from deploy.broker import ensure_topic
    from deploy.runner import start_flow
    from support.flow import flow_env
    from support.kafka import unique_topic

    topic, dlq = unique_topic("usage"), unique_topic("dlq")
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    ensure_topic(kafka_broker.bootstrap, dlq, 1)
    port = free_port()
    env = flow_env(kafka_broker.bootstrap, topic, dlq, chdb_url, KAFKA_STOP_AT_END="0",
                   METRICS_PORT=str(port), METRICS_HOST="127.0.0.1", REDIS_URL="")
    process = start_flow(env)
    url = f"http://127.0.0.1:{port}"
    try:
        counters: dict = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                counters = counter_values(url)
            except (urllib.error.URLError, OSError):
                counters = {}
            partitions = {labels.get("partition") for labels, _ in counters.get("tallyflow_events_consumed_total", [])}
            if partitions >= {"0", "1"} and "tallyflow_rows_written_total" in counters:
                break
            assert process.poll() is None, "the flow stopped"
            time.sleep(0.2)
        missing = documented_counters() - set(counters)
        assert not missing, f"not on /metrics right after start: {sorted(missing)}"
        for name in documented_counters():
            assert all(value == 0 for _labels, value in counters[name]), (name, counters[name])
        tables = {labels["table"] for labels, _ in counters["tallyflow_rows_written_total"]}
        assert {"usage_aggregates", "usage_late_events", "metric_aggregates"} <= tables
        rejected = {(labels["table"], labels["reason"]) for labels, _ in counters["tallyflow_sink_rows_rejected_total"]}
        assert ("usage_aggregates", "total_out_of_range") in rejected
    finally:
        process.terminate()
        process.wait(timeout=60)
