"""What the flow's tables must hold for the raw records of a topic, recomputed plainly.

The rules, straight from the README (none of the flow's code is used):

1. A record is valid when its value passes :mod:`.decoding` and its event time is at most
   ``MAX_FUTURE_SKEW`` after the record's Kafka timestamp. Per partition, in offset order,
   a valid event's **watermark** is the largest event time
   of the valid events before it in that partition minus ``MAX_OUT_OF_ORDERNESS``. It
   is **on time** while the last window that can hold it ends (plus
   ``ALLOWED_LATENESS``) after that watermark; otherwise it is **late**.
2. **Dedup:** among the on-time copies of one (organization_id, transaction_id), taken
   in order of (event time, partition, offset), a copy counts when no counted copy has
   an event time within ``DEDUP_HORIZON`` before it; the others are duplicates. A late
   copy is a duplicate when a counted copy lies within the horizon of it (either side)
   or an earlier late copy within the horizon before it was already reported; otherwise
   it goes to ``usage_late_events`` (reason ``window_closed``). A copy more than the
   horizon behind (its watermark had passed the end of the window holding its time +
   the horizon, plus lateness) is reported as it comes, never deduplicated: no state
   remembers that far.
3. A counted event adds to each of its windows still open at its watermark (fixed
   windows: ``start + size + lateness > watermark``); sessions are the groups of
   counted events less than ``SESSION_GAP`` apart, per customer and code.
4. **Rollups:** every counted event once, in the UTC hour and day of its own time.
5. **Catalog metrics:** the counted events of the metric's code whose field is usable,
   in the metric's own windows (same lateness rule); an event too late for all of them
   goes to ``usage_late_events`` with reason ``window_closed:metric:<name>``.

    >>> ev = b'{"transaction_id":"%s","organization_id":"o","external_customer_id":"c","code":"x","timestamp":%d,"value":"0.1"}'
    >>> result = recompute([(0, 0, ev % (b"a", 1_000)), (1, 0, ev % (b"a", 1_000)), (0, 1, ev % (b"b", 2_000))],
    ...                    window_size_ms=60_000, max_out_of_orderness_ms=0)
    >>> result.aggregates, result.duplicates
    ({('o', 'c', 'x', 0): (2, Decimal('0.200000000000000000'))}, 1)
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Iterable

from recovery.reconcile.catalog import MetricSpec
from recovery.reconcile.decoding import SCALE, Event, decode
from recovery.reconcile.rules import Rules
from recovery.reconcile.windows import GRAIN_MS, Windows

RawRecord = tuple  # (partition, offset, value bytes[, Kafka record timestamp ms or None])
AggregateKey = tuple  # (organization_id, external_customer_id, code, window_start_ms)
MetricKey = tuple  # (metric, organization_id, external_customer_id, group_key, window_start_ms)
LateKey = tuple  # (source_partition, source_offset, reason)
_WIDE = decimal.Context(prec=200)


@dataclass(frozen=True)
class Copy:
    """One valid record of the topic, with its partition's watermark just before it."""

    event: Event
    partition: int
    offset: int
    watermark: int | None  # None: the first valid event of its partition

    @property
    def order(self) -> tuple[int, int, int]:
        return self.event.timestamp_ms, self.partition, self.offset


@dataclass(frozen=True)
class LateRow:
    """A row of ``usage_late_events`` without its raw bytes and topic."""

    organization_id: str
    external_customer_id: str
    code: str
    transaction_id: str
    event_time_ms: int
    value: Decimal
    watermark_ms: int


@dataclass
class Recomputation:
    """Every table the flow writes, as ``{key: values}``, and how the records were classified."""

    aggregates: dict[AggregateKey, tuple[int, Decimal]] = field(default_factory=dict)
    rollups: dict[str, dict[AggregateKey, tuple[int, Decimal]]] = field(default_factory=dict)
    metrics: dict[MetricKey, tuple[int, Decimal]] = field(default_factory=dict)
    late_rows: dict[LateKey, LateRow] = field(default_factory=dict)
    invalid: set[tuple[int, int]] = field(default_factory=set)
    duplicates: int = 0
    counted: list[tuple[Event, int | None]] = field(default_factory=list)  # (event, watermark)
    metrics_recomputed: tuple[str, ...] = ()  # catalog metrics in ``metrics``
    metrics_skipped: tuple[str, ...] = ()  # catalog metrics reconcile cannot recompute

    @property
    def late(self) -> set[tuple[str, str]]:
        """(organization_id, transaction_id) of every late row."""
        return {(row.organization_id, row.transaction_id) for row in self.late_rows.values()}


def recompute(records: Iterable[RawRecord], rules: Rules | None = None, **settings) -> Recomputation:
    """The expected tables for ``records`` under ``rules`` (or ``Rules.of(**settings)``)."""
    rules = rules or Rules.of(**settings)
    result = Recomputation(rollups={grain: {} for grain in rules.rollups},
                           metrics_recomputed=tuple(m.name for m in rules.metrics),
                           metrics_skipped=rules.metrics_skipped)
    copies = _classified(records, rules, result)
    counted = _deduplicated(copies, rules, result)
    result.counted = [(c.event, c.watermark) for c in counted]
    _windows_of(counted, rules.windows, rules.allowed_lateness_ms, result.aggregates)
    for grain, rows in result.rollups.items():
        for copy in counted:
            event = copy.event
            ts = event.timestamp_ms
            _add(rows, (*_usage_key(event), ts - ts % GRAIN_MS[grain]), 1, event.value_scaled)
    for metric in rules.metrics:
        _metric(metric, counted, rules.allowed_lateness_ms, result)
    result.aggregates = _as_decimals(result.aggregates)
    result.rollups = {grain: _as_decimals(rows) for grain, rows in result.rollups.items()}
    return result


def _classified(records: Iterable[RawRecord], rules: Rules, result: Recomputation) -> list[Copy]:
    """Valid records with their partition's watermark; invalid positions go to ``result``.

    An event dated more than ``MAX_FUTURE_SKEW`` after its record's Kafka timestamp (when
    the record carries one) is invalid too, and does not move the watermark.
    """
    out_of_orderness_ms, skew_ms = rules.max_out_of_orderness_ms, rules.max_future_skew_ms
    by_partition: dict[int, list[tuple[int, bytes, int | None]]] = {}
    for partition, offset, value, *record_ms in records:
        by_partition.setdefault(partition, []).append((offset, value, record_ms[0] if record_ms else None))
    copies = []
    for partition in sorted(by_partition):
        newest = None
        for offset, value, record_ms in sorted(by_partition[partition], key=lambda record: record[0]):
            event = decode(value)
            if event is None or (skew_ms is not None and record_ms is not None
                                 and event.timestamp_ms - record_ms > skew_ms):
                result.invalid.add((partition, offset))
                continue
            watermark = None if newest is None else newest - out_of_orderness_ms
            copies.append(Copy(event, partition, offset, watermark))
            newest = event.timestamp_ms if newest is None else max(newest, event.timestamp_ms)
    return copies


def is_on_time(copy: Copy, windows: Windows, lateness_ms: int) -> bool:
    """Whether the last window that can hold the copy is still open at its watermark."""
    return copy.watermark is None or windows.last_end(copy.event.timestamp_ms) + lateness_ms > copy.watermark


def _deduplicated(copies: list[Copy], rules: Rules, result: Recomputation) -> list[Copy]:
    """The counted copies (rule 2); late rows and the duplicate count go to ``result``."""
    by_id: dict[tuple[str, str], list[Copy]] = {}
    for copy in copies:
        by_id.setdefault((copy.event.organization_id, copy.event.transaction_id), []).append(copy)
    counted: list[Copy] = []
    horizon = rules.dedup_horizon_ms
    for same_id in by_id.values():
        same_id.sort(key=lambda c: c.order)
        on_time = [c for c in same_id if is_on_time(c, rules.windows, rules.allowed_lateness_ms)]
        late = [c for c in same_id if not is_on_time(c, rules.windows, rules.allowed_lateness_ms)]
        kept: list[Copy] = []
        for copy in on_time:
            if kept and copy.event.timestamp_ms - kept[-1].event.timestamp_ms < horizon:
                result.duplicates += 1
            else:
                kept.append(copy)
        counted += kept
        reported: list[Copy] = []
        for copy in late:
            ts = copy.event.timestamp_ms
            beyond = rules.windows.last_end(ts + horizon) + rules.allowed_lateness_ms <= copy.watermark
            if not beyond:
                if (any(abs(ts - k.event.timestamp_ms) < horizon for k in kept)
                        or any(ts - r.event.timestamp_ms < horizon for r in reported)):
                    result.duplicates += 1
                    continue
                reported.append(copy)
            result.late_rows[(copy.partition, copy.offset, "window_closed")] = _late_row(copy)
    counted.sort(key=lambda c: c.order)
    return counted


def _late_row(copy: Copy) -> LateRow:
    event = copy.event
    return LateRow(event.organization_id, event.external_customer_id, event.code,
                   event.transaction_id, event.timestamp_ms, event.value, copy.watermark)


def _usage_key(event: Event) -> tuple[str, str, str]:
    return event.organization_id, event.external_customer_id, event.code


def _add(rows: dict, key: tuple, count: int, total_scaled: int) -> None:
    old = rows.get(key)
    rows[key] = (count, total_scaled) if old is None else (old[0] + count, old[1] + total_scaled)


def _as_decimals(rows: dict) -> dict:
    """``{key: (count, total_scaled)}`` → ``{key: (count, exact Decimal total)}``."""
    return {key: (count, _decimal(total)) for key, (count, total) in rows.items()}


def _decimal(scaled: int) -> Decimal:
    return Decimal(scaled).scaleb(-SCALE, _WIDE)


def _open_starts(copy: Copy, windows: Windows, lateness_ms: int) -> list[int]:
    """Starts of the copy's fixed windows still open at its watermark."""
    return [start for start in windows.starts(copy.event.timestamp_ms)
            if copy.watermark is None or start + windows.size_ms + lateness_ms > copy.watermark]


def _windows_of(counted: list[Copy], windows: Windows, lateness_ms: int, rows: dict) -> None:
    """``usage_aggregates``: count and sum per (customer, code, window) (rule 3)."""
    if windows.kind == "session":
        for key, session in _sessions(((_usage_key(c.event), c) for c in counted), windows.gap_ms):
            for copy in session:
                _add(rows, (*key, session[0].event.timestamp_ms), 1, copy.event.value_scaled)
        return
    for copy in counted:
        for start in _open_starts(copy, windows, lateness_ms):
            _add(rows, (*_usage_key(copy.event), start), 1, copy.event.value_scaled)


def _sessions(keyed: Iterable[tuple[tuple, Copy]], gap_ms: int):
    """``(key, copies)`` per session: copies of a key less than ``gap_ms`` apart, in time order."""
    by_key: dict[tuple, list[Copy]] = {}
    for key, copy in keyed:
        by_key.setdefault(key, []).append(copy)
    for key, copies in by_key.items():
        copies.sort(key=lambda c: c.order)
        session = [copies[0]]
        latest = copies[0].event.timestamp_ms
        for copy in copies[1:]:
            if copy.event.timestamp_ms >= latest + gap_ms:
                yield key, session
                session = []
            session.append(copy)
            latest = max(latest, copy.event.timestamp_ms)
        yield key, session


def _metric(metric: MetricSpec, counted: list[Copy], lateness_ms: int, result: Recomputation) -> None:
    """``metric_aggregates`` rows of one metric, and its late rows (rule 5)."""
    windows = metric.windows
    folded: dict[MetricKey, list[tuple[int, object]]] = {}
    ends: dict[MetricKey, int] = {}
    accepted = []
    for copy in counted:
        event = copy.event
        if event.code != metric.code:
            continue
        value = metric.value_of(event.value, event.properties)
        if value is None:
            continue  # a missing field: counted in usage, not in the metric
        if not is_on_time(copy, windows, lateness_ms) or (
                windows.kind != "session" and not _open_starts(copy, windows, lateness_ms)):
            result.late_rows[(copy.partition, copy.offset, f"window_closed:metric:{metric.name}")] = \
                _late_row(copy)
            continue
        accepted.append((copy, value))
    values = {id(copy): value for copy, value in accepted}
    owner = lambda c: (metric.name, c.event.organization_id, c.event.external_customer_id,  # noqa: E731
                       metric.group_key(c.event.properties))
    if windows.kind == "session":
        for key, session in _sessions(((owner(c), c) for c, _v in accepted), windows.gap_ms):
            start = session[0].event.timestamp_ms
            end = max(c.event.timestamp_ms for c in session) + windows.gap_ms
            folded[(*key, start)] = [(c.event.timestamp_ms, values[id(c)]) for c in session]
            ends[(*key, start)] = end
    else:
        for copy, value in accepted:
            for start in _open_starts(copy, windows, lateness_ms):
                key = (*owner(copy), start)
                folded.setdefault(key, []).append((copy.event.timestamp_ms, value))
                ends[key] = start + windows.size_ms
    for key, events in folded.items():
        scaled = metric.fold(events, ends[key])
        result.metrics[key] = (len(events), _decimal(scaled))
