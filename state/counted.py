"""Which transactions were counted, and when: 64-bit digests with the event time of their count.

The shard decides copies in (event time, partition, offset) order; a copy counts when no
counted copy of its id lies within the dedup horizon before it. So what must be remembered is
the event time of every counted copy — exact, never a time bucket — until no decision can need
it. Decisions compare event times, so *when* an id is forgotten never changes an outcome::

    >>> counted = CountedCopies(horizon_ms=60_000)
    >>> counted.count(np.array([7, 7, 7], dtype=np.int64), np.array([0, 30_000, 60_000], dtype=np.int64)).tolist()
    [True, False, True]
    >>> counted.near(7, 100_000), counted.near(7, 130_000), len(counted)
    (True, False, 1)

About 16 bytes per remembered id: a log-structured set of runs, each a sorted ``int64`` array
of digests with a parallel array of times (the latest count of each id); the rare earlier counts
of a reused id wait in a small dict. A batch is sorted once and looked up with one
``searchsorted`` sweep per run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_INT64 = np.dtype(np.int64)
_NONE = np.iinfo(np.int64).min  # "not counted" in a lookup
_MIN_RUN = 4_096  # runs smaller than this are always merged into the next new run
_RUN_RATIO = 2  # a run is merged into the one before it when that is at most this many times bigger


@dataclass(frozen=True)
class CountedSnapshot:
    """What a CountedCopies needs to resume: its horizon and every remembered count."""

    horizon_ms: int
    digests: bytes  # int64, sorted
    times: bytes  # int64, the latest counted event time of each digest
    earlier: dict  # digest -> tuple of earlier counted event times (reused ids)


class CountedCopies:
    """The counted copies of one shard (see the module docstring)."""

    def __init__(self, horizon_ms: int, resume: CountedSnapshot | None = None) -> None:
        self.horizon_ms = horizon_ms
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # biggest first
        self._earlier: dict[int, tuple] = {}
        if resume is not None:
            if resume.horizon_ms != horizon_ms:
                raise ValueError(
                    f"dedup state was built with DEDUP_HORIZON={resume.horizon_ms} ms; now "
                    f"{horizon_ms} ms. Resume with the same setting or start a new recovery store.")
            digests = np.frombuffer(resume.digests, dtype=_INT64).copy()
            times = np.frombuffer(resume.times, dtype=_INT64).copy()
            if len(digests) != len(times):
                raise ValueError(f"dedup state: {len(digests)} digests but {len(times)} times")
            if len(digests):
                self._runs.append((digests, times))
            self._earlier = dict(resume.earlier)

    def __len__(self) -> int:
        return sum(len(digests) for digests, _ in self._runs)

    def count(self, digests: np.ndarray, times: np.ndarray) -> np.ndarray:
        """Decide copies given in decision order (times ascending); True where one counts, and
        remember it. Ids neither remembered nor repeated in the batch are decided at once; the
        batch is looked up, and its new ids remembered, in digest order (one sort)."""
        n = len(digests)
        counts = np.ones(n, dtype=bool)
        if not n:
            return counts
        order = np.argsort(digests)  # equal digests in any order: only their number matters here
        sorted_digests = digests[order]
        last, run_of, spot = self._lookup(sorted_digests)
        known = last != _NONE
        same = sorted_digests[1:] == sorted_digests[:-1]
        tricky = known.copy()
        tricky[1:] |= same
        tricky[:-1] |= same
        if tricky.any():
            at = np.flatnonzero(tricky)
            at = at[np.argsort(order[at])]  # in decision order
            self._decide_in_order(order[at], digests, times, last[at], run_of[at], spot[at], counts)
        fresh = ~known & counts[order]
        if fresh.any():
            self._add(sorted_digests[fresh], times[order[fresh]])
        return counts

    def _decide_in_order(self, positions: np.ndarray, digests: np.ndarray, times: np.ndarray,
                         last: np.ndarray, run_of: np.ndarray, spot: np.ndarray,
                         counts: np.ndarray) -> None:
        """Copies whose id is remembered or repeats in the batch, one by one, in decision order
        (``positions``; ``last``, ``run_of`` and ``spot`` their lookups)."""
        horizon, latest = self.horizon_ms, {}
        for i, remembered, run, place in zip(positions.tolist(), last.tolist(), run_of.tolist(), spot.tolist()):
            digest, timestamp = int(digests[i]), int(times[i])
            before = latest.get(digest, remembered)
            if before != _NONE and timestamp - before < horizon:
                counts[i] = False
                continue
            latest[digest] = timestamp
            if before != _NONE:
                self._earlier[digest] = (*self._earlier.get(digest, ()), before)
            if run >= 0:  # remembered: its latest count moves on, in place
                self._runs[run][1][place] = timestamp

    def _add(self, digests: np.ndarray, times: np.ndarray) -> None:
        """Digests not remembered, ascending; one counted twice keeps its latest time."""
        if len(digests) > 1:
            heads = np.flatnonzero(np.concatenate(([True], digests[1:] != digests[:-1])))
            if len(heads) < len(digests):
                digests, times = digests[heads], np.maximum.reduceat(times, heads)
        self._push(digests, times)

    def _lookup(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For ``digests`` (ascending: each run is searched in one sweep), the latest counted
        time of each (``_NONE`` if none), and where it is stored: its run (-1 if none) and its
        place in the run."""
        last = np.full(len(digests), _NONE, dtype=_INT64)
        run_of = np.full(len(digests), -1, dtype=_INT64)
        spot = np.zeros(len(digests), dtype=_INT64)
        for index, (run, run_times) in enumerate(self._runs):
            at = run.searchsorted(digests)
            hit = run.take(at, mode="clip") == digests
            if hit.any():
                last[hit], run_of[hit], spot[hit] = run_times[at[hit]], index, at[hit]
        return last, run_of, spot

    def _push(self, digests: np.ndarray, times: np.ndarray) -> None:
        runs = self._runs
        runs.append((digests, times))
        while len(runs) > 1 and (len(runs[-2][0]) < _MIN_RUN
                                 or len(runs[-2][0]) <= _RUN_RATIO * len(runs[-1][0])):
            later = runs.pop()
            runs[-1] = _merged(*runs[-1], *later)

    def near(self, digest: int, timestamp: int) -> bool:
        """Whether a counted copy of ``digest`` lies within the horizon of ``timestamp`` (either side)."""
        horizon = self.horizon_ms
        for run, run_times in self._runs:
            at = int(run.searchsorted(digest))
            if at < len(run) and run.item(at) == digest:
                if abs(timestamp - int(run_times[at])) < horizon:
                    return True
                break
        return any(abs(timestamp - t) < horizon for t in self._earlier.get(digest, ()))

    def forget_through(self, cutoff_ms: int) -> int:
        """Forget counts at or before ``cutoff_ms``; returns how many ids were forgotten."""
        kept, before = [], len(self)
        for digests, times in self._runs:
            keep = times > cutoff_ms
            if not keep.all():
                digests, times = digests[keep], times[keep]
            if len(digests):
                kept.append((digests, times))
        self._runs = []
        for digests, times in kept:
            self._push(digests, times)
        for digest, earlier in list(self._earlier.items()):
            left = tuple(t for t in earlier if t > cutoff_ms)
            if left:
                self._earlier[digest] = left
            else:
                del self._earlier[digest]
        return before - len(self)

    def copy(self) -> CountedCopies:
        """An independent copy (its own arrays: a count moves a time in place)."""
        twin = CountedCopies(self.horizon_ms)
        twin._runs = [(digests.copy(), times.copy()) for digests, times in self._runs]
        twin._earlier = dict(self._earlier)
        return twin

    def snapshot(self) -> CountedSnapshot:
        if len(self._runs) > 1:
            digests, times = self._runs.pop()
            while self._runs:
                digests, times = _merged(*self._runs.pop(), digests, times)
            self._runs = [(digests, times)]
        digests, times = self._runs[0] if self._runs else (np.empty(0, _INT64), np.empty(0, _INT64))
        return CountedSnapshot(self.horizon_ms, digests.tobytes(), times.tobytes(), dict(self._earlier))


def _merged(digests: np.ndarray, times: np.ndarray, later_digests: np.ndarray,
            later_times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two runs (sorted digests, their times) as one, an equal digest of the later run after
    the earlier run's (as a stable sort of the two would place them).

        >>> merged = _merged(np.array([1, 5]), np.array([10, 50]), np.array([0, 5, 9]), np.array([0, 55, 90]))
        >>> [column.tolist() for column in merged]
        [[0, 1, 5, 5, 9], [0, 10, 50, 55, 90]]
    """
    places = digests.searchsorted(later_digests, side="right") + np.arange(len(later_digests))
    earlier = np.ones(len(digests) + len(later_digests), dtype=bool)
    earlier[places] = False
    merged_digests, merged_times = np.empty(len(earlier), dtype=_INT64), np.empty(len(earlier), dtype=_INT64)
    merged_digests[places], merged_digests[earlier] = later_digests, digests
    merged_times[places], merged_times[earlier] = later_times, times
    return merged_digests, merged_times
