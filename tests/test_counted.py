"""CountedCopies against a plain dict of lists, through batches, forgetting and snapshots."""

import pickle

import numpy as np
from hypothesis import given, settings, strategies as st

from state.counted import CountedCopies

HORIZON = 100


class Model:
    """Every counted time of every id, the rule applied one copy at a time."""

    def __init__(self) -> None:
        self.times: dict[int, list[int]] = {}

    def count(self, digest: int, timestamp: int) -> bool:
        times = self.times.setdefault(digest, [])
        if times and timestamp - times[-1] < HORIZON:
            return False
        times.append(timestamp)
        return True

    def near(self, digest: int, timestamp: int) -> bool:
        return any(abs(timestamp - t) < HORIZON for t in self.times.get(digest, ()))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(-3, 12), st.integers(0, 40)), max_size=30), max_size=12),
       st.integers(0, 2**32))
def test_counted_copies_decide_like_the_plain_model(batches, seed):
    rng = np.random.default_rng(seed)
    store, model, now = CountedCopies(HORIZON), Model(), 0
    extremes = [-(2**63) + 1, 2**63 - 1]
    for batch in batches:
        copies = sorted((now + dt, extremes[d + 3] if d < -1 else d) for d, dt in batch)
        if copies:
            times = np.array([t for t, _ in copies], dtype=np.int64)
            digests = np.array([d for _, d in copies], dtype=np.int64)
            assert store.count(digests, times).tolist() == [model.count(d, t) for t, d in copies]
            now = copies[-1][0]
        probe = int(rng.integers(0, 12))
        assert store.near(probe, now) == model.near(probe, now)
        if rng.random() < 0.3:
            store.forget_through(now - 2 * HORIZON)  # no later decision looks that far back
        if rng.random() < 0.3:
            store = CountedCopies(HORIZON, pickle.loads(pickle.dumps(store.snapshot())))
        now += int(rng.integers(0, 60))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32))
def test_thousands_of_ids_over_several_runs_decide_like_the_plain_model(seed):
    """Batches big enough to keep several runs apart (lookups across runs, merges of large
    ones); the snapshot holds each id once, sorted, with the time of its latest count."""
    rng = np.random.default_rng(seed)
    store, model, now = CountedCopies(HORIZON), Model(), 0
    for _ in range(8):
        n = int(rng.integers(1, 9_000))
        digests = rng.integers(-30_000, 30_000, n)
        times = np.sort(now + rng.integers(0, 3 * HORIZON, n))
        assert store.count(digests, times).tolist() == \
            [model.count(d, t) for d, t in zip(digests.tolist(), times.tolist())]
        now = int(times[-1])
        if rng.random() < 0.2:
            store = CountedCopies(HORIZON, pickle.loads(pickle.dumps(store.snapshot())))
    snapshot = store.snapshot()
    assert np.frombuffer(snapshot.digests, dtype=np.int64).tolist() == sorted(model.times)
    assert np.frombuffer(snapshot.times, dtype=np.int64).tolist() == \
        [model.times[d][-1] for d in sorted(model.times)]
