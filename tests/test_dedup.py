"""DedupStore against a plain dict model, through merges, expiry, snapshots and restores."""

import pickle
import random
from array import array

import msgspec
import pytest

import state.dedup as dedup
from state.dedup import DedupSnapshot, DedupStore, transaction_digest
from state.records import ShardEvent

START_MS = 1_767_225_600_000
MINUTE = 60_000
EXTREMES = (-(2**63), 2**63 - 1, 0, -1, 1)


class Reference:
    """What DedupStore must decide: digest -> bucket of its first sighting, nothing clever."""

    def __init__(self, horizon_ms: int) -> None:
        self.horizon_ms = horizon_ms
        self.bucket_ms = max(60_000, horizon_ms // 32)
        self.bucket_of: dict[int, int] = {}

    def first_sighting(self, digest: int, timestamp_ms: int) -> bool:
        if digest in self.bucket_of:
            return False
        self.bucket_of[digest] = timestamp_ms // self.bucket_ms
        return True

    def keep_first_sightings(self, events: list) -> list:
        return [event for event in events if self.first_sighting(event.digest, event.timestamp_ms)]

    def forget_before(self, watermark_ms: int) -> int:
        gone = [d for d, b in self.bucket_of.items()
                if (b + 1) * self.bucket_ms + self.horizon_ms <= watermark_ms]
        for digest in gone:
            del self.bucket_of[digest]
        return len(gone)

    def buckets(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for digest, bucket in self.bucket_of.items():
            out.setdefault(bucket, []).append(digest)
        return {bucket: sorted(digests) for bucket, digests in out.items()}


def event(digest: int, timestamp_ms: int) -> ShardEvent:
    """An event as the flow builds it."""
    return ShardEvent(digest, "org", "customer", "api_calls", timestamp_ms, 10**18, 0, 0, "txn", None)


def unpacked(snapshot: DedupSnapshot) -> dict[int, list[int]]:
    """A snapshot's buckets read the way the previous store read them (array('q'))."""
    out = {}
    for bucket, packed in snapshot.buckets.items():
        assert type(bucket) is int and type(packed) is bytes
        digests = array("q")
        digests.frombytes(packed)
        if digests:
            out[bucket] = sorted(digests)
    return out


class Stream:
    """Random batches with in-batch, cross-batch and late duplicates over advancing event time."""

    def __init__(self, seed: int, horizon_ms: int) -> None:
        self.rng = random.Random(seed)
        self.horizon_ms = horizon_ms
        self.now = START_MS
        self.recent: list[int] = list(EXTREMES)

    def digest(self) -> int:
        rng = self.rng
        roll = rng.random()
        if roll < 0.15 and self.recent:  # a copy of something seen, maybe long ago
            return rng.choice(self.recent)
        if roll < 0.17:
            return rng.choice(EXTREMES)
        digest = rng.getrandbits(64) - 2**63
        self.recent.append(digest)
        if len(self.recent) > 50_000:
            del self.recent[: len(self.recent) // 2]
        return digest

    def timestamp(self) -> int:
        rng = self.rng
        if rng.random() < 0.05:  # late, possibly past the horizon
            return self.now - rng.randrange(0, 2 * self.horizon_ms)
        return self.now + rng.randrange(-20_000, 5_000)

    def batch(self) -> list:
        rng = self.rng
        size = rng.choice((0, 1, 3, 40, 200, 255, 256, 257, 600, 2_000))
        events = [event(self.digest(), self.timestamp()) for _ in range(size)]
        for _ in range(size // 20):  # copies inside the batch
            events.insert(rng.randrange(len(events) + 1), rng.choice(events))
        self.now += rng.randrange(0, 40_000)
        return events


def run_against_reference(stores: list, reference: Reference, stream: Stream, steps: int) -> None:
    rng = stream.rng
    for _ in range(steps):
        roll = rng.random()
        if roll < 0.1:
            digest, timestamp = stream.digest(), stream.timestamp()
            expected = reference.first_sighting(digest, timestamp)
            for store in stores:
                assert store.first_sighting(digest, timestamp) is expected
        elif roll < 0.2:
            watermark = stream.now - rng.randrange(0, 60_000)
            expected = reference.forget_before(watermark)
            for store in stores:
                assert store.forget_before(watermark) == expected
        else:
            events = stream.batch()
            expected = reference.keep_first_sightings(events)
            for store in stores:
                fresh = store.keep_first_sightings(events)
                assert fresh == expected  # the same tuples, in input order
                assert fresh is not events
        for store in stores:
            assert len(store) == len(reference.bucket_of)


@pytest.mark.parametrize("min_run", [1, 64, None])
@pytest.mark.parametrize("seed", [1, 2])
def test_decisions_match_a_plain_dict(seed, min_run):
    horizon_ms = 20 * MINUTE
    options = {} if min_run is None else {"min_run": min_run}
    store, reference = DedupStore(horizon_ms, **options), Reference(horizon_ms)
    stream = Stream(seed, horizon_ms)
    for _ in range(6):
        run_against_reference([store], reference, stream, steps=60)
        assert unpacked(store.snapshot()) == reference.buckets()
    assert len(reference.bucket_of) > 5_000  # enough for filter growth, merges and expiry


def test_decisions_match_with_many_runs_and_loose_flushes(monkeypatch):
    """Tiny thresholds: every small batch spills into a run, runs merge all the time."""
    monkeypatch.setattr(dedup, "_LOOSE_MAX", 7)
    monkeypatch.setattr(dedup, "_FEW", 64)
    horizon_ms = 10 * MINUTE
    store, reference = DedupStore(horizon_ms, min_run=2), Reference(horizon_ms)
    stream = Stream(3, horizon_ms)
    run_against_reference([store], reference, stream, steps=250)
    assert len(store._runs) > 1
    assert unpacked(store.snapshot()) == reference.buckets()


@pytest.mark.parametrize("seed", [4, 5])
def test_restored_store_decides_like_the_original(seed):
    horizon_ms = 15 * MINUTE
    store, reference = DedupStore(horizon_ms, min_run=16), Reference(horizon_ms)
    stream = Stream(seed, horizon_ms)
    run_against_reference([store], reference, stream, steps=120)
    for _ in range(3):
        restored = DedupStore(horizon_ms, pickle.loads(pickle.dumps(store.snapshot())))
        assert len(restored) == len(store)
        run_against_reference([store, restored], reference, stream, steps=80)
        assert unpacked(restored.snapshot()) == unpacked(store.snapshot()) == reference.buckets()
        store = restored


def test_snapshot_of_the_previous_store_format_restores():
    """Buckets packed by array('q').tobytes(), as the set-based store wrote them."""
    horizon_ms = 86_400_000
    bucket_ms = 86_400_000 // 32
    rng = random.Random(7)
    old_buckets = {}
    for bucket in range(START_MS // bucket_ms - 5, START_MS // bucket_ms + 1):
        old_buckets[bucket] = array("q", [rng.getrandbits(64) - 2**63 for _ in range(3_000)]).tobytes()
    old_buckets[START_MS // bucket_ms - 6] = array("q", [-(2**63), 2**63 - 1]).tobytes()
    old_buckets[START_MS // bucket_ms - 7] = b""
    snapshot = DedupSnapshot(horizon_ms, bucket_ms, old_buckets)
    store = DedupStore(horizon_ms, pickle.loads(pickle.dumps(snapshot)))
    remembered = [d for packed in old_buckets.values() for d in array("q", packed)]
    assert len(store) == len(remembered) == 18_002
    assert store.keep_first_sightings([event(d, START_MS) for d in remembered]) == []
    assert not store.first_sighting(-(2**63), START_MS)
    fresh = [event(transaction_digest("org", f"new-{i}"), START_MS) for i in range(500)]
    assert store.keep_first_sightings(fresh) == fresh
    # Unchanged buckets come back as they went in.
    again = store.snapshot().buckets
    assert all(again[b] == packed for b, packed in old_buckets.items() if b != START_MS // bucket_ms)
    # Expiry counts whole buckets of the old snapshot.
    oldest = START_MS // bucket_ms - 7
    assert store.forget_before((oldest + 3) * bucket_ms + horizon_ms) == 2 + 3_000
    assert store.first_sighting(-(2**63), START_MS)


def test_snapshot_reuses_the_bytes_of_buckets_that_did_not_change():
    store = DedupStore(10 * MINUTE)
    store.keep_first_sightings([event(i, START_MS) for i in range(1_000)])
    store.keep_first_sightings([event(-i - 1, START_MS + 5 * MINUTE) for i in range(1_000)])
    first = store.snapshot().buckets
    assert store.snapshot().buckets == first
    assert all(store.snapshot().buckets[b] is packed for b, packed in first.items())
    store.first_sighting(10**6, START_MS + 5 * MINUTE)
    second = store.snapshot().buckets
    changed = (START_MS + 5 * MINUTE) // MINUTE
    assert second[START_MS // MINUTE] is first[START_MS // MINUTE]
    assert sorted(array("q", second[changed])) == sorted([10**6] + [-i - 1 for i in range(1_000)])


def test_refuses_a_snapshot_of_another_horizon():
    snapshot = DedupStore(86_400_000).snapshot()
    with pytest.raises(ValueError, match="DEDUP_HORIZON=86400000"):
        DedupStore(3_600_000, snapshot)
    with pytest.raises(ValueError, match="DEDUP_HORIZON"):
        DedupStore(3_600_000, DedupSnapshot(86_400_000, 2_700_000, {1: array("q", [5]).tobytes()}))


def test_first_copy_in_a_batch_is_kept_and_the_batch_is_remembered():
    store = DedupStore(10 * MINUTE)
    for size in (5, 1_000):  # the one-by-one and the numpy path
        a, b = event(size, START_MS), event(size + 1, START_MS)
        a_copy = msgspec.structs.replace(a, timestamp_ms=START_MS + 9 * MINUTE)
        filler = [event(-size * 10_000 - i, START_MS + i) for i in range(size)]
        fresh = store.keep_first_sightings([a, b, a_copy, b] + filler)
        assert fresh[:2] == [a, b] and fresh[2:] == filler
        assert store.keep_first_sightings([a_copy]) == []
    # a's bucket is that of its first sighting: it goes when START_MS's bucket expires.
    assert store.forget_before(START_MS + MINUTE + 10 * MINUTE) > 0
    assert store.first_sighting(5, START_MS)
    assert store.keep_first_sightings([]) == []
