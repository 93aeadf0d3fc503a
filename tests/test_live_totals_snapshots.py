"""Live totals snapshots, against a plain sum written here: random batches (some provisional),
snapshots after random batches, evictions and resumes; every snapshot holds exactly the live
totals, and the live totals are the sums of what was counted since their period was last
evicted."""

from __future__ import annotations

import pickle
import random

import pytest

from operators.live_totals import LiveTotals, LiveTotalsLogic, LiveTotalsParams
from state.records import CountedUsage

DAY_MS = 86_400_000
JAN_30_2026_MS = 1_769_731_200_000


def month_start_ms(day_ms: int) -> int:
    """January or February 2026 only (the days this test draws)."""
    return 1_767_225_600_000 if day_ms < 1_769_904_000_000 else 1_769_904_000_000


def random_usage(rnd: random.Random, watermark: int, provisional: bool) -> CountedUsage:
    deltas = {}
    for _ in range(rnd.randrange(1, 12)):
        key = ("o", f"c{rnd.randrange(6)}", rnd.choice(["api", "x:y"]),
               JAN_30_2026_MS + rnd.randrange(4) * DAY_MS)
        deltas[key] = (rnd.randrange(1, 4), rnd.randrange(-10**20, 10**25), key[3] + 1)
    return CountedUsage(deltas, watermark, provisional)


@pytest.mark.parametrize("seed", range(40))
def test_snapshots_hold_exactly_the_live_totals_through_evictions_and_resumes(seed):
    rnd = random.Random(seed)
    params = LiveTotalsParams(shards=1, day_horizon_ms=DAY_MS)
    logic = LiveTotalsLogic(params)
    expected: dict = {}
    watermark = -(2**63)
    for _ in range(60):
        if rnd.random() < 0.1:
            watermark = JAN_30_2026_MS + rnd.randrange(2, 5) * DAY_MS  # evicts the oldest days
        provisional = rnd.random() < 0.1
        batch = [random_usage(rnd, watermark, provisional) for _ in range(rnd.randrange(1, 3))]
        out, _ = logic.on_batch(batch)
        shown = {key: total for item in out if isinstance(item, LiveTotals)
                 for key, total in item.totals.items()}
        if not provisional:
            for usage in batch:
                for (org, customer, code, day), (count, total, _latest) in usage.deltas.items():
                    for key in ((org, customer, code, "day", day),
                                (org, customer, code, "month", month_start_ms(day))):
                        had = expected.get(key, (0, 0))
                        expected[key] = (had[0] + count, had[1] + total)
            assert all(shown[key] == expected[key] for key in shown if key in logic.totals)
        assert logic.totals == {key: expected[key] for key in logic.totals}
        expected = {key: expected[key] for key in logic.totals}  # evicted: a later one restarts
        if rnd.random() < 0.4:
            snapshot = logic.snapshot()
            assert snapshot.total_entries() == logic.totals
            if rnd.random() < 0.3:
                logic = LiveTotalsLogic(params, pickle.loads(pickle.dumps(snapshot)))
                assert logic.totals == snapshot.total_entries()
    assert logic.snapshot().total_entries() == logic.totals
