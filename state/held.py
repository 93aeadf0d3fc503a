"""On-time events held until their decision, as columns: about 50 bytes an event, not 600.

A shard holds every on-time event until the watermark passes the end of its last window plus
the lateness (its *due* point), then decides them in (event time, partition, offset) order. A
``ShardEvent`` with its own strings costs ~600 bytes; what a decision needs of a plain event is
its time, partition, offset and digest, its customer key and its value. So each due point keeps
those in typed arrays (8 bytes an integer), the keys once per distinct key, and the value exactly
as a whole part and a fraction of 10**18 (``whole * 10**18 + fraction``; a whole part beyond 64
bits waits in a small dict). Each bucket numbers its own keys, so its table goes when the bucket
is taken: nothing to compact. Only events with catalog metric values keep their ``ShardEvent``.
Sliding and session windows add event by event and may write a late record, so with
``per_event`` each event also keeps its ``watermark_before`` and transaction id (as UTF-8), and its
``ShardEvent`` is rebuilt at its decision::

Events are held in buckets of at least a second of due points (session windows have a due
point per millisecond), taken whole once the watermark passes their last due point, or split::

    >>> from state.records import ShardEvent
    >>> held = HeldEvents(per_event=False, step=60_000, offset=60_000)  # 1-minute tumbling windows
    >>> held.add(held.bucket_of(120_000), 1, [ShardEvent(9, "o", "c", "x", 70_000, 25 * 10**17, 0, 5, "t2", None)])
    >>> held.add(held.bucket_of(60_000), 0, [ShardEvent(7, "o", "c", "x", 30_000, 10**40, 0, 4, "t1", None),
    ...                                      ShardEvent(8, "o", "d", "x", 20_000, -1, 0, 3, "t3", None)])
    >>> held.add(held.bucket_of(120_000), 0, [ShardEvent(7, "o", "c", "x", 70_000, 3, 0, 6, "t1", None)])
    >>> held.take_through(119_999).times.tolist(), len(held)
    ([20000, 30000], 2)
    >>> ready = held.take_through(120_000)
    >>> ready.times.tolist(), ready.partitions.tolist(), [ready.keys[k] for k in ready.key_ids]
    ([70000, 70000], [0, 1], [('o', 'c', 'x'), ('o', 'c', 'x')])
    >>> [ready.value(i) for i in range(2)], len(held)
    ([3, 2500000000000000000], 0)
"""

from __future__ import annotations

from dataclasses import dataclass
import heapq
from itertools import repeat
from operator import add, attrgetter, mul
from typing import Callable, Iterable

from msgspec.structs import astuple
import numpy as np

from state.compiled import compiled_function
from state.records import ShardEvent

VALUE_UNIT = 10**18
"""Values are held as ``whole * VALUE_UNIT + fraction`` with ``0 <= fraction < VALUE_UNIT``."""

_MIN_GRANULE_MS = 1_000  # a bucket spans at least this much of due points
_HALF_UNIT = 10**9  # a fraction as two parts below 10**9: sums of int64 stay exact
_INT64_MAX = 2**63 - 1
_INT64_MIN = -(2**63)  # a whole part of exactly this is held aside too: its absolute value is no int64
_DTYPES = {name: np.dtype(code) for name, code in (
    ("times", "q"), ("partitions", "i"), ("offsets", "q"), ("digests", "q"), ("wholes", "q"),
    ("fractions", "q"), ("key_ids", "i"), ("seen", "q"), ("txn_lengths", "i"))}
_PER_EVENT_ONLY = ("seen", "txn_lengths")
_DIGEST, _ORG, _CUSTOMER, _CODE, _TIME, _VALUE, _OFFSET, _METRICS = map(
    ShardEvent.__struct_fields__.index, (
        "digest", "organization_id", "external_customer_id", "code", "timestamp_ms", "value_scaled",
        "offset", "metric_values"))  # places in astuple(event)
_SLOTS = tuple(ShardEvent.__dict__[name] for name in (  # where the compiled path reads each field
    "digest", "organization_id", "external_customer_id", "code", "timestamp_ms", "value_scaled", "offset",
    "metric_values"))
_SEEN_OF = attrgetter("watermark_before")
_TIME_OF = attrgetter("timestamp_ms")
_TIME_SLOT = ShardEvent.__dict__["timestamp_ms"]


@dataclass(frozen=True)
class HeldSnapshot:
    """What a ``HeldEvents`` needs to resume: the keys, and per bucket its columns as bytes, the
    values too wide for a column, the events kept whole (by position) and the transaction ids
    (``per_event`` only)."""

    per_event: bool
    keys: list  # (organization_id, external_customer_id, code), numbered by position
    buckets: list  # ({column name: bytes}, wide values, events, transaction ids) each


class _KeyTable:
    """The keys ``(org, customer, code)`` of one bucket's events, numbered from 0 in the order
    first seen, one copy of each org and code string among them."""

    __slots__ = ("keys", "ids", "strings")

    def __init__(self) -> None:
        self.keys: list[tuple] = []
        self.ids: dict[tuple, int] = {}
        self.strings: dict[str, str] = {}

    def numbers(self, keys: Iterable[tuple]) -> list[int]:
        """The numbers of ``keys``, new keys numbered."""
        ids, ids_get, all_keys, strings = self.ids, self.ids.get, self.keys, self.strings
        found = []
        for key in keys:
            number = ids_get(key)
            if number is None:  # a new key: its org and code shared with the other keys
                org, customer, code = key
                key = (strings.setdefault(org, org), customer, strings.setdefault(code, code))
                number = ids[key] = len(all_keys)
                all_keys.append(key)
            found.append(number)
        return found

    def copy(self) -> _KeyTable:
        twin = _KeyTable()
        twin.keys, twin.ids, twin.strings = list(self.keys), dict(self.ids), dict(self.strings)
        return twin


def _columns(events: list[ShardEvent], table: _KeyTable) -> tuple[dict, tuple[int, int], list[int], bool]:
    """The columns of ``events`` that every bucket holds (times, offsets, digests, values in
    parts, key numbers in ``table``), their first and last time, the positions of the values
    too wide for the columns, and whether any event has catalog metric values."""
    fields = list(zip(*map(astuple, events)))  # one pass over the events: a tuple per field
    n = len(events)
    columns = {"times": np.fromiter(fields[_TIME], np.int64, n),
               "offsets": np.fromiter(fields[_OFFSET], np.int64, n),
               "digests": np.fromiter(fields[_DIGEST], np.int64, n),
               "key_ids": np.fromiter(table.numbers(zip(fields[_ORG], fields[_CUSTOMER], fields[_CODE])),
                                      np.int32, n)}
    columns["wholes"], columns["fractions"], wide = _split_values(fields[_VALUE])
    return columns, (min(fields[_TIME]), max(fields[_TIME])), wide, any(fields[_METRICS])


def _split_values(values: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The whole parts and fractions of ``values``, and the positions of those whose whole part
    is not within ``±(2**63 - 1)`` (their whole and fraction 0: held aside)."""
    wholes, fractions = zip(*map(divmod, values, repeat(VALUE_UNIT)))
    whole_column = _int64_column(wholes)
    if whole_column is not None and whole_column.min() > _INT64_MIN:
        return whole_column, np.fromiter(fractions, np.int64, len(values)), []
    wholes, fractions, wide = list(wholes), list(fractions), []
    for position, whole in enumerate(wholes):
        if not -_INT64_MAX <= whole <= _INT64_MAX:
            wide.append(position)
            wholes[position] = fractions[position] = 0
    return np.array(wholes, dtype=np.int64), np.array(fractions, dtype=np.int64), wide


def _int64_column(numbers: tuple[int, ...]) -> np.ndarray | None:
    """``numbers`` as an int64 array; None when one of them needs more than 64 bits."""
    try:
        return np.fromiter(numbers, np.int64, len(numbers))
    except OverflowError:  # the caller splits the values exactly, holding the wide ones aside
        return None


def _compiled_columns(events: list[ShardEvent], table: _KeyTable) -> tuple[dict, tuple[int, int], list[int], bool]:
    """:func:`_columns`, by the compiled fast path (``state/_fastheld.c``)."""
    times, offsets, digests, wholes, fractions, key_ids, wide, has_metrics, first, last = _fast_columns(
        events, ShardEvent, _SLOTS, table.ids, table.keys, table.strings)
    return ({"times": np.frombuffer(times, np.int64), "offsets": np.frombuffer(offsets, np.int64),
             "digests": np.frombuffer(digests, np.int64), "wholes": np.frombuffer(wholes, np.int64),
             "fractions": np.frombuffer(fractions, np.int64), "key_ids": np.frombuffer(key_ids, np.int32)},
            (first, last), wide, has_metrics)


def time_range(events: list[ShardEvent]) -> tuple[int, int]:
    """The earliest and the latest event time of ``events`` (not empty).

        >>> time_range([ShardEvent(7, "o", "c", "x", time, 5, 0, 4, "t1", None) for time in (30, 10, 20)])
        (10, 30)
    """
    if _fast_time_range is not None:
        return _fast_time_range(events, ShardEvent, _TIME_SLOT)
    times = list(map(_TIME_OF, events))
    return min(times), max(times)


def scaled_values(wholes: np.ndarray, fractions: np.ndarray) -> list[int]:
    """``whole * VALUE_UNIT + fraction`` for each pair of the ``int64`` arrays, as Python integers.

        >>> scaled_values(np.array([2, -1, 2**62]), np.array([5, 10**18 - 1, 0]))
        [2000000000000000005, -1, 4611686018427387904000000000000000000]
    """
    if _fast_scaled is not None:
        return _fast_scaled(np.ascontiguousarray(wholes, np.int64), np.ascontiguousarray(fractions, np.int64))
    return list(map(add, map(mul, wholes.tolist(), repeat(VALUE_UNIT)), fractions.tolist()))


def _compiled(name: str) -> Callable | None:
    """The compiled fast path's function ``name`` (``state/_fastheld.c``, built by ``make
    install``) at :data:`_INTERFACE`, or None: events are held then in pure Python, slower, the same."""
    return compiled_function("state._fastheld", _INTERFACE, name)


_INTERFACE = 2
"""The version of ``state/_fastheld.c``'s functions this module calls (its ``INTERFACE``)."""


_fast_columns = _compiled("columns")
"""What :meth:`HeldEvents.add` uses; tests set it to None for the pure path."""
_fast_time_range = _compiled("time_range")
"""What :func:`time_range` uses; tests set it to None for the pure path."""
_fast_scaled = _compiled("scaled")
"""What :func:`scaled_values` uses; tests set it to None for the pure path."""


class _Bucket:
    """The events of one span of due points (``first_due``, ``last_due``), in arrival order:
    each column a list of numpy chunks (one an ``add``), joined when read."""

    __slots__ = ("chunks", "size", "table", "wide", "events", "txns", "first_due", "last_due")

    def __init__(self, per_event: bool) -> None:
        self.chunks: dict[str, list[np.ndarray]] = {
            name: [] for name in _DTYPES if per_event or name not in _PER_EVENT_ONLY}
        self.size = 0
        self.table = _KeyTable()  # what the ``key_ids`` column numbers
        self.wide: dict[int, int] = {}  # position -> value whose whole part needs more than 64 bits
        self.events: dict[int, ShardEvent] = {}  # position -> the event, kept whole
        self.txns: list[bytes] | None = [] if per_event else None  # UTF-8, one chunk an add
        self.first_due, self.last_due = _INT64_MAX, -_INT64_MAX

    def __len__(self) -> int:
        return self.size

    def append(self, columns: dict[str, np.ndarray]) -> None:
        """Add a chunk of events, one array per column (all of one length)."""
        for name, chunk in columns.items():
            self.chunks[name].append(chunk)
        self.size += len(columns["times"])

    def column(self, name: str) -> np.ndarray:
        """The column ``name`` as one array (its chunks joined once; never written in place)."""
        chunks = self.chunks[name]
        if len(chunks) != 1:
            chunks[:] = [np.concatenate(chunks) if chunks else np.empty(0, _DTYPES[name])]
        return chunks[0]

    def copy(self) -> _Bucket:
        """A bucket of its own (chunks are never written in place, kept events are immutable:
        both shared)."""
        twin = _Bucket(self.txns is not None)
        twin.table = self.table.copy()
        twin.chunks = {name: list(chunks) for name, chunks in self.chunks.items()}
        twin.size, twin.wide, twin.events = self.size, dict(self.wide), dict(self.events)
        twin.txns = None if self.txns is None else list(self.txns)
        twin.first_due, twin.last_due = self.first_due, self.last_due
        return twin


class HeldEvents:
    """The shard's undecided on-time events, by due point (see the module docstring).

    ``per_event``: every event can be rebuilt (windows other than tumbling need them).
    An event at time ``t`` is due at ``t - t % step + offset``.
    """

    def __init__(self, per_event: bool, step: int, offset: int,
                 resume: HeldSnapshot | None = None) -> None:
        self.per_event, self.step, self.offset = per_event, step, offset
        self.granule = step * -(-_MIN_GRANULE_MS // step)
        self._buckets: dict[int, _Bucket] = {}  # bucket_of(due) -> its events
        self._dues: list[int] = []  # a heap of the buckets' keys
        if resume is not None:
            if resume.per_event != per_event:
                raise ValueError(
                    f"held events were snapshotted with per_event={resume.per_event}, now "
                    f"{per_event}: the window kind changed; start a new recovery store")
            keys = [tuple(key) for key in resume.keys]
            if resume.buckets:  # bucketed again: the windows or the lateness may have changed
                buckets = [_unpacked(packed, per_event, len(keys)) for packed in resume.buckets]
                everything = _ready(buckets, keys)
                keys = self._dues_of(everything.times) // self.granule
                for key in np.unique(keys).tolist():
                    self._put(key, self._part(everything, np.flatnonzero(keys == key)))

    def bucket_of(self, due: int) -> int:
        """The key of the bucket that holds events due at ``due``."""
        return due // self.granule

    def _dues_of(self, times: np.ndarray) -> np.ndarray:
        return times - times % self.step + self.offset

    def _put(self, key: int, bucket: _Bucket) -> None:
        times = bucket.column("times")
        if len(times):
            dues = self._dues_of(np.array([times.min(), times.max()]))
            bucket.first_due, bucket.last_due = int(dues[0]), int(dues[1])
        self._buckets[key] = bucket
        heapq.heappush(self._dues, key)

    def _part(self, ready: "Ready", positions: np.ndarray) -> _Bucket:
        """A bucket of the events of ``ready`` at ``positions`` (ascending)."""
        used, key_ids = np.unique(ready.key_ids[positions], return_inverse=True)
        bucket = _Bucket(self.per_event)
        numbers = bucket.table.numbers(map(ready.keys.__getitem__, used.tolist()))  # a key met twice: one number
        columns = {name: getattr(ready, name)[positions] for name in bucket.chunks if name != "key_ids"}
        columns["key_ids"] = np.array(numbers, dtype=np.int32)[key_ids.reshape(-1)]
        bucket.append(columns)
        for kept, into in ((ready.wide, bucket.wide), (ready.events, bucket.events)):
            if kept:
                where = np.searchsorted(positions, list(kept)).tolist()
                into.update((at, item) for at, (position, item) in zip(where, kept.items())
                            if at < len(positions) and positions[at] == position)
        if self.per_event:
            bucket.txns = [_gathered(ready.txn_blob, ready.txn_starts[positions],
                                     ready.txn_lengths[positions])]
        return bucket

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._buckets.values())

    def __bool__(self) -> bool:
        return bool(self._buckets)

    def add(self, key: int, partition: int, events: list[ShardEvent]) -> None:
        """Hold ``events`` (all of one partition, all in the bucket ``key``: see ``bucket_of``)."""
        if not events:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.per_event)
            heapq.heappush(self._dues, key)
        start, n = len(bucket), len(events)
        columns, (first, last), wide, has_metrics = (_columns if _fast_columns is None else _compiled_columns)(
            events, bucket.table)  # due points grow with the time: ``first`` and ``last`` bound them
        step, offset = self.step, self.offset
        bucket.first_due = min(bucket.first_due, first - first % step + offset)
        bucket.last_due = max(bucket.last_due, last - last % step + offset)
        columns["partitions"] = np.full(n, partition, dtype=np.int32)
        if self.per_event:
            columns["seen"] = np.fromiter(map(_SEEN_OF, events), np.int64, n)
            encoded = [event.transaction_id.encode("utf-8", "surrogatepass") for event in events]
            columns["txn_lengths"] = np.fromiter(map(len, encoded), np.int32, n)
            bucket.txns.append(b"".join(encoded))
        bucket.append(columns)
        bucket.wide.update((start + position, events[position].value_scaled) for position in wide)
        if has_metrics:
            for position, event in enumerate(events, start):
                if event.metric_values:
                    bucket.events[position] = event

    def take_through(self, watermark: int) -> "Ready | None":
        """Remove every event due at or before ``watermark``; ``None`` when there is none."""
        dues, buckets, taken = self._dues, self._buckets, []
        while dues and buckets[dues[0]].last_due <= watermark:
            taken.append(buckets.pop(heapq.heappop(dues)))
        if dues and buckets[dues[0]].first_due <= watermark:  # later buckets hold later due points
            key = heapq.heappop(dues)
            split = _ready([buckets.pop(key)])
            due = self._dues_of(split.times) <= watermark
            if due.any():
                taken.append(self._part(split, np.flatnonzero(due)))
            if not due.all():
                self._put(key, self._part(split, np.flatnonzero(~due)))
        if not taken:
            return None
        return _ready(taken)

    def copy(self) -> HeldEvents:
        """An independent copy (the provisional flush takes every event out of one).

            >>> held = HeldEvents(per_event=False, step=60_000, offset=60_000)
            >>> held.add(held.bucket_of(60_000), 0, [ShardEvent(7, "o", "c", "x", 30_000, 5, 0, 4, "t1", None)])
            >>> held.copy().take_through(60_000).times.tolist(), len(held)
            ([30000], 1)
        """
        twin = HeldEvents(self.per_event, self.step, self.offset)
        twin._buckets = {key: bucket.copy() for key, bucket in self._buckets.items()}
        twin._dues = list(self._dues)
        return twin

    def snapshot(self) -> HeldSnapshot:
        """The buckets' key tables one after the other (a key may come twice), each bucket's
        numbers moved past the tables before it."""
        keys, packed = [], []
        for bucket in self._buckets.values():
            packed.append(_packed(bucket, len(keys)))
            keys += bucket.table.keys
        return HeldSnapshot(self.per_event, keys, packed)


@dataclass(frozen=True)
class Ready:
    """Events taken for a decision, as numpy columns in (time, partition, offset) order."""

    times: np.ndarray
    partitions: np.ndarray
    offsets: np.ndarray
    digests: np.ndarray
    wholes: np.ndarray
    fractions: np.ndarray
    key_ids: np.ndarray  # index into ``keys``
    keys: list  # (organization_id, external_customer_id, code)
    wide: dict  # position -> value (whole part beyond 64 bits; its whole and fraction are 0)
    events: dict  # position -> ShardEvent kept whole (catalog metric values)
    seen: np.ndarray | None = None  # watermark_before (per_event only)
    txn_lengths: np.ndarray | None = None  # transaction ids, UTF-8 (per_event only) ...
    txn_starts: np.ndarray | None = None  # ... at these places of ...
    txn_blob: bytes = b""  # ... these bytes

    def __len__(self) -> int:
        return len(self.times)

    def event(self, position: int) -> ShardEvent:
        """The event at ``position`` (``per_event`` only, or an event kept whole)."""
        kept = self.events.get(position)
        if kept is not None:
            return kept
        org, customer, code = self.keys[self.key_ids[position]]
        return ShardEvent(int(self.digests[position]), org, customer, code, int(self.times[position]),
                          self.value(position), int(self.seen[position]), int(self.offsets[position]),
                          self.txn(position), None)

    def rebuilt(self, positions: np.ndarray) -> list[ShardEvent]:
        """The events at ``positions``, like ``event`` for each (faster)."""
        keys, kept, unit, wide = self.keys, self.events, VALUE_UNIT, self.wide
        blob, starts = self.txn_blob, self.txn_starts[positions].tolist()
        lengths = self.txn_lengths[positions].tolist()
        rebuilt = []
        for position, digest, key_id, timestamp, whole, fraction, seen, offset, start, length in zip(
                positions.tolist(), self.digests[positions].tolist(), self.key_ids[positions].tolist(),
                self.times[positions].tolist(), self.wholes[positions].tolist(),
                self.fractions[positions].tolist(), self.seen[positions].tolist(),
                self.offsets[positions].tolist(), starts, lengths):
            event = kept.get(position) if kept else None
            if event is None:
                org, customer, code = keys[key_id]
                value = wide.get(position, whole * unit + fraction) if wide else whole * unit + fraction
                event = ShardEvent(digest, org, customer, code, timestamp, value, seen, offset,
                                   blob[start:start + length].decode("utf-8", "surrogatepass"), None)
            rebuilt.append(event)
        return rebuilt

    def txn(self, position: int) -> str:
        """The transaction id of the event at ``position`` (``per_event`` only)."""
        start = int(self.txn_starts[position])
        return self.txn_blob[start:start + int(self.txn_lengths[position])].decode("utf-8", "surrogatepass")

    def value(self, position: int) -> int:
        """The exact scaled value of the event at ``position``."""
        wide = self.wide.get(position)
        if wide is not None:
            return wide
        return int(self.wholes[position]) * VALUE_UNIT + int(self.fractions[position])

    def run_parts(self, positions: np.ndarray, heads: np.ndarray) -> tuple:
        """The sums of the values at ``positions`` per run (run ``r`` is
        ``positions[heads[r]:heads[r + 1]]``, ``heads`` ascending from 0), in parts:
        ``(wholes, highs, lows, wide)`` where a run's sum is ``wholes * VALUE_UNIT +
        highs * 10**9 + lows + wide.get(run, 0)``. ``wholes`` is an ``int64`` array, or a list of
        Python integers where a sum could pass 64 bits; ``highs`` and ``lows`` sum parts below
        10**9 (exact for fewer than 9 * 10**9 values); ``wide`` holds the values too wide for a column.

            >>> ready = Ready(*[np.array(c, dtype=np.int64) for c in ([0] * 5, [0] * 5, [0] * 5,
            ...               [0] * 5, [2**62, 2**62, -1, 0, 0], [1, 2, 10**18 - 1, 5, 0])],
            ...               np.zeros(5, dtype=np.int32), [], {4: 10**40}, {})
            >>> wholes, highs, lows, wide = ready.run_parts(np.array([0, 1, 2, 3, 4]), np.array([0, 2]))
            >>> wholes, highs.tolist(), lows.tolist(), wide
            ([9223372036854775808, -1], [0, 999999999], [3, 1000000004], {1: 10000000000000000000000000000000000000000})
        """
        n = len(positions)
        wholes = self.wholes[positions]
        highs, lows = np.divmod(self.fractions[positions], _HALF_UNIT)
        if n and int(np.abs(wholes).max()) < _INT64_MAX // n - 1:  # no sum passes 64 bits
            whole_sums = np.add.reduceat(wholes, heads)
        else:
            whole_list = wholes.tolist()
            whole_sums = [sum(whole_list[head:end])
                          for head, end in zip(heads.tolist(), [*heads.tolist()[1:], n])]
        wide = {}
        if self.wide:
            runs = np.searchsorted(heads, np.arange(n), side="right") - 1
            for index, position in enumerate(positions.tolist()):
                value = self.wide.get(position)
                if value is not None:
                    run = int(runs[index])
                    wide[run] = wide.get(run, 0) + value
        return whole_sums, np.add.reduceat(highs, heads), np.add.reduceat(lows, heads), wide


def _ready(buckets: list[_Bucket], keys: list[tuple] | None = None) -> Ready:
    """The buckets' events merged and sorted for the decision; their ``key_ids`` number
    ``keys`` where given, else each bucket's own table (merged here)."""
    wide, events, base = {}, {}, 0
    for bucket in buckets:
        wide.update((base + position, value) for position, value in bucket.wide.items())
        events.update((base + position, event) for position, event in bucket.events.items())
        base += len(bucket)
    if keys is None:
        keys = _merged_tables(buckets)
    columns = {name: np.concatenate([chunk for b in buckets for chunk in b.chunks[name]])
               for name in buckets[0].chunks}
    order = _decision_order(columns["times"], columns["partitions"], columns["offsets"])
    if wide or events:
        new_position = np.empty(len(order), dtype=np.int64)
        new_position[order] = np.arange(len(order))
        wide = {int(new_position[p]): v for p, v in wide.items()}
        events = dict(sorted((int(new_position[p]), e) for p, e in events.items()))
    txns = {}
    if buckets[0].txns is not None:
        lengths = columns["txn_lengths"]
        txns = {"txn_blob": b"".join(chunk for bucket in buckets for chunk in bucket.txns),
                "txn_starts": (np.cumsum(lengths, dtype=np.int64) - lengths)[order]}
    return Ready(**{name: column[order] for name, column in columns.items()},
                 keys=keys, wide=wide, events=events, **txns)


def _decision_order(times: np.ndarray, partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The order of (time, partition, offset), equal ones in arrival order (``np.lexsort``'s):
    where the three, counted from their least, and the arrival position fit in 63 bits, one
    sort of them packed in one integer (a fifth of the time), or without the position, a stable one.

        >>> _decision_order(np.array([5, 3, 5, 3]), np.array([1, 0, 0, 0]), np.array([2, 9, 7, 9])).tolist()
        [1, 3, 2, 0]
    """
    n = len(times)
    if not n or int(partitions.min()) < 0:
        return np.lexsort((offsets, partitions, times))
    first_time, first_offset = int(times.min()), int(offsets.min())
    time_bits = (int(times.max()) - first_time).bit_length()  # Python integers: no wrapping
    offset_bits = (int(offsets.max()) - first_offset).bit_length()
    partition_bits, position_bits = int(partitions.max()).bit_length(), (n - 1).bit_length()
    if time_bits + partition_bits + offset_bits > 63:
        return np.lexsort((offsets, partitions, times))
    key = ((times - first_time) << (partition_bits + offset_bits)) \
        | (partitions.astype(np.int64) << offset_bits) | (offsets - first_offset)
    if time_bits + partition_bits + offset_bits + position_bits > 63:
        return np.argsort(key, kind="stable")
    return np.argsort((key << position_bits) | np.arange(n))


def _merged_tables(buckets: list[_Bucket]) -> list[tuple]:
    """The keys of the buckets' tables as one list: the biggest table's, the others' keys
    numbered into it (a key in two tables gets one number) and their ``key_ids`` renumbered.
    The buckets are taken: their tables may change."""
    table = max((bucket.table for bucket in buckets), key=lambda table: len(table.keys))
    for bucket in buckets:
        if bucket.table is not table:
            numbers = np.fromiter(table.numbers(bucket.table.keys), np.int32, len(bucket.table.keys))
            bucket.chunks["key_ids"] = [numbers[bucket.column("key_ids")]]
    return table.keys


def _gathered(blob: bytes, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    """The pieces ``blob[start:start + length]``, joined.

        >>> _gathered(b"abcdef", np.array([4, 0]), np.array([2, 1]))
        b'efa'
    """
    ends = np.cumsum(lengths, dtype=np.int64)
    places = np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
    return np.frombuffer(blob, dtype=np.uint8)[places].tobytes()


def _packed(bucket: _Bucket, first_key: int) -> tuple:
    """The bucket as bytes, its key numbers counted from ``first_key``."""
    columns = {name: bucket.column(name) for name in bucket.chunks}
    columns["key_ids"] = columns["key_ids"] + np.int32(first_key)
    return ({name: column.tobytes() for name, column in columns.items()},
            dict(bucket.wide), dict(bucket.events),
            None if bucket.txns is None else b"".join(bucket.txns))


def _unpacked(packed: tuple, per_event: bool, n_keys: int) -> _Bucket:
    column_bytes, wide, events, txns = packed
    bucket = _Bucket(per_event)
    if set(column_bytes) != set(bucket.chunks):
        raise ValueError(f"held events: a snapshot with columns {sorted(column_bytes)}, expected "
                         f"{sorted(bucket.chunks)}; start a new recovery store")
    columns = {name: np.frombuffer(data, dtype=_DTYPES[name]).copy() for name, data in column_bytes.items()}
    lengths = {len(column) for column in columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"held events: columns of different lengths {sorted(lengths)} in a snapshot")
    bucket.append(columns)
    numbers = columns["key_ids"]
    if len(numbers) and not 0 <= int(numbers.min()) <= int(numbers.max()) < n_keys:
        raise ValueError(f"held events: a key number outside the snapshot's {n_keys} keys")
    bucket.wide, bucket.events = dict(wide), dict(events)
    if per_event:
        bucket.txns = [bytes(txns)]
        expected = int(columns["txn_lengths"].sum())
        if len(txns) != expected:
            raise ValueError(f"held events: {len(txns)} bytes of transaction ids, expected {expected}")
    return bucket
