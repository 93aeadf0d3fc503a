"""Intake of one Kafka partition: validate, classify late events, route to shards.

This is the per-partition half of the flow. It owns the partition's event-time
watermark, so whether an event is late depends only on the events before it
in the same partition: a replay classifies every event the same way.

    >>> from state.window_kinds import TumblingWindows
    >>> intake = IntakeLogic("usage", partition=0, n_partitions=1, shards=2,
    ...                      windows=TumblingWindows(60_000), max_out_of_orderness_ms=0)
    >>> ev = b'{"transaction_id":"t","organization_id":"o","external_customer_id":"c",' \\
    ...      b'"code":"x","timestamp":%d}'
    >>> batch = intake.process([(0, None, ev % 120_000, None), (1, None, ev % 1_000, None),
    ...                         (2, None, b'{oops', None)])
    >>> [len(b.events) for b in batch.shard_batches()[1]], batch.late_by_shard[0][0][2].reason, batch.dead_letters[0].reason
    ([1, 0], 'window_closed', 'malformed_json')
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from itertools import count, repeat
from operator import itemgetter
from typing import Callable, Iterable

from operators.catalog import Catalog
from operators.validation import Invalid, validate_each
from state.compiled import compiled_function
from state.dedup import DIGEST_BIAS, digest_hash
from state.records import DeadLetter, LateRecord, ShardBatch, ShardEvent
from state.watermark import NO_WATERMARK, PartitionWatermark
from state.window_kinds import WindowKind

KafkaRecord = tuple
"""One Kafka record: ``(offset, key, value, headers, timestamp_ms)``.

``timestamp_ms`` is the record's timestamp as the log stores it (CreateTime, or LogAppendTime
on topics set so), None when the record has none. Records of four items (no timestamp) are
accepted too, for tools and tests: the ``MAX_FUTURE_SKEW`` check then has nothing to compare with.
"""

_VALUE = itemgetter(2)
"""A Kafka record's value."""


_INTERFACE = 1
"""The version of ``operators/_fastintake.c``'s ``scan`` this module calls (its ``INTERFACE``)."""


def _compiled_scan() -> Callable | None:
    """The compiled fast path's ``scan`` (``operators/_fastintake.c``, built by ``make install``)
    at :data:`_INTERFACE`, or None: the intake then runs in pure Python, slower, same results."""
    scan = compiled_function("operators._fastintake", _INTERFACE, "scan")
    return scan if DIGEST_BIAS == 2**63 else None  # scan subtracts 2**63 itself


_fast_scan = _compiled_scan()
"""What :meth:`IntakeLogic.process_columns` uses; tests set it to None for the pure path."""


def shard_of(organization_id: str, shards: int) -> int:
    """The shard that owns an organization's dedup state and windows (stable across processes)."""
    return zlib.crc32(organization_id.encode()) % shards


@dataclass
class IntakeBatch:
    """What one poll of one partition produced."""

    partition: int
    n_partitions: int
    shards: int
    watermark: int
    at_end: bool
    topic: str = ""
    idle: bool = False
    events_by_shard: dict[int, list] = field(default_factory=dict)
    late_by_shard: dict[int, list] = field(default_factory=dict)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    valid_count: int = 0
    consumed_count: int = 0
    metric_field_missing: int = 0
    traces_by_shard: dict[int, list] = field(default_factory=dict)  # see operators.telemetry

    def shard_batches(self) -> tuple[list[str], list[ShardBatch]]:
        """A batch for every shard, so each one learns this partition's watermark."""
        keys, batches = [], []
        for shard in range(self.shards):
            keys.append(str(shard))
            batches.append(
                ShardBatch(
                    self.partition,
                    self.n_partitions,
                    self.watermark,
                    self.at_end,
                    self.events_by_shard.get(shard, []),
                    self.late_by_shard.get(shard, []),
                    self.idle,
                    self.topic,
                    self.traces_by_shard.get(shard, []),
                )
            )
        return keys, batches


def _future(timestamp_ms: int, record_ms: int, max_skew_ms: int) -> Invalid:
    """Why an event dated too far past its record's timestamp is refused (``MAX_FUTURE_SKEW``).

    >>> _future(7_200_000, 0, 3_600_000).detail
    'event time 7200000 is 7200000 ms after its Kafka record timestamp 0 (MAX_FUTURE_SKEW 3600000 ms)'
    """
    return Invalid("future_timestamp", f"event time {timestamp_ms} is {timestamp_ms - record_ms} ms "
                                       f"after its Kafka record timestamp {record_ms} "
                                       f"(MAX_FUTURE_SKEW {max_skew_ms} ms)")


def _append(lists: dict[int, list], shard: int, item) -> None:
    items = lists.get(shard)
    if items is None:
        items = lists[shard] = []
    items.append(item)


class IntakeLogic:
    """Validates one partition's records and keeps its watermark."""

    def __init__(
        self,
        topic: str,
        partition: int,
        n_partitions: int,
        shards: int,
        windows: WindowKind,
        max_out_of_orderness_ms: int,
        allowed_lateness_ms: int = 0,
        max_event_ms: int | None = None,
        catalog: Catalog | None = None,
        max_future_skew_ms: int | None = None,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.n_partitions = n_partitions
        self.shards = shards
        self.windows = windows
        self.allowed_lateness_ms = allowed_lateness_ms
        self.max_future_skew_ms = max_future_skew_ms
        self.watermark = PartitionWatermark(max_out_of_orderness_ms, max_event_ms)
        self.catalog = catalog or Catalog()
        self._metrics_by_code = {code: self.catalog.for_code(code) for code in self.catalog.codes}
        self._routes: dict[str, tuple[int, bytes]] = {}

    def process(self, records: list[KafkaRecord], at_end: bool = False,
                idle: bool = False) -> IntakeBatch:
        """Validate ``records`` (:data:`KafkaRecord` tuples) in offset order: :meth:`process_columns`."""
        if records and len(records[0]) == 4:  # records without their timestamp (tools, tests)
            records = [(*record, None) for record in records]
        times = [(0, 0) if record[4] is None else (1, record[4]) for record in records]

        def letter_of(index: int) -> tuple:
            return records[index][1], records[index][3]

        return self.process_columns([record[0] for record in records], list(map(_VALUE, records)),
                                    times, letter_of, at_end, idle)

    def process_columns(self, offsets: list[int], values: list, record_times: Iterable[tuple[int, int]],
                        letter_of: Callable[[int], tuple], at_end: bool = False,
                        idle: bool = False) -> IntakeBatch:
        """Validate a poll given as columns, in offset order; each record ends valid, late or dead-lettered.

        ``record_times`` holds each record's ``(kind, timestamp_ms)`` as confluent-kafka's
        ``Message.timestamp()`` gives it (kind 0: no timestamp; read only with ``MAX_FUTURE_SKEW``),
        ``letter_of(index)`` the record's ``(key, headers)``, asked only for a dead letter.

        The hot path of the flow: the compiled ``scan`` finishes the usual events
        (:meth:`_intake_fast`), the Python loop the rest (:meth:`_intake_span`, the whole poll
        where the extension is not built); the watermark is written back once::

            >>> from state.window_kinds import TumblingWindows
            >>> intake = IntakeLogic("usage", partition=0, n_partitions=1, shards=1,
            ...                      windows=TumblingWindows(60_000), max_out_of_orderness_ms=0)
            >>> batch = intake.process_columns([5], [b"{oops"], [(0, 0)], lambda index: (b"k", [("h", b"v")]))
            >>> letter = batch.dead_letters[0]
            >>> letter.source_offset, letter.key, letter.headers, letter.reason
            (5, b'k', [('h', b'v')], 'malformed_json')
        """
        batch = IntakeBatch(self.partition, self.n_partitions, self.shards, 0, at_end,
                            self.topic, idle)
        batch.consumed_count = len(values)
        if self.max_future_skew_ms is None:  # no record timestamp is read
            record_times = None
        elif not isinstance(record_times, list):
            record_times = list(record_times)
        shard_events: list[list[ShardEvent]] = [[] for _ in range(self.shards)]
        max_event = self.watermark.max_event_ms
        if _fast_scan is None:
            max_event = self._intake_span(batch, shard_events, offsets, values, record_times, letter_of,
                                          0, len(values), max_event)
        else:
            max_event = self._intake_fast(batch, shard_events, offsets, values, record_times, letter_of,
                                          max_event)
        self.watermark.max_event_ms = max_event
        batch.events_by_shard = {shard: events for shard, events in enumerate(shard_events) if events}
        batch.valid_count = len(values) - len(batch.dead_letters)
        batch.watermark = (NO_WATERMARK if max_event is None
                           else max_event - self.watermark.max_out_of_orderness_ms)
        return batch

    def _intake_fast(self, batch: IntakeBatch, shard_events: list[list], offsets: list[int], values: list,
                     record_times: list | None, letter_of: Callable[[int], tuple],
                     max_event: int | None) -> int | None:
        """:meth:`_intake_span` over the whole poll with the compiled fast path (``_fastintake``).

        ``scan`` finishes the usual events and stops at the first message it leaves to the
        general rule; that one message goes through :meth:`_intake_span`, then ``scan`` goes on
        after it. Both paths give the same batch (``tests/test_fast_intake.py``).
        """
        step, end_offset = self.windows.last_end_steps()
        end_offset += self.allowed_lateness_ms
        codes = self._metrics_by_code
        metric_codes = frozenset(codes) if codes else None
        skew_limit = self.max_future_skew_ms or 0
        values = values if isinstance(values, list) else list(values)
        offsets = offsets if isinstance(offsets, list) else list(offsets)
        index, count_ = 0, len(values)
        while index < count_:
            index, max_event = _fast_scan(
                values, offsets, index, record_times, skew_limit, step, end_offset,
                self.watermark.max_out_of_orderness_ms, max_event, self._routes, digest_hash,
                ShardEvent, metric_codes, shard_events)
            if index < count_:
                max_event = self._intake_span(batch, shard_events, offsets, values, record_times,
                                              letter_of, index, index + 1, max_event)
                index += 1
        return max_event

    def _intake_span(self, batch: IntakeBatch, shard_events: list[list], offsets: list[int], values: list,
                     record_times: list | None, letter_of: Callable[[int], tuple], start: int, stop: int,
                     max_event: int | None) -> int | None:
        """Validate ``values[start:stop]`` in Python, appending to ``shard_events`` and ``batch``;
        the max event time after them.

        The pure-Python hot path: the span validated in one call (``validate_each``), locals
        instead of attribute lookups, each organization's shard and digest prefix cached, each
        shard's list appended to directly, the watermark tracked inline.
        """
        # due = last_end_for(timestamp) + lateness, inlined: timestamp - timestamp % step + offset
        step, end_offset = self.windows.last_end_steps()
        end_offset += self.allowed_lateness_ms
        out_of_orderness = self.watermark.max_out_of_orderness_ms
        watermark = NO_WATERMARK if max_event is None else max_event - out_of_orderness
        routes, metric_codes = self._routes, self._metrics_by_code
        digest_of, bias = digest_hash, DIGEST_BIAS
        max_skew = self.max_future_skew_ms
        if record_times is None:  # no record timestamp is read
            times, skew_limit = repeat((0, 0)), 0
        else:
            times, skew_limit = record_times[start:stop], max_skew
        dead_letters = batch.dead_letters
        append_to = [events.append for events in shard_events]
        spanned = values[start:stop] if start or stop < len(values) else values
        for index, event, (has_time, record_ms) in zip(count(start), validate_each(spanned), times):
            if event.__class__ is Invalid:
                dead_letters.append(self._dead_letter(offsets[index], values[index], letter_of(index), event))
                continue
            timestamp = event.timestamp_ms
            if has_time and timestamp - record_ms > skew_limit:
                dead_letters.append(self._dead_letter(offsets[index], values[index], letter_of(index),
                                                      _future(timestamp, record_ms, max_skew)))
                continue
            org = event.organization_id
            route = routes.get(org)
            if route is None:
                route = self._route(org)
            shard, digest_prefix = route
            digest = digest_of(digest_prefix + event.transaction_id.encode()) - bias  # transaction_digest
            due = timestamp - timestamp % step + end_offset
            if due <= watermark:
                late = (due, digest, self._late(offsets[index], values[index], event, watermark))
                _append(batch.late_by_shard, shard, late)
            else:
                code = event.code
                append_to[shard](ShardEvent(
                    digest, org, event.external_customer_id, code, timestamp, event.value_scaled,
                    watermark, offsets[index], event.transaction_id,
                    self._metric_values(event, batch) if metric_codes and code in metric_codes else None))
            if max_event is None or timestamp > max_event:
                max_event = timestamp
                watermark = max_event - out_of_orderness
        return max_event

    def _metric_values(self, event, batch: IntakeBatch) -> list:
        values = []
        for index, metric in self._metrics_by_code[event.code]:
            extracted = metric.extract(event.value_scaled, event.properties)
            if extracted is None:
                batch.metric_field_missing += 1  # counted; the event still counts in usage
                continue
            values.append((index, *extracted))
        return values

    def _route(self, organization_id: str) -> tuple[int, bytes]:
        """The organization's shard and the UTF-8 prefix of its transaction digests (cached).

        ``transaction_digest`` hashes ``f"{len(org)}:{org}{txn}"``: the prefix is the same for all
        of an organization's transactions, so only ``txn`` is encoded per event.
        """
        route = self._routes.get(organization_id)
        if route is None:
            if len(self._routes) > 100_000:
                self._routes.clear()
            route = self._routes[organization_id] = (
                shard_of(organization_id, self.shards), f"{len(organization_id)}:{organization_id}".encode())
        return route

    def _dead_letter(self, offset, value, letter: tuple, invalid: Invalid) -> DeadLetter:
        key, headers = letter
        return DeadLetter(
            key, value, list(headers or []), invalid.reason, invalid.detail,
            self.topic, self.partition, offset,
        )

    def _late(self, offset, value, event, watermark: int) -> LateRecord:
        return LateRecord(
            event.organization_id, event.external_customer_id, event.code,
            event.transaction_id, event.timestamp_ms, event.value_scaled,
            "window_closed", watermark, self.topic, self.partition, offset, value,
        )
