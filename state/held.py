"""On-time events held until their decision, as columns: about 50 bytes an event, not 600.

A shard holds every on-time event until the watermark passes the end of its last window plus
the lateness (its *due* point), then decides them in (event time, partition, offset) order. A
``ShardEvent`` with its own strings costs ~600 bytes; what a decision needs of a plain event is
its time, partition, offset and digest, its customer key and its value. So each due point keeps
those in typed arrays (8 bytes an integer), the keys once per distinct key, and the value exactly
as a whole part and a fraction of 10**18 (``whole * 10**18 + fraction``; a whole part beyond 64
bits waits in a small dict). Keys are numbered once for all held events; numbers no held event
uses any more are dropped when the table has doubled, and before a snapshot. Only events with catalog metric values keep their ``ShardEvent``.
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

from array import array
from dataclasses import dataclass
import heapq
from itertools import repeat
from typing import Iterable

from msgspec.structs import astuple
import numpy as np

from state.records import ShardEvent

VALUE_UNIT = 10**18
"""Values are held as ``whole * VALUE_UNIT + fraction`` with ``0 <= fraction < VALUE_UNIT``."""

_MIN_GRANULE_MS = 1_000  # a bucket spans at least this much of due points
_MIN_KEYS = 4_096  # the key table is not compacted below this size
_HALF_UNIT = 10**9  # a fraction as two parts below 10**9: sums of int64 stay exact
_INT64_MAX = 2**63 - 1
_TYPECODES = {"times": "q", "partitions": "i", "offsets": "q", "digests": "q", "wholes": "q",
              "fractions": "q", "key_ids": "i", "seen": "q", "txn_lengths": "i"}
_PER_EVENT_ONLY = ("seen", "txn_lengths")
_DIGEST, _ORG, _CUSTOMER, _CODE, _TIME, _VALUE, _SEEN, _OFFSET, _TXN, _METRICS = map(
    ShardEvent.__struct_fields__.index, (
        "digest", "organization_id", "external_customer_id", "code", "timestamp_ms", "value_scaled",
        "watermark_before", "offset", "transaction_id", "metric_values"))  # places in astuple(event)


@dataclass(frozen=True)
class HeldSnapshot:
    """What a ``HeldEvents`` needs to resume: the keys, and per bucket its columns as bytes, the
    values too wide for a column, the events kept whole (by position) and the transaction ids
    (``per_event`` only)."""

    per_event: bool
    keys: list  # (organization_id, external_customer_id, code), numbered by position
    buckets: list  # ({column name: bytes}, wide values, events, transaction ids) each


class _Bucket:
    """The events of one span of due points (``first_due``, ``last_due``), in arrival order."""

    __slots__ = ("columns", "wide", "events", "txns", "first_due", "last_due")

    def __init__(self, per_event: bool) -> None:
        self.columns = {name: array(code) for name, code in _TYPECODES.items()
                        if per_event or name not in _PER_EVENT_ONLY}
        self.wide: dict[int, int] = {}  # position -> value whose whole part needs more than 64 bits
        self.events: dict[int, ShardEvent] = {}  # position -> the event, kept whole
        self.txns: list[bytes] | None = [] if per_event else None  # UTF-8, one chunk an add
        self.first_due, self.last_due = _INT64_MAX, -_INT64_MAX

    def __len__(self) -> int:
        return len(self.columns["times"])

    def copy(self) -> _Bucket:
        """A bucket with its own columns (the kept events are immutable, so shared)."""
        twin = _Bucket(self.txns is not None)
        twin.columns = {name: column[:] for name, column in self.columns.items()}
        twin.wide, twin.events = dict(self.wide), dict(self.events)
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
        self._keys: list[tuple] = []  # (org, customer, code) by number; replaced, never shrunk
        self._key_ids: dict[tuple, int] = {}
        self._strings: dict[str, str] = {}  # one copy of each org and code
        self._compact_at = _MIN_KEYS
        if resume is not None:
            if resume.per_event != per_event:
                raise ValueError(
                    f"held events were snapshotted with per_event={resume.per_event}, now "
                    f"{per_event}: the window kind changed; start a new recovery store")
            self._number_keys([tuple(key) for key in resume.keys])
            if resume.buckets:  # bucketed again: the windows or the lateness may have changed
                buckets = [_unpacked(packed, per_event, len(self._keys)) for packed in resume.buckets]
                everything = _ready(buckets, self._keys)
                keys = self._dues_of(everything.times) // self.granule
                for key in np.unique(keys).tolist():
                    self._put(key, self._part(everything, np.flatnonzero(keys == key)))

    def _number_keys(self, keys: list[tuple]) -> None:
        """Number ``keys`` from 0, one copy of each org and code string among them."""
        strings: dict[str, str] = {}
        self._keys = [(strings.setdefault(org, org), customer, strings.setdefault(code, code))
                      for org, customer, code in keys]
        self._key_ids = {key: number for number, key in enumerate(self._keys)}
        self._strings = strings
        self._compact_at = max(2 * len(keys), _MIN_KEYS)

    def _compact_keys(self) -> None:
        """Drop the keys no held event uses, and number the others again."""
        columns = [bucket.columns["key_ids"] for bucket in self._buckets.values()]
        used = np.unique(np.concatenate([np.array(column, dtype=np.int32) for column in columns]
                                        or [np.empty(0, np.int32)]))
        renumbered = np.full(len(self._keys), -1, dtype=np.int32)
        renumbered[used] = np.arange(len(used), dtype=np.int32)
        for column in columns:
            new = renumbered[np.array(column, dtype=np.int32)]
            del column[:]
            column.frombytes(new.tobytes())
        keys = self._keys
        self._number_keys([keys[number] for number in used.tolist()])

    def bucket_of(self, due: int) -> int:
        """The key of the bucket that holds events due at ``due``."""
        return due // self.granule

    def _dues_of(self, times: np.ndarray) -> np.ndarray:
        return times - times % self.step + self.offset

    def _put(self, key: int, bucket: _Bucket) -> None:
        times = np.frombuffer(bucket.columns["times"], dtype=np.int64)
        if len(times):
            dues = self._dues_of(np.array([times.min(), times.max()]))
            bucket.first_due, bucket.last_due = int(dues[0]), int(dues[1])
        del times  # the array can grow again
        self._buckets[key] = bucket
        heapq.heappush(self._dues, key)

    def _part(self, ready: "Ready", positions: np.ndarray) -> _Bucket:
        """A bucket of the events of ``ready`` at ``positions`` (ascending)."""
        bucket = _Bucket(self.per_event)
        for name, column in bucket.columns.items():
            if name != "key_ids":
                column.frombytes(getattr(ready, name)[positions].tobytes())
        bucket.columns["key_ids"].frombytes(ready.key_ids[positions].tobytes())
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
        columns, n, start = bucket.columns, len(events), len(bucket)
        fields = list(zip(*map(astuple, events)))  # one pass over the events: a tuple per field
        times = fields[_TIME]
        columns["times"].extend(times)
        step, offset = self.step, self.offset
        first, last = min(times), max(times)  # due points grow with the time
        bucket.first_due = min(bucket.first_due, first - first % step + offset)
        bucket.last_due = max(bucket.last_due, last - last % step + offset)
        columns["partitions"].extend(array("i", (partition,)) * n)
        columns["offsets"].extend(fields[_OFFSET])
        columns["digests"].extend(fields[_DIGEST])
        self._add_values(bucket, start, fields[_VALUE])
        columns["key_ids"].extend(self._numbers(zip(fields[_ORG], fields[_CUSTOMER], fields[_CODE])))
        if self.per_event:
            columns["seen"].extend(fields[_SEEN])
            encoded = [txn.encode("utf-8", "surrogatepass") for txn in fields[_TXN]]
            columns["txn_lengths"].extend(map(len, encoded))
            bucket.txns.append(b"".join(encoded))
        if any(fields[_METRICS]):
            for position, event in enumerate(events, start):
                if event.metric_values:
                    bucket.events[position] = event

    @staticmethod
    def _add_values(bucket: _Bucket, start: int, values: tuple[int, ...]) -> None:
        wholes, fractions = zip(*map(divmod, values, repeat(VALUE_UNIT)))
        try:
            wholes = array("q", wholes)
        except OverflowError:  # a whole part beyond 64 bits: held aside, exactly
            wholes, fractions = array("q", bytes(8 * len(values))), list(fractions)
            for position, value in enumerate(values):
                if -_INT64_MAX <= value // VALUE_UNIT <= _INT64_MAX:
                    wholes[position] = value // VALUE_UNIT
                else:
                    bucket.wide[start + position] = value
                    fractions[position] = 0
        bucket.columns["wholes"].extend(wholes)
        bucket.columns["fractions"].extend(array("q", fractions))

    def _numbers(self, events_keys: Iterable[tuple]) -> list[int]:
        """The numbers of the keys ``(org, customer, code)`` of events, new keys numbered."""
        ids, ids_get, keys, strings = self._key_ids, self._key_ids.get, self._keys, self._strings
        found = []
        for key in events_keys:
            number = ids_get(key)
            if number is None:  # a new key: its org and code shared with the other keys
                org, customer, code = key
                key = (strings.setdefault(org, org), customer, strings.setdefault(code, code))
                number = ids[key] = len(keys)
                keys.append(key)
            found.append(number)
        return found

    def take_through(self, watermark: int) -> "Ready | None":
        """Remove every event due at or before ``watermark``; ``None`` when there is none."""
        dues, buckets, taken = self._dues, self._buckets, []
        while dues and buckets[dues[0]].last_due <= watermark:
            taken.append(buckets.pop(heapq.heappop(dues)))
        if dues and buckets[dues[0]].first_due <= watermark:  # later buckets hold later due points
            key = heapq.heappop(dues)
            split = _ready([buckets.pop(key)], self._keys)
            due = self._dues_of(split.times) <= watermark
            if due.any():
                taken.append(self._part(split, np.flatnonzero(due)))
            if not due.all():
                self._put(key, self._part(split, np.flatnonzero(~due)))
        if not taken:
            return None
        ready = _ready(taken, self._keys)  # keeps this list: compacting replaces it
        if len(self._keys) >= self._compact_at:
            self._compact_keys()
        return ready

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
        twin._keys, twin._key_ids = list(self._keys), dict(self._key_ids)
        twin._strings, twin._compact_at = dict(self._strings), self._compact_at
        return twin

    def snapshot(self) -> HeldSnapshot:
        self._compact_keys()
        return HeldSnapshot(self.per_event, list(self._keys),
                            [_packed(bucket) for bucket in self._buckets.values()])


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


def _ready(buckets: list[_Bucket], keys: list[tuple]) -> Ready:
    """The buckets' events merged and sorted for the decision."""
    wide, events, base = {}, {}, 0
    for bucket in buckets:
        wide.update((base + position, value) for position, value in bucket.wide.items())
        events.update((base + position, event) for position, event in bucket.events.items())
        base += len(bucket)
    columns = {name: np.concatenate([np.frombuffer(b.columns[name], dtype=_TYPECODES[name])
                                     for b in buckets]) for name in buckets[0].columns}
    order = np.lexsort((columns["offsets"], columns["partitions"], columns["times"]))
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


def _gathered(blob: bytes, starts: np.ndarray, lengths: np.ndarray) -> bytes:
    """The pieces ``blob[start:start + length]``, joined.

        >>> _gathered(b"abcdef", np.array([4, 0]), np.array([2, 1]))
        b'efa'
    """
    ends = np.cumsum(lengths, dtype=np.int64)
    places = np.repeat(starts - (ends - lengths), lengths) + np.arange(int(ends[-1]) if len(ends) else 0)
    return np.frombuffer(blob, dtype=np.uint8)[places].tobytes()


def _packed(bucket: _Bucket) -> tuple:
    return ({name: column.tobytes() for name, column in bucket.columns.items()},
            dict(bucket.wide), dict(bucket.events),
            None if bucket.txns is None else b"".join(bucket.txns))


def _unpacked(packed: tuple, per_event: bool, n_keys: int) -> _Bucket:
    column_bytes, wide, events, txns = packed
    bucket = _Bucket(per_event)
    if set(column_bytes) != set(bucket.columns):
        raise ValueError(f"held events: a snapshot with columns {sorted(column_bytes)}, expected "
                         f"{sorted(bucket.columns)}; start a new recovery store")
    for name, data in column_bytes.items():
        bucket.columns[name].frombytes(data)
    lengths = {len(column) for column in bucket.columns.values()}
    if len(lengths) != 1:
        raise ValueError(f"held events: columns of different lengths {sorted(lengths)} in a snapshot")
    numbers = np.array(bucket.columns["key_ids"], dtype=np.int32)
    if len(numbers) and not 0 <= int(numbers.min()) <= int(numbers.max()) < n_keys:
        raise ValueError(f"held events: a key number outside the snapshot's {n_keys} keys")
    bucket.wide, bucket.events = dict(wide), dict(events)
    if per_event:
        bucket.txns = [bytes(txns)]
        expected = sum(bucket.columns["txn_lengths"])
        if len(txns) != expected:
            raise ValueError(f"held events: {len(txns)} bytes of transaction ids, expected {expected}")
    return bucket
