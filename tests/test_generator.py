"""The traffic generator, the dev broker, the ``tallyflow generate``/``broker`` CLI and format_table."""

from __future__ import annotations

import doctest
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from deploy.broker import BrokerError, ensure_topic, topic_partitions
from deploy.cli import main
import deploy.generator
from deploy.generator import (
    KINDS,
    GeneratedRecord,
    ProduceError,
    generate,
    partition_for,
    produce,
)
import state.text_table
from state.text_table import format_table
from support.kafka import kafka_broker, read_all, unique_topic  # noqa: F401 (fixture)

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS = 86_400_000
_IDS = ("transaction_id", "organization_id", "external_customer_id", "code")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
_NUMERIC = re.compile(r"-?\d+(\.\d+)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def event_problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a valid event under the contract, or None: an independent, simple check."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "not UTF-8"
    try:
        doc = json.loads(text, parse_float=Decimal, parse_constant=_no_constants)
    except ValueError:
        return "not JSON"
    if not isinstance(doc, dict):
        return "not an object"
    for field in _IDS:
        if field not in doc:
            return "missing field"
        if not isinstance(doc[field], str):
            return "id not a string"
        if not 0 < len(doc[field]) <= 256:
            return "id empty or too long"
    if "timestamp" not in doc:
        return "missing field"
    stamp = doc["timestamp"]
    if isinstance(stamp, str):
        if not _RFC3339.fullmatch(stamp):
            return "timestamp not RFC 3339 with offset"
        try:
            datetime.fromisoformat(stamp)
        except ValueError:
            return "timestamp not a real time"
    elif isinstance(stamp, bool) or not isinstance(stamp, int):
        return "timestamp of wrong type"
    if "properties" in doc and not isinstance(doc["properties"], dict):
        return "properties not an object"
    value = doc.get("value")
    if value is None:
        return None
    if isinstance(value, str):
        if not _NUMERIC.fullmatch(value):
            return "value not numeric"
        value = Decimal(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        value = Decimal(value)
    elif not isinstance(value, Decimal):
        return "value of wrong type"
    if -value.as_tuple().exponent > 18:
        return "value with more than 18 decimals"
    return None


def stamp_ms(stamp: int | str) -> int:
    if isinstance(stamp, int):
        return stamp
    return (datetime.fromisoformat(stamp) - _EPOCH) // timedelta(milliseconds=1)


@pytest.fixture(scope="module")
def stream() -> list[GeneratedRecord]:
    return list(generate(50_000, seed=11, start_ms=START_MS))


# ---- the pure generator -------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes():
    first = list(generate(5_000, seed=7, start_ms=START_MS))
    assert first == list(generate(5_000, seed=7, start_ms=START_MS))
    assert first != list(generate(5_000, seed=8, start_ms=START_MS))
    assert len(first) == 5_000


@pytest.mark.parametrize("shares", [(0.05, 0.01, 0.001), (0.2, 0.1, 0.05), (0.0, 0.0, 0.0)])
def test_kind_shares_follow_the_arguments(shares):
    duplicate, malformed, very_late = shares
    count = 50_000
    kinds = Counter(r.kind for r in generate(
        count, seed=3, start_ms=START_MS, duplicate_share=duplicate,
        malformed_share=malformed, very_late_share=very_late,
    ))
    assert sum(kinds.values()) == count
    for kind, wanted in (("duplicate", duplicate), ("malformed", malformed), ("very_late", very_late)):
        assert kinds[kind] == pytest.approx(wanted * count, rel=0.25, abs=2), kind
    assert set(kinds) <= set(KINDS)


def test_events_are_valid_varied_and_keyed(stream):
    events = [r for r in stream if r.kind in ("event", "very_late")]
    docs = [json.loads(r.value, parse_float=Decimal) for r in events]
    for record, doc in zip(events, docs):
        assert event_problem(record.value) is None, record.value
        key = f"{doc['organization_id']}:{doc['external_customer_id']}".encode()
        assert record.key == key
        assert record.partition == partition_for(key, 4)
    assert len({d["transaction_id"] for d in docs}) == len(docs), "transaction ids must be unique"

    stamps = Counter(
        "epoch" if isinstance(d["timestamp"], int) else "Z" if d["timestamp"].endswith("Z") else "offset"
        for d in docs
    )
    assert 0.4 < stamps["epoch"] / len(docs) < 0.6
    assert stamps["Z"] > 0.1 * len(docs) and stamps["offset"] > 0.1 * len(docs)

    values = Counter(
        "absent" if "value" not in d else "null" if d["value"] is None
        else "string" if isinstance(d["value"], str) else "number"
        for d in docs
    )
    assert all(values[k] > 0.02 * len(docs) for k in ("absent", "null", "string", "number")), values
    scales = {-Decimal(d["value"]).as_tuple().exponent for d in docs if d.get("value") is not None}
    assert max(scales) == 18 and {0, 6} <= scales
    assert sum("properties" in d for d in docs) > 0.8 * len(docs)
    assert len({r.partition for r in events}) == 4


def test_event_times_advance_with_jitter(stream):
    count, span_ms, jitter_ms = len(stream), 600_000, 5_000
    offsets = []
    for i, record in enumerate(stream):
        if record.kind == "event":
            position = START_MS + span_ms * i // count
            offsets.append(stamp_ms(json.loads(record.value)["timestamp"]) - position)
    assert all(-jitter_ms <= o <= jitter_ms for o in offsets)
    assert min(offsets) < -4_000 and max(offsets) > 4_000, "events must arrive out of order"


def test_duplicates_resend_an_earlier_event_byte_for_byte(stream):
    first_seen: dict[bytes, tuple[int, GeneratedRecord]] = {}
    moved = 0
    duplicates = 0
    for i, record in enumerate(stream):
        if record.kind == "event":
            first_seen.setdefault(record.value, (i, record))
        elif record.kind == "duplicate":
            duplicates += 1
            assert record.value in first_seen, "a duplicate must re-send an earlier event"
            j, original = first_seen[record.value]
            assert 0 < i - j < 2_000, "a duplicate comes a little later"
            assert record.key == original.key
            assert original.partition == partition_for(original.key, 4)
            moved += record.partition != original.partition
    assert duplicates > 2_000
    assert 0.4 < moved / duplicates < 0.6, "about half of the duplicates land on another partition"


def test_malformed_records_are_not_valid_events_and_vary(stream):
    malformed = [r for r in stream if r.kind == "malformed"]
    problems = Counter()
    for record in malformed:
        problem = event_problem(record.value)
        assert problem is not None, record.value
        problems[problem] += 1
    assert set(problems) >= {
        "not UTF-8", "not JSON", "not an object", "missing field", "id not a string",
        "id empty or too long", "timestamp not RFC 3339 with offset", "timestamp not a real time",
        "timestamp of wrong type", "value not numeric", "value of wrong type",
        "value with more than 18 decimals", "properties not an object",
    }, problems
    values = [r.value for r in malformed]
    assert any(b'"timestamp":true' in v for v in values)
    assert any(re.search(rb'"timestamp":\d+\.\d+[,}]', v) for v in values), "float timestamp"
    assert any(re.search(rb'"timestamp":"[0-9T:.-]+"', v) for v in values), "naive timestamp"
    assert any(b'"value":"NaN"' in v or b'"value":"Infinity"' in v for v in values)
    assert any(re.search(rb'"(transaction_id|organization_id|external_customer_id|code)":"[^"]{300}"', v)
               for v in values)
    assert any(r.key is None for r in malformed)
    assert all(r.partition is not None and 0 <= r.partition < 4 for r in malformed)


def test_very_late_events_are_exactly_two_days_older_than_the_stream(stream):
    count = len(stream)
    late = [(i, r) for i, r in enumerate(stream) if r.kind == "very_late"]
    assert late
    for i, record in late:
        position = START_MS + 600_000 * i // count
        assert stamp_ms(json.loads(record.value)["timestamp"]) == position - 2 * DAY_MS


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        list(generate(10, start_ms=START_MS, duplicate_share=0.7, malformed_share=0.5))
    with pytest.raises(ValueError):
        list(generate(10, start_ms=START_MS, partitions=0))


# ---- against the real dev broker ----------------------------------------------------------------


def _by_partition(values):
    grouped = defaultdict(list)
    for partition, key, value in values:
        grouped[partition].append((key, value))
    return dict(grouped)


def test_produce_then_read_back_exactly_those_bytes_per_partition(kafka_broker):
    topic = unique_topic("produce")
    assert ensure_topic(kafka_broker.bootstrap, topic, 4) is True
    records = list(generate(20_000, seed=5, start_ms=START_MS))

    counts = produce(kafka_broker.bootstrap, topic, records)

    assert {kind: n for kind, n in counts.items() if n} == dict(Counter(r.kind for r in records))
    read = read_all(kafka_broker.bootstrap, topic)
    assert len(read) == 20_000
    assert _by_partition((m.partition(), m.key(), m.value()) for m in read) == _by_partition(
        (r.partition, r.key, r.value) for r in records
    )


def test_ensure_topic_is_idempotent_and_refuses_another_partition_count(kafka_broker):
    topic = unique_topic("ensure")
    assert topic_partitions(kafka_broker.bootstrap, topic) is None
    assert ensure_topic(kafka_broker.bootstrap, topic, 3) is True
    assert ensure_topic(kafka_broker.bootstrap, topic, 3) is False
    assert topic_partitions(kafka_broker.bootstrap, topic) == 3
    with pytest.raises(BrokerError, match="already exists with 3 partitions"):
        ensure_topic(kafka_broker.bootstrap, topic, 4)


def test_ensure_topic_names_the_topic_when_the_broker_does_not_answer():
    silent = socket.socket()  # accepts connections, never answers a Kafka request
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        with pytest.raises(BrokerError, match="creating topic 'quiet': the broker did not answer"):
            ensure_topic(f"127.0.0.1:{silent.getsockname()[1]}", "quiet", 1, timeout=1)
    finally:
        silent.close()


def test_produce_raises_when_a_record_is_not_delivered(kafka_broker):
    topic = unique_topic("fail")
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    with pytest.raises(ProduceError, match="1 of 2 records"):
        produce(kafka_broker.bootstrap, topic, [
            GeneratedRecord("event", 0, b"k", b"{}"),
            GeneratedRecord("event", 7, b"k", b"{}"),  # no partition 7
        ])


def test_cli_generate_end_to_end(kafka_broker, capsys):
    topic = unique_topic("cli")
    status = main([
        "generate", "--bootstrap", kafka_broker.bootstrap, "--topic", topic, "--partitions", "4",
        "--count", "3000", "--seed", "9", "--start", "2026-01-01T00:00:00Z", "--span", "5m",
        "--jitter", "2s", "--duplicates", "0.1", "--malformed", "0.02", "--very-late", "0.01",
        "--no-progress",
    ])

    assert status == 0
    expected = list(generate(
        3000, seed=9, start_ms=START_MS, span_ms=300_000, jitter_ms=2_000,
        duplicate_share=0.1, malformed_share=0.02, very_late_share=0.01,
    ))
    counts = Counter(r.kind for r in expected)
    out = capsys.readouterr().out
    assert f"produced 3000 records to {topic} (4 partitions)" in out
    for kind in KINDS:
        assert f"{kind}={counts[kind]}" in out
    read = read_all(kafka_broker.bootstrap, topic)
    assert _by_partition((m.partition(), m.key(), m.value()) for m in read) == _by_partition(
        (r.partition, r.key, r.value) for r in expected
    )


def test_cli_generate_adopts_an_existing_topic_and_refuses_a_mismatch(kafka_broker, capsys):
    topic = unique_topic("cli-existing")
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    base = ["generate", "--bootstrap", kafka_broker.bootstrap, "--topic", topic, "--count", "100",
            "--no-progress"]

    assert main(base) == 0
    assert "(2 partitions)" in capsys.readouterr().out
    assert main(base + ["--partitions", "4"]) == 1
    assert "already exists with 2 partitions" in capsys.readouterr().err
    assert len(read_all(kafka_broker.bootstrap, topic)) == 100


def test_cli_broker_serves_until_sigterm():
    topic = "usage-events"
    process = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "broker", "--topic", topic, "--partitions", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        line = process.stdout.readline().strip()
        assert re.fullmatch(r"KAFKA_BOOTSTRAP_SERVERS=127\.0\.0\.1:\d+", line), line
        bootstrap = line.split("=", 1)[1]
        assert topic_partitions(bootstrap, topic) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
        assert "stopping the broker" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- format_table ------------------------------------------------------------------------------


def test_format_table_aligns_and_keeps_decimals_exact():
    table = format_table(
        ["organization_id", "code", "total", "events"],
        [
            ("org_001", "storage_gb", Decimal("12.345678901234567890"), 3),
            ("org_002", "api_calls", Decimal("1.500"), 12_345),
            ("org_003", None, Decimal("1E-18"), None),
        ],
    )
    assert table.splitlines() == [
        "organization_id | code       |                 total | events",
        "----------------+------------+-----------------------+-------",
        "org_001         | storage_gb | 12.345678901234567890 |      3",
        "org_002         | api_calls  |                 1.500 |  12345",
        "org_003         | NULL       |  0.000000000000000001 |   NULL",
    ]


@pytest.mark.parametrize("module", [deploy.generator, state.text_table])
def test_docstring_examples_run(module):
    failed, attempted = doctest.testmod(module)
    assert attempted > 0 and failed == 0


def test_format_table_empty_result_and_text():
    assert format_table(["a", "b"], []) == "a | b\n--+--"
    assert format_table(["note"], [("two\nlines",)]) == "note\n----------\ntwo\\nlines"


def test_conflicting_copies_and_reused_ids_keep_the_id_and_change_the_rest():
    records = list(generate(4_000, seed=11, start_ms=START_MS, span_ms=3_600_000,
                            conflicting_share=0.05, reused_share=0.05, conflict_shift_ms=90_000))
    decoded = [(r, json.loads(r.value)) for r in records if r.kind != "malformed"]
    by_id = defaultdict(list)
    for record, event in decoded:
        by_id[(event["organization_id"], event["transaction_id"])].append((record, event))
    conflicting = [(r, e) for r, e in decoded if r.kind == "conflicting"]
    reused = [(r, e) for r, e in decoded if r.kind == "reused"]
    assert len(conflicting) > 100 and len(reused) > 100
    for record, event in conflicting:
        originals = [e for r, e in by_id[(event["organization_id"], event["transaction_id"])]
                     if r.kind == "event"]
        assert len(originals) == 1
        shift = abs(_ms(event["timestamp"]) - _ms(originals[0]["timestamp"]))
        assert shift <= 90_000
    assert len({r.partition for r, _e in conflicting}) == 4
    first_ids = {(e["organization_id"], e["transaction_id"])
                 for r, e in [(r, e) for r, e in decoded if r.kind == "event"][:256]}
    for record, event in reused:
        assert (event["organization_id"], event["transaction_id"]) in first_ids
    # Off by default, and then the stream is what it always was.
    assert list(generate(500, seed=11, start_ms=START_MS)) == list(
        generate(500, seed=11, start_ms=START_MS, conflicting_share=0.0, reused_share=0.0))


def _ms(timestamp) -> int:
    if isinstance(timestamp, int):
        return timestamp
    moment = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
