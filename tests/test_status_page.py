"""``/metrics``, the live status page and ``tallyflow lag`` against a running flow.

The real broker, the dev ClickHouse server and ``dataflows.usage:flow`` in tail mode (it keeps
running) with ``METRICS_PORT`` set. A known stream is produced; once all of it is consumed and
rows have landed, every figure shown must match what the run did: the expected figures come from
reading the topic back and running the same per-partition intake over it. The page is loaded in
headless Chromium (JS has to have rendered the figures) and a screenshot is kept in
``test-artifacts/status-page.png``. Last, SIGTERM must stop the flow with exit 0.

A second test runs the flow with two workers, ``TRACE_SAMPLE_RATIO`` and OTLP to a local
receiver: the totals stay exact, metrics arrive, and a sampled event's spans link
decode → window → sink, continuing a ``traceparent`` found in a Kafka header.

Chromium is Debian's ``chromium`` package; without it these page tests skip, or fail under
``CI=true``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.broker import ensure_topic, free_port
from deploy.cli import main as tallyflow
from deploy.dev_clickhouse import DevClickHouseServer
from deploy.generator import generate, produce
from deploy.runner import REPO_ROOT, bytewax_command, init_recovery_store
from oracle.decode import decode
from sinks.clickhouse_backend import connect
from support.clickhouse import before_first_write
from support.flow import flow_env
from support.kafka import read_all, unique_topic

pytestmark = pytest.mark.integration

START_MS = 1_767_225_600_000
COUNT = 8_000
PARTITIONS = 4
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"


@dataclass
class Expected:
    """What the run must report, from the topic itself."""

    consumed: dict[int, int]
    invalid_by_reason: dict[str, int]
    late: int
    watermarks: dict[int, int]
    duplicates_at_most: int


@dataclass
class Run:
    url: str
    process: subprocess.Popen
    clickhouse_url: str
    expected: Expected


WINDOW_MS, OUT_OF_ORDERNESS_MS, FUTURE_SKEW_MS = 60_000, 10_000, 3_600_000  # the run's settings


def expected_from_topic(bootstrap: str, topic: str) -> Expected:
    """What the run must report, from the topic and the README's rules (``tests/oracle``), not
    from the flow's code: per partition in offset order, a valid event is late when the
    partition's watermark (newest event time − MAX_OUT_OF_ORDERNESS) has reached its window's end."""
    by_partition: dict[int, list] = {}
    for message in read_all(bootstrap, topic, timeout=60):
        by_partition.setdefault(message.partition(), []).append(
            (message.offset(), message.value(), message.timestamp()[1]))
    invalid, late, watermarks, seen, duplicates = Counter(), 0, {}, set(), 0
    for partition, records in by_partition.items():
        newest = None
        for _offset, value, record_ms in sorted(records):
            event = decode(value)
            if isinstance(event, str):
                invalid[event] += 1
                continue
            if event.timestamp_ms > record_ms + FUTURE_SKEW_MS:
                invalid["future_timestamp"] += 1
                continue
            window_end = event.timestamp_ms - event.timestamp_ms % WINDOW_MS + WINDOW_MS
            late += newest is not None and newest - OUT_OF_ORDERNESS_MS >= window_end
            newest = event.timestamp_ms if newest is None else max(newest, event.timestamp_ms)
            identity = (event.organization_id, event.transaction_id)
            duplicates += identity in seen
            seen.add(identity)
        watermarks[partition] = newest - OUT_OF_ORDERNESS_MS
    return Expected({p: len(r) for p, r in by_partition.items()}, dict(invalid), late, watermarks, duplicates)


def fetch_json(url: str) -> dict:
    with urllib.request.urlopen(url + "/status.json", timeout=5) as response:
        return json.loads(response.read())


def aggregate_rows(clickhouse_url: str) -> int:
    backend = connect(clickhouse_url)
    try:
        return before_first_write(
            lambda: int(backend.query("SELECT count() FROM usage_aggregates")[1][0][0]), 0)
    finally:
        backend.close()


def caught_up(run_url: str, clickhouse_url: str) -> bool:
    try:
        status = fetch_json(run_url)
    except OSError:
        return False
    partitions = status["partitions"]
    return (status["totals"]["consumed"] == COUNT and len(partitions) == PARTITIONS
            and all(p["lag"] == 0 for p in partitions) and status["snapshot"] is not None
            and status["sink"] is not None and aggregate_rows(clickhouse_url) > 0)


@pytest.fixture(scope="module")
def running_flow(kafka_broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("status-page")
    bootstrap = kafka_broker.bootstrap
    topic, dlq = unique_topic("usage"), unique_topic("dlq")
    ensure_topic(bootstrap, topic, PARTITIONS)
    ensure_topic(bootstrap, dlq, 1)
    records = list(generate(COUNT, seed=17, partitions=PARTITIONS, start_ms=START_MS, span_ms=1_200_000,
                            malformed_share=0.02))
    produce(bootstrap, topic, records)
    expected = expected_from_topic(bootstrap, topic)
    assert sum(expected.consumed.values()) == COUNT
    assert sum(expected.invalid_by_reason.values()) == sum(r.kind == "malformed" for r in records)

    server = DevClickHouseServer(str(tmp / "clickhouse"), host="127.0.0.1", port=0).start()
    recovery = tmp / "recovery"
    init_recovery_store(recovery)
    port = free_port()
    env = flow_env(bootstrap, topic, dlq, server.url, TALLYFLOW_SHARDS="8", KAFKA_BATCH_SIZE="500",
                   SINK_BATCH_ROWS="500", SINK_FLUSH_INTERVAL="200ms",
                   METRICS_PORT=str(port), METRICS_HOST="127.0.0.1")
    del env["KAFKA_STOP_AT_END"]  # tail mode: the flow keeps running
    # Not start_flow(): conftest kills the flows it started after every test, and this one has
    # to outlive each test of the module (the fixture stops it itself).
    process = subprocess.Popen(
        bytewax_command(recovery_dir=recovery, snapshot_s=1, backup_s=10), env=env, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not caught_up(url, server.url):
            assert process.poll() is None, f"the flow exited with {process.returncode}"
            assert time.monotonic() < deadline, f"the flow did not catch up: {fetch_json(url)}"
            time.sleep(0.5)
        yield Run(url, process, server.url, expected)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        server.stop()


def metric_samples(url: str) -> dict[str, list]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def by_label(samples: list, label: str) -> dict:
    return {labels[label]: value for labels, value in samples}


def test_metrics_match_what_the_run_did(running_flow):
    expected = running_flow.expected
    rows_in_clickhouse = aggregate_rows(running_flow.clickhouse_url)  # first: metrics only grow
    metrics = metric_samples(running_flow.url)

    consumed = by_label(metrics["tallyflow_events_consumed_total"], "partition")
    assert consumed == {str(p): n for p, n in expected.consumed.items()}
    assert sum(consumed.values()) == COUNT
    invalid = by_label(metrics["tallyflow_events_invalid_total"], "reason")
    assert {reason: n for reason, n in invalid.items() if n} == expected.invalid_by_reason
    assert set(expected.invalid_by_reason) < set(invalid)  # the other known reasons read 0
    invalid_total = sum(expected.invalid_by_reason.values())
    assert metrics["tallyflow_events_valid_total"] == [({}, COUNT - invalid_total)]
    assert metrics["tallyflow_events_late_total"] == [({}, expected.late)]
    [(_, duplicates)] = metrics["tallyflow_events_duplicate_total"]
    assert 0 < duplicates <= expected.duplicates_at_most

    rows_written = by_label(metrics["tallyflow_rows_written_total"], "table")
    assert rows_written["usage_aggregates"] >= rows_in_clickhouse > 0
    [(_, windows_closed)] = metrics["tallyflow_windows_closed_total"]
    assert windows_closed >= rows_written["usage_aggregates"]
    batches = by_label(metrics["tallyflow_sink_batch_rows_count"], "table")
    assert batches["usage_aggregates"] >= 1
    written = {table: n for table, n in rows_written.items() if n}  # the others read 0 from start
    assert by_label(metrics["tallyflow_sink_batch_rows_sum"], "table") == written
    assert by_label(metrics["tallyflow_sink_write_seconds_count"], "table") == batches
    [(_, snapshots)] = metrics["tallyflow_snapshot_seconds_count"]
    assert snapshots >= 1

    assert by_label(metrics["tallyflow_watermark_ms"], "partition") == {
        str(p): w for p, w in expected.watermarks.items()}
    newest_event = max(expected.watermarks.values()) + 10_000  # MAX_OUT_OF_ORDERNESS
    assert by_label(metrics["tallyflow_watermark_delay_ms"], "partition") == {
        str(p): newest_event - w for p, w in expected.watermarks.items()}
    assert by_label(metrics["tallyflow_consumer_lag"], "partition") == {str(p): 0 for p in range(PARTITIONS)}


def test_every_series_the_dashboard_queries_is_served(running_flow):
    import re

    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "tallyflow.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]
    queried = {name for expr in exprs for name in re.findall(r"\b(tallyflow_[a-z_]+)\b", expr)}
    served = set(metric_samples(running_flow.url))
    assert queried and queried <= served, sorted(queried - served)


class StatusDom(HTMLParser):
    """Figures the page rendered: ``data-value`` by element id, per partition row, and texts."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self.texts: dict[str, str] = {}
        self.partitions: dict[str, dict[str, str]] = {}
        self.lists: dict[str, dict[str, str]] = {}
        self.polylines = 0
        self._list: str | None = None
        self._row: str | None = None
        self._text_of: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self._text_of = a["id"]
            self.texts[a["id"]] = ""
            if "data-value" in a:
                self.values[a["id"]] = a["data-value"]
        if tag == "tr" and "data-partition" in a:
            self._row = a["data-partition"]
            self.partitions[self._row] = {}
        if tag == "td" and self._row is not None and "data-field" in a:
            self.partitions[self._row][a["data-field"]] = a.get("data-value", "")
        if tag == "ul" and "id" in a:
            self._list = a["id"]
            self.lists[self._list] = {}
        if tag == "b" and "data-key" in a and self._list is not None:
            self.lists[self._list][a["data-key"]] = a.get("data-value", "")
        if tag == "polyline":
            self.polylines += 1

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None
        if tag == "ul":
            self._list = None

    def handle_data(self, data):
        if self._text_of is not None:
            self.texts[self._text_of] += data
            self._text_of = None


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        message = f"headless Chromium is missing: {CHROMIUM_INSTALL}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_chromium(tmp_path: Path, url: str, *options: str) -> subprocess.CompletedProcess:
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=4000", *options, url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_status_page_shows_the_run_in_chromium(running_flow, tmp_path):
    expected = running_flow.expected
    done = run_chromium(tmp_path, running_flow.url + "/status", "--dump-dom")
    page = StatusDom()
    page.feed(done.stdout)

    assert page.texts.get("conn") == "live", "the page's JS did not fetch /status.json"
    invalid_total = sum(expected.invalid_by_reason.values())
    assert page.values["consumed"] == str(COUNT)
    assert page.values["invalid"] == str(invalid_total)
    assert page.values["valid"] == str(COUNT - invalid_total)
    assert page.values["late"] == str(expected.late)
    assert 0 < int(page.values["duplicates"]) <= expected.duplicates_at_most
    assert int(page.values["rows_written"]) > 0 and int(page.values["windows_closed"]) > 0
    assert page.values["lag_total"] == "0"
    assert "shard state took" in page.texts["snapshot_detail"], "the flow runs with a recovery store"
    assert float(page.values["sink_age"]) >= 0 and float(page.values["snapshot_age"]) >= 0
    assert page.texts["consumed"] == f"{COUNT:,}"
    assert page.lists["invalid_by_reason"] == {r: str(n) for r, n in expected.invalid_by_reason.items()}
    assert int(page.lists["rows_by_table"]["usage_aggregates"]) > 0
    assert {p: row["consumed"] for p, row in page.partitions.items()} == {
        str(p): str(n) for p, n in expected.consumed.items()}
    assert {p: row["lag"] for p, row in page.partitions.items()} == {str(p): "0" for p in range(PARTITIONS)}
    assert {p: row["watermark_ms"] for p, row in page.partitions.items()} == {
        str(p): str(w) for p, w in expected.watermarks.items()}
    assert page.polylines == 2, "both sparklines drawn"

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "status-page.png"
    screenshot.unlink(missing_ok=True)
    run_chromium(tmp_path, running_flow.url + "/status", f"--screenshot={screenshot}",
                 "--window-size=1280,900")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000


def test_lag_command_reads_the_running_flow(running_flow, capsys):
    assert tallyflow(["lag", "--url", running_flow.url]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[2:2 + PARTITIONS]]
    assert [(int(r[0]), int(r[1]), int(r[2])) for r in rows] == [
        (p, running_flow.expected.consumed[p], 0) for p in range(PARTITIONS)]


def test_sigterm_stops_the_observed_flow_cleanly(running_flow):
    running_flow.process.send_signal(signal.SIGTERM)
    assert running_flow.process.wait(timeout=60) == 0


# ---- OTLP: metrics and sampled traces from a real flow ------------------------------------------


class Collector:
    """A tiny OTLP/HTTP receiver on loopback: keeps every decoded export request."""

    def __init__(self) -> None:
        import gzip
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans: list = []
        self.metric_names: set[str] = set()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    collector.spans += [span for rs in request.resource_spans
                                        for ss in rs.scope_spans for span in ss.spans]
                elif self.path == "/v1/metrics":
                    request = ExportMetricsServiceRequest.FromString(body)
                    collector.metric_names |= {m.name for rm in request.resource_metrics
                                               for sm in rm.scope_metrics for m in sm.metrics}
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def clickhouse_process(tmp_path):
    """The dev ClickHouse server as a child process (``tallyflow dev-clickhouse``): this test
    process already hosts the module's server, and chdb hosts one directory per process."""
    port, password = free_port(), secrets.token_urlsafe(12)
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "dev-clickhouse", "--data", str(tmp_path / "ch"),
         "--port", str(port)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "DEV_CLICKHOUSE_PASSWORD": password})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/ping", timeout=2):
                    break
            except OSError:
                assert server.poll() is None, "the dev ClickHouse server exited"
                assert time.monotonic() < deadline, "the dev ClickHouse server did not answer"
                time.sleep(0.2)
        yield f"http://default:{password}@127.0.0.1:{port}/default"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_tracing_on_keeps_results_exact_and_exports_decode_window_sink(kafka_broker, clickhouse_process):
    """Two workers, a traceparent header, OTLP to a local receiver: same totals, linked spans.

    ClickHouse is the dev HTTP server, so a chdb engine inside a 2-worker flow process (which
    once aborted with a double free; see ``operators.telemetry.metrics.Telemetry.drain``) cannot make
    this test flaky.
    """
    from confluent_kafka import Producer

    from deploy.runner import run_flow
    from recovery.reconcile import diff, recompute
    from support.flow import read_output

    bootstrap = kafka_broker.bootstrap
    topic, dlq = unique_topic("usage"), unique_topic("dlq")
    ensure_topic(bootstrap, topic, PARTITIONS)
    ensure_topic(bootstrap, dlq, 1)
    produce(bootstrap, topic, list(generate(6_000, seed=29, partitions=PARTITIONS, start_ms=START_MS,
                                            span_ms=600_000)))
    upstream_trace = 0x0AF7651916CD43DD8448EB211C80319C
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, partition=0, value=json.dumps({
        "transaction_id": "traced-1", "organization_id": "org-traced", "external_customer_id": "c",
        "code": "api_calls", "timestamp": START_MS + 700_000, "value": "1"}).encode(),  # on time
        headers=[("traceparent", f"00-{upstream_trace:032x}-b7ad6b7169203331-01".encode())])
    assert producer.flush(10) == 0
    raw = [(m.partition(), m.offset(), m.value()) for m in read_all(bootstrap, topic)]
    expected = recompute(raw, window_size_ms=60_000, max_out_of_orderness_ms=10_000)

    collector = Collector()
    try:
        env = flow_env(bootstrap, topic, dlq, clickhouse_process, TALLYFLOW_SHARDS="8", METRICS_PORT="0",
                       TRACE_SAMPLE_RATIO="0.01", OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
                       OTEL_METRIC_EXPORT_INTERVAL="500", ENRICH_FIELDS="off")
        run_flow(env, timeout=120, workers=2)
    finally:
        collector.close()

    output = read_output(clickhouse_process)
    assert diff(expected.aggregates, output.aggregates) == []

    assert {"tallyflow.events.consumed", "tallyflow.rows.written"} <= collector.metric_names
    by_id = {span.span_id: span for span in collector.spans}
    inserts = [s for s in collector.spans if s.name.startswith("insert ")]
    assert inserts, f"no sink span among {sorted({s.name for s in collector.spans})}"
    chains = []
    for insert in inserts:
        window = by_id.get(insert.parent_span_id)
        decode = by_id.get(window.parent_span_id) if window is not None else None
        if window is not None and decode is not None:
            assert window.name == "window" and decode.name == f"decode {topic}"
            assert insert.trace_id == window.trace_id == decode.trace_id
            chains.append(decode)
    assert chains, "no complete decode → window → sink chain"
    continued = [s for s in chains if int.from_bytes(s.trace_id, "big") == upstream_trace]
    assert continued, "the traceparent header's trace was not continued"
    assert continued[0].parent_span_id == bytes.fromhex("b7ad6b7169203331")
