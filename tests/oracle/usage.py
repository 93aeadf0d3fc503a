"""The rule of the usage table, computed the plain way: an oracle that imports no product code.

Given the records of each Kafka partition (in offset order) and the flow's settings, it says
which copies count, which are duplicates, which go to ``usage_late_events``, and what each
window of ``usage_aggregates`` holds. It is written from the README's rule, not from the flow:

1. Lateness is decided per partition: a record is late when its partition's watermark just
   before it (largest event time seen so far − ``MAX_OUT_OF_ORDERNESS``) has reached the end of
   the last window holding it + ``ALLOWED_LATENESS``.
2. Among the copies of one (organization_id, transaction_id) that are on time, taken in order of
   (event time, partition, offset), a copy counts when no counted copy of the same id has an
   event time within ``DEDUP_HORIZON`` before it; every other copy is a duplicate.
3. A counted copy counts in each of its windows whose end + lateness its partition's watermark
   had not reached (session windows: in the session its counted neighbours form).
4. A late copy is a duplicate when a counted copy of its id lies within the horizon of it (either
   side), or when a late copy before it (same order) within the horizon went to the late table;
   otherwise it goes there. A copy more than the horizon behind its own window's close (its
   partition's watermark had passed the end of the window holding its time + horizon) is
   reported as it comes, never deduplicated.

    >>> s = Settings(kind="tumbling", size_ms=60_000, out_of_orderness_ms=0, horizon_ms=600_000)
    >>> copies = {0: [Record("o", "c", "x", "t1", 10_000, 5)], 1: [Record("o", "c", "x", "t1", 70_000, 5)]}
    >>> result = compute(copies, s)
    >>> result.windows, result.duplicates
    ({('o', 'c', 'x', 0): (1, 5, 60000)}, 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class Record(NamedTuple):
    """One valid input record (value already scaled to an integer of 10^-18)."""

    organization_id: str
    external_customer_id: str
    code: str
    transaction_id: str
    timestamp_ms: int
    value_scaled: int


@dataclass(frozen=True)
class Settings:
    kind: str  # tumbling | sliding | session
    size_ms: int = 0
    slide_ms: int = 0
    gap_ms: int = 0
    lateness_ms: int = 0
    out_of_orderness_ms: int = 0
    horizon_ms: int = 86_400_000


@dataclass
class Outcome:
    windows: dict = field(default_factory=dict)  # (org, customer, code, start) -> (count, sum, end)
    late: set = field(default_factory=set)  # (org, txn, partition, offset)
    duplicates: int = 0
    counted: list = field(default_factory=list)  # (partition, offset) of counted copies


class _Copy(NamedTuple):
    timestamp_ms: int
    partition: int
    offset: int
    watermark_before: int | None
    record: Record


def last_end(settings: Settings, t: int) -> int:
    """End of the latest window holding time ``t``."""
    if settings.kind == "tumbling":
        return t - t % settings.size_ms + settings.size_ms
    if settings.kind == "sliding":
        return t - t % settings.slide_ms + settings.size_ms
    return t + settings.gap_ms


def window_starts(settings: Settings, t: int) -> list[int]:
    """Starts of the fixed windows holding ``t``."""
    if settings.kind == "tumbling":
        return [t - t % settings.size_ms]
    slide, size = settings.slide_ms, settings.size_ms
    last = t - t % slide
    return [s for s in range(last - size + slide, last + 1, slide) if s <= t < s + size]


def _on_time(settings: Settings, t: int, watermark: int | None) -> bool:
    return watermark is None or last_end(settings, t) + settings.lateness_ms > watermark


def _split(partitions: dict[int, list[Record]], settings: Settings) -> tuple[list, list]:
    on_time, late = [], []
    for partition, records in partitions.items():
        max_seen = None
        for offset, record in enumerate(records):
            watermark = None if max_seen is None else max_seen - settings.out_of_orderness_ms
            copy = _Copy(record.timestamp_ms, partition, offset, watermark, record)
            (on_time if _on_time(settings, record.timestamp_ms, watermark) else late).append(copy)
            max_seen = record.timestamp_ms if max_seen is None else max(max_seen, record.timestamp_ms)
    return sorted(on_time), sorted(late)


def _ident(record: Record) -> tuple[str, str]:
    return record.organization_id, record.transaction_id


def compute(partitions: dict[int, list[Record]], settings: Settings) -> Outcome:
    """Everything the rule says about these records (each partition's list is in offset order,
    the offset being the index)."""
    on_time, late = _split(partitions, settings)
    outcome = Outcome()
    counted_at: dict[tuple, list[int]] = {}
    counted = []
    for copy in on_time:
        times = counted_at.setdefault(_ident(copy.record), [])
        if times and copy.timestamp_ms - times[-1] < settings.horizon_ms:
            outcome.duplicates += 1
            continue
        times.append(copy.timestamp_ms)
        counted.append(copy)
        outcome.counted.append((copy.partition, copy.offset))
    if settings.kind == "session":
        outcome.windows = _sessions(counted, settings)
    else:
        outcome.windows = _fixed(counted, settings)
    _late(late, counted_at, settings, outcome)
    return outcome


def _fixed(counted: list[_Copy], settings: Settings) -> dict:
    windows: dict = {}
    for copy in counted:
        r = copy.record
        for start in window_starts(settings, r.timestamp_ms):
            end = start + settings.size_ms
            if copy.watermark_before is not None and end + settings.lateness_ms <= copy.watermark_before:
                continue  # late for this window, on time for a later one
            key = (r.organization_id, r.external_customer_id, r.code, start)
            count, total, _ = windows.get(key, (0, 0, end))
            windows[key] = (count + 1, total + r.value_scaled, end)
    return windows


def _sessions(counted: list[_Copy], settings: Settings) -> dict:
    by_key: dict[tuple, list[Record]] = {}
    for copy in counted:
        r = copy.record
        by_key.setdefault((r.organization_id, r.external_customer_id, r.code), []).append(r)
    windows: dict = {}
    for key, records in by_key.items():
        records.sort(key=lambda r: r.timestamp_ms)
        session: list[Record] = []
        for r in records + [None]:
            if session and (r is None or r.timestamp_ms - session[-1].timestamp_ms >= settings.gap_ms):
                first, last = session[0].timestamp_ms, session[-1].timestamp_ms
                windows[(*key, first)] = (len(session), sum(s.value_scaled for s in session),
                                          last + settings.gap_ms)
                session = []
            if r is not None:
                session.append(r)
    return windows


def _late(late: list[_Copy], counted_at: dict, settings: Settings, outcome: Outcome) -> None:
    horizon = settings.horizon_ms
    reported_at: dict[tuple, list[int]] = {}
    for copy in late:
        t, r = copy.timestamp_ms, copy.record
        beyond = last_end(settings, t + horizon) + settings.lateness_ms <= copy.watermark_before
        if not beyond:
            ident = _ident(r)
            if any(abs(t - c) < horizon for c in counted_at.get(ident, ())):
                outcome.duplicates += 1
                continue
            earlier = reported_at.setdefault(ident, [])
            if earlier and t - earlier[-1] < horizon:
                outcome.duplicates += 1
                continue
            earlier.append(t)
        outcome.late.add((r.organization_id, r.transaction_id, copy.partition, copy.offset))
