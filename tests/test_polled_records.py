"""A poll read in columns (``PolledRecords``, ``IntakeLogic.process_columns``) gives what the
record tuples gave: the same events, late records, dead letters (key, headers, reason, detail),
watermarks, and the same tuples for tracing; unreadable headers warn once, for records that need them.

The reference builds each record tuple the way the source did before (every accessor of every
message, the headers through a try/except written here) and runs ``IntakeLogic.process`` on it.
"""

from __future__ import annotations

import logging
import random
from datetime import datetime, timezone

import msgspec
import pytest
from confluent_kafka import KafkaError, Message

from operators.intake import IntakeLogic
from recovery.kafka_source import PolledRecords, UsagePartition
from state.window_kinds import TumblingWindows

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class _UnreadableHeaders(Message):
    def headers(self):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


def _value(rng: random.Random, at_ms: int) -> bytes:
    kind = rng.random()
    if kind < 0.08:
        return rng.choice([b"", b"{oops", b"[1]", b'{"transaction_id":""}', b'{"a":' * 70 + b"1" + b"}" * 70])
    stamp = at_ms + rng.randint(-90_000, 90_000)
    if kind < 0.12:
        stamp += 10 * 3_600_000  # far past its record time: future_timestamp when MAX_FUTURE_SKEW is set
    timestamp = str(stamp)
    if rng.random() < 0.5:  # RFC 3339, in UTC or at an offset
        timestamp = '"' + datetime.fromtimestamp(stamp / 1000, timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", rng.choice(["Z", "+00:00"])) + '"'
    value = rng.choice(["1", '"2.5"', "12345678901234567890", '"-1e-3"', "null"])
    return (f'{{"transaction_id":"t{rng.randrange(10**6)}","organization_id":"org_{rng.randrange(7)}",'
            f'"external_customer_id":"c{rng.randrange(50)}","code":"api_calls","timestamp":{timestamp},'
            f'"value":{value}}}').encode()


def _messages(seed: int, count: int) -> list:
    rng = random.Random(seed)
    messages = []
    for offset in range(count):
        at_ms = START_MS + offset * 50
        kind = rng.choice([Message, Message, Message, _UnreadableHeaders])
        messages.append(kind(
            topic="usage", partition=0, offset=offset, key=rng.choice([None, b"k%d" % offset]),
            value=_value(rng, at_ms), headers=rng.choice([None, [("trace", b"x")], [("a", b"1"), ("a", b"2")]]),
            timestamp=rng.choice([(1, at_ms), (1, at_ms), (2, at_ms - 1_000), (0, -1)])))
    return messages


def _reference_records(messages: list) -> list:
    """The record tuples as the source built them before, every field read for every message."""
    records = []
    for message in messages:
        try:
            headers = message.headers()
        except Exception:  # noqa: BLE001
            headers = None
        kind, timestamp_ms = message.timestamp()
        records.append((message.offset(), message.key(), message.value(), headers,
                        None if kind == 0 else timestamp_ms))
    return records


def _intake(skew_ms: int | None) -> IntakeLogic:
    return IntakeLogic("usage", 0, 1, 4, TumblingWindows(60_000), 5_000, 0, None, None,
                       max_future_skew_ms=skew_ms)


def _outcome(batch) -> tuple:
    return (batch.watermark, batch.valid_count, batch.consumed_count, batch.metric_field_missing,
            {shard: [msgspec.structs.astuple(e) for e in events] for shard, events in batch.events_by_shard.items()},
            {shard: [(due, digest, repr(late)) for due, digest, late in items]
             for shard, items in batch.late_by_shard.items()},
            [repr(letter) for letter in batch.dead_letters])


class _Consumer:
    def __init__(self, polls: list) -> None:
        self._polls = polls

    def assign(self, partitions) -> None:
        pass

    def consume(self, count, timeout):
        return self._polls.pop(0) if self._polls else []

    def get_watermark_offsets(self, partition, timeout=None, cached=False):
        return 0, 0


@pytest.mark.parametrize("skew_ms", [None, 3_600_000])
@pytest.mark.parametrize("seed", range(4))
def test_a_poll_read_in_columns_gives_what_the_record_tuples_gave(seed, skew_ms):
    messages = _messages(seed, 3_000)
    polls = [messages[start:start + 700] for start in range(0, len(messages), 700)]
    eof = Message(topic="usage", partition=0, offset=len(messages), error=KafkaError(KafkaError._PARTITION_EOF))
    polls[-1] = polls[-1] + [eof]
    source = UsagePartition(_Consumer(list(polls)), "usage", 0, _intake(skew_ms), None, batch_size=700,
                            stop_at_end=True)
    reference, reasons = _intake(skew_ms), set()
    for poll in polls:
        [batch] = source.next_batch()
        expected = reference.process(_reference_records([m for m in poll if m.error() is None]))
        assert _outcome(batch) == _outcome(expected)
        reasons |= {letter.reason for letter in batch.dead_letters}
    assert {"malformed_json", "empty_message", "too_deeply_nested"} <= reasons
    assert ("future_timestamp" in reasons) == (skew_ms is not None)
    assert source.snapshot().next_offset == len(messages)
    assert source.snapshot().max_event_ms == reference.watermark.max_event_ms
    with pytest.raises(StopIteration):
        source.next_batch()


def test_polled_records_read_as_the_record_tuples_tracing_reads(caplog):
    messages = _messages(9, 200)
    records = PolledRecords(messages, "usage", 0)
    with caplog.at_level(logging.WARNING, logger="recovery.kafka_source"):
        assert list(records) == _reference_records(messages)
        assert records[-1] == _reference_records(messages)[-1] and records[:3] == _reference_records(messages)[:3]
        assert [records.letter(i) for i in range(len(messages))] == [
            (record[1], record[3]) for record in _reference_records(messages)]
    unreadable = sum(isinstance(m, _UnreadableHeaders) for m in messages)
    assert unreadable and len([r for r in caplog.records if "unreadable" in r.getMessage()]) == unreadable


def test_headers_are_not_read_for_records_that_end_valid(caplog):
    value = (b'{"transaction_id":"t","organization_id":"o","external_customer_id":"c","code":"x",'
             b'"timestamp":%d}' % START_MS)
    messages = [_UnreadableHeaders(topic="usage", partition=0, offset=0, value=value, timestamp=(1, START_MS))]
    with caplog.at_level(logging.WARNING, logger="recovery.kafka_source"):
        [batch] = UsagePartition(_Consumer([messages]), "usage", 0, _intake(None), None, batch_size=10,
                                 stop_at_end=False).next_batch()
    assert batch.valid_count == 1 and not caplog.records
