"""Which transactions have been counted: 64-bit digests in event-time buckets.

A digest is remembered until the watermark passes its event time plus the
dedup horizon. Buckets exist to forget whole spans of time at once and to
snapshot compactly; lookups go to a separate index::

    >>> store = DedupStore(horizon_ms=60_000)
    >>> store.first_sighting(transaction_digest("org", "t1"), timestamp_ms=1_000)
    True
    >>> store.first_sighting(transaction_digest("org", "t1"), timestamp_ms=1_000)
    False
    >>> store.forget_before(watermark_ms=10**9); len(store)
    1
    0

About 18 bytes per remembered digest, kept in numpy arrays rather than
Python ints:

* each bucket is the packed bytes of its last snapshot plus an
  ``array('q')`` of the digests added since (8 bytes a digest), so a
  snapshot re-serialises only the buckets that changed;
* the index is a log-structured set of sorted, disjoint ``int64`` runs
  (8 bytes a digest): each batch of new digests becomes a run, merged into
  the run before it while that one is not much bigger, so there are
  O(log n) runs and a digest is copied O(log n) times in all;
* a blocked Bloom filter over the runs (2-4 bytes a digest) spares most
  new digests a binary search in every run;
* digests of small batches and single sightings first go to a small dict,
  checked one by one, and become a run once it holds 16,384.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter

import numpy as np
import xxhash

_xxh3 = xxhash.xxh3_64_intdigest
_HALF = 2**63
_MIN_BUCKET_MS = 60_000
_BUCKETS_PER_HORIZON = 32

_MIN_RUN = 4_096  # runs smaller than this are always merged into the next new run
_RUN_RATIO = 2  # a run is merged into the one before it when that is at most this many times bigger
_FEW = 256  # smaller batches are checked event by event (numpy's per-call cost is too high)
_LOOSE_MAX = 16_384  # digests of small batches kept in a dict before they become a run

_digest_of = attrgetter("digest")
_time_of = attrgetter("timestamp_ms")
_INT64 = np.dtype(np.int64)


digest_hash = _xxh3
DIGEST_BIAS = _HALF


def transaction_digest(organization_id: str, transaction_id: str) -> int:
    """Stable signed 64-bit digest of (organization_id, transaction_id), equal in every process.

    The hashed text is length-prefixed, ``f"{len(org)}:{org}{txn}"``, so it names one
    pair whatever characters the ids hold (a separator character could appear in an id:
    ``("a\x1fb", "c")`` and ``("a", "b\x1fc")`` would share a digest). A hot loop may
    inline it as ``digest_hash(f"{len(org)}:{org}{txn}".encode()) - DIGEST_BIAS``::

        >>> digest_hash("3:orgt1".encode()) - DIGEST_BIAS == transaction_digest("org", "t1")
        True
        >>> transaction_digest("a\x1fb", "c") == transaction_digest("a", "b\x1fc")
        False
    """
    return _xxh3(f"{len(organization_id)}:{organization_id}{transaction_id}".encode()) - _HALF


@dataclass(frozen=True)
class DedupSnapshot:
    """What a DedupStore needs to resume: its parameters and the digests per bucket."""

    horizon_ms: int
    bucket_ms: int
    buckets: dict[int, bytes]


class _Bucket:
    """One bucket's digests: the bytes of the last snapshot plus those added since."""

    __slots__ = ("packed", "added")

    def __init__(self, packed: bytes = b"") -> None:
        self.packed = packed
        self.added = array("q")

    def __len__(self) -> int:
        return len(self.packed) // 8 + len(self.added)

    def frozen(self) -> bytes:
        if self.added:
            self.packed = b"".join((self.packed, self.added))
            self.added = array("q")
        return self.packed

    def digests(self) -> np.ndarray:
        packed = np.frombuffer(self.packed, dtype=_INT64)
        if not self.added:
            return packed
        return np.concatenate((packed, np.frombuffer(self.added, dtype=_INT64)))


class _Filter:
    """A blocked Bloom filter over digests: three of the 16 bits of one word per digest.

    ``digest >> shift`` keeps the digest's top bits: all but the last twelve pick
    the word (so sorted digests touch the filter in order), the last twelve its
    three bits. Negative digests pick words of the upper half, like negative
    indices of an array, so checking one digest in Python is a shift, two
    indexings and a mask. The filter answers "maybe remembered" or "surely not",
    so most new digests skip the index search (0.5-2 % false positives at
    16-32 bits a digest). It never forgets; it is rebuilt once enough of what
    it holds has expired.
    """

    __slots__ = ("words", "view", "shift")

    def __init__(self, size_log2: int) -> None:
        self.words = array("H", bytes(2 << size_log2))
        self.view = np.frombuffer(self.words, dtype=np.uint16)
        self.shift = 64 - size_log2 - 12

    def __len__(self) -> int:
        return len(self.words)

    def _words_and_bits(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at = digests >> self.shift
        bits = _BITS[at & 4095]
        at >>= 12  # in [-len/2, len/2): numpy indexing takes negative indices like Python
        return at, bits

    def may_hold(self, digests: np.ndarray) -> np.ndarray:
        at, bits = self._words_and_bits(digests)
        return (self.view[at] & bits) == bits

    def may_hold_one(self, digest: int) -> bool:
        at = digest >> self.shift
        bits = _BIT_TUPLE[at & 4095]
        return self.words[at >> 12] & bits == bits

    def add(self, digests: np.ndarray) -> None:
        """Set the bits of ``digests``, which must be sorted."""
        for lo in range(0, len(digests), _FILTER_CHUNK):
            at, bits = self._words_and_bits(digests[lo:lo + _FILTER_CHUNK])
            # A fancy |= keeps only the last of equal indices, so equal ones (adjacent:
            # the digests are sorted) are combined first, or set again one by one if few.
            repeats = np.flatnonzero(at[1:] == at[:-1])
            if len(repeats) * 16 > len(at):
                first = np.ones(len(at), dtype=bool)
                first[repeats + 1] = False
                starts = np.flatnonzero(first)
                self.view[at[starts]] |= np.bitwise_or.reduceat(bits, starts)
            else:
                self.view[at] |= bits
                if len(repeats):
                    repeats = np.concatenate((repeats, repeats + 1))
                    np.bitwise_or.at(self.view, at[repeats], bits[repeats])


_BIT_TUPLE = tuple((1 << (i & 15)) | (1 << ((i >> 4) & 15)) | (1 << (i >> 8)) for i in range(4096))
_BITS = np.array(_BIT_TUPLE, dtype=np.uint16)
_FILTER_CHUNK = 65_536
_MIN_FILTER_LOG2 = 10
_FILTER_BITS_PER_DIGEST = 16  # the filter doubles when it would have fewer


def _filter_log2(count: int) -> int:
    """Filter size (log2 of its 16-bit words) for ``count`` digests: 16 to 32 bits a digest."""
    return max(_MIN_FILTER_LOG2, count.bit_length())


class DedupStore:
    """Remembers transaction digests for ``horizon_ms`` of event time.

    ``min_run`` tunes (and lets tests shrink) the size below which index runs
    are always merged; it changes speed, never a decision.
    """

    def __init__(self, horizon_ms: int, resume: DedupSnapshot | None = None, *,
                 min_run: int = _MIN_RUN) -> None:
        self.horizon_ms = horizon_ms
        self.bucket_ms = max(_MIN_BUCKET_MS, horizon_ms // _BUCKETS_PER_HORIZON)
        self._min_run = max(1, min_run)
        self._buckets: dict[int, _Bucket] = {}
        self._runs: list[np.ndarray] = []  # sorted, unique, disjoint int64 digests; biggest first
        # Digests of small batches, with their event time, not yet in a run nor a bucket.
        self._loose: dict[int, int] = {}
        self._earliest: int | None = None  # no digest (in a bucket or loose) is in an earlier bucket
        self._count = 0  # digests in _runs and _loose
        self._filter = _Filter(_MIN_FILTER_LOG2)  # every digest of _runs is in it
        self._stale = 0  # digests forgotten since the filter was built, still in it
        if resume is not None:
            self._restore(resume)

    def _restore(self, resume: DedupSnapshot) -> None:
        if (resume.horizon_ms, resume.bucket_ms) != (self.horizon_ms, self.bucket_ms):
            raise ValueError(
                f"dedup state was built with DEDUP_HORIZON={resume.horizon_ms} ms; "
                f"now {self.horizon_ms} ms. Resume with the same setting or start a new recovery store."
            )
        parts = []
        for bucket, packed in resume.buckets.items():
            if len(packed) % 8:
                raise ValueError(f"dedup bucket {bucket}: {len(packed)} bytes, not whole 8-byte digests")
            self._buckets[bucket] = _Bucket(packed if type(packed) is bytes else bytes(packed))
            parts.append(np.frombuffer(packed, dtype=_INT64))
        if self._buckets:
            self._earliest = min(self._buckets)
        if parts:
            digests = np.concatenate(parts)
            digests.sort()
            if len(digests) > 1:
                distinct = np.empty(len(digests), dtype=bool)
                distinct[0] = True
                np.not_equal(digests[1:], digests[:-1], out=distinct[1:])
                if not distinct.all():  # not written by this store, but a set would take it
                    digests = digests[distinct]
            self._add_run(digests)
        self._rebuild_filter()

    def first_sighting(self, digest: int, timestamp_ms: int) -> bool:
        """Record the digest; True when it was not already remembered."""
        if digest in self._loose:
            return False
        if self._runs and self._filter.may_hold_one(digest) and self._indexed(digest):
            return False
        self._loose[digest] = timestamp_ms
        self._loosened(timestamp_ms)
        return True

    def keep_first_sightings(self, events: list) -> list:
        """The events (:class:`state.records.ShardEvent`) whose digest is new; records them.

        The batch form of :meth:`first_sighting`, for the hot path.
        """
        n = len(events)
        if n < _FEW:
            return self._keep_few(events) if n else []
        if self._loose:
            self._flush_loose()
        digests = np.fromiter(map(_digest_of, events), dtype=_INT64, count=n)
        order = digests.argsort(kind="stable")  # so the first of equal digests comes first
        ordered = digests[order]
        new = np.empty(n, dtype=bool)
        new[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
        if self._runs:
            maybe = np.flatnonzero(self._filter.may_hold(ordered))
            if len(maybe):
                self._drop_remembered(ordered, maybe, new)
        if new.all():
            fresh, kept, picked = list(events), ordered, order
        else:
            picked = order[new]
            if not len(picked):
                return []
            kept = ordered[new]
            in_input = np.zeros(n, dtype=bool)
            in_input[picked] = True
            fresh = list(compress(events, in_input.tolist()))
        times = np.fromiter(map(_time_of, events), dtype=_INT64, count=n)
        self._file(kept, times[picked])
        self._filter.add(kept)
        self._add_run(kept)
        self._fit_filter()
        return fresh

    def _keep_few(self, events: list) -> list:
        """keep_first_sightings for a few events: one numpy check, then Python; new digests go loose."""
        if self._runs:
            digests = np.fromiter(map(_digest_of, events), dtype=_INT64, count=len(events))
            maybe_known = self._filter.may_hold(digests).tolist()
        else:
            maybe_known = repeat(False, len(events))
        loose, fresh = self._loose, []
        for event, maybe in zip(events, maybe_known):
            digest = event.digest
            if digest in loose or (maybe and self._indexed(digest)):
                continue
            loose[digest] = event.timestamp_ms
            fresh.append(event)
        if fresh:
            self._loosened(min(map(_time_of, fresh)), len(fresh))
        return fresh

    def _loosened(self, earliest_ms: int, added: int = 1) -> None:
        """Account for ``added`` new loose digests, the earliest at ``earliest_ms``."""
        self._count += added
        earliest = earliest_ms // self.bucket_ms
        if self._earliest is None or earliest < self._earliest:
            self._earliest = earliest
        if len(self._loose) >= _LOOSE_MAX:
            self._flush_loose()

    def _indexed(self, digest: int) -> bool:
        for run in self._runs:
            at = int(run.searchsorted(digest))
            if at < len(run) and run.item(at) == digest:
                return True
        return False

    def _drop_remembered(self, ordered: np.ndarray, maybe: np.ndarray, new: np.ndarray) -> None:
        """Clear ``new`` at the positions ``maybe`` of ``ordered`` whose digest the index holds."""
        probe = ordered[maybe]
        for run in self._runs:
            hit = run.take(run.searchsorted(probe), mode="clip") == probe
            if hit.any():
                new[maybe[hit]] = False
                missed = ~hit
                maybe, probe = maybe[missed], probe[missed]
                if not len(probe):
                    return

    def _file(self, digests: np.ndarray, times: np.ndarray) -> None:
        """Append ``digests`` to the buckets of their event ``times``."""
        buckets = times // self.bucket_ms
        first, last = int(buckets.min()), int(buckets.max())
        if first == last:
            self._bucket(first).added.frombytes(memoryview(digests).cast("B"))
            return
        by_bucket = buckets.argsort(kind="stable")
        buckets, grouped = buckets[by_bucket], digests[by_bucket]
        starts = np.flatnonzero(buckets[1:] != buckets[:-1]) + 1
        for bucket, some in zip(buckets[np.r_[0, starts]].tolist(), np.split(grouped, starts)):
            self._bucket(bucket).added.frombytes(memoryview(some).cast("B"))

    def _bucket(self, bucket: int) -> _Bucket:
        entry = self._buckets.get(bucket)
        if entry is None:
            entry = self._buckets[bucket] = _Bucket()
            if self._earliest is None or bucket < self._earliest:
                self._earliest = bucket
        return entry

    def _flush_loose(self) -> None:
        """Move the loose digests to their buckets and a run of the index."""
        loose, n = self._loose, len(self._loose)
        digests = np.fromiter(loose, dtype=_INT64, count=n)
        times = np.fromiter(loose.values(), dtype=_INT64, count=n)
        loose.clear()
        order = digests.argsort()
        digests = digests[order]
        self._file(digests, times[order])
        self._count -= n
        self._filter.add(digests)
        self._add_run(digests)
        self._fit_filter()

    def _add_run(self, run: np.ndarray) -> None:
        """Add sorted digests, none already remembered, to the index (not to the filter)."""
        if not len(run):
            return
        runs = self._runs
        runs.append(run)
        self._count += len(run)
        while len(runs) > 1 and (len(runs[-2]) < self._min_run
                                 or len(runs[-2]) <= _RUN_RATIO * len(runs[-1])):
            last = runs.pop()
            merged = np.concatenate((runs[-1], last))
            merged.sort(kind="stable")  # timsort: one linear merge of the two sorted halves
            runs[-1] = merged

    def _fit_filter(self) -> None:
        if (self._count + self._stale) * _FILTER_BITS_PER_DIGEST > 16 * len(self._filter):
            self._rebuild_filter()

    def _rebuild_filter(self) -> None:
        self._stale = 0
        self._filter = fresh = _Filter(_filter_log2(self._count))
        for run in self._runs:
            fresh.add(run)

    def forget_before(self, watermark_ms: int) -> int:
        """Forget digests whose event time + horizon the watermark has passed; returns how many."""
        earliest = self._earliest
        if earliest is None or (earliest + 1) * self.bucket_ms + self.horizon_ms > watermark_ms:
            return 0
        if self._loose:
            self._flush_loose()
        expired = [
            bucket
            for bucket in self._buckets
            if (bucket + 1) * self.bucket_ms + self.horizon_ms <= watermark_ms
        ]
        gone = [self._buckets.pop(bucket).digests() for bucket in expired]
        self._earliest = min(self._buckets) if self._buckets else None
        forgotten = sum(map(len, gone))
        if forgotten:
            self._unindex(np.concatenate(gone))
        return forgotten

    def _unindex(self, gone: np.ndarray) -> None:
        """Drop the digests ``gone`` from the index (those it does not hold are ignored).

        Their bits stay in the filter, which only makes it answer "maybe" more
        often, until they are an eighth of what it holds: then it is rebuilt.
        """
        gone = np.sort(gone)
        kept_runs = []
        for run in self._runs:
            if len(gone):
                at = run.searchsorted(gone)
                hit = run.take(at, mode="clip") == gone
                if hit.any():
                    keep = np.ones(len(run), dtype=bool)
                    keep[at[hit]] = False
                    run = run[keep]
                    gone = gone[~hit]
            if len(run):
                kept_runs.append(run)
        before = self._count
        self._runs = []
        self._count = 0
        for run in kept_runs:
            self._add_run(run)
        self._stale += before - self._count
        if self._stale * 8 > self._count:
            self._rebuild_filter()

    def __len__(self) -> int:
        return self._count

    def snapshot(self) -> DedupSnapshot:
        if self._loose:
            self._flush_loose()
        return DedupSnapshot(
            self.horizon_ms,
            self.bucket_ms,
            {bucket: entry.frozen() for bucket, entry in self._buckets.items()},
        )
