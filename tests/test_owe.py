"""``WindowStore.owe`` marks owed windows in bulk (and a window owed whole is marked owed in
its snapshots, not packed again): against the rule one row at a time, the store holds the
same aggregates, and a resume from its snapshots too, then and after more input."""

from __future__ import annotations

import os
import pickle

from hypothesis import HealthCheck, given, settings, strategies as st

from state.records import WindowRowBlock
from state.window_kinds import TumblingWindows
from state.windows import OWED, WindowStore, unpack_window

EXAMPLES = int(os.environ.get("TALLYFLOW_PROPERTY_EXAMPLES", "200"))


class OneRowAtATime(WindowStore):
    """The rule as it was first written: each owed key noted changed, one at a time."""

    def owe(self, rows, watermark_ms: int) -> None:
        self.owed_after = watermark_ms
        for row in rows:
            pairs = [(k, row.window_start_ms) for k in row.keys] if isinstance(row, WindowRowBlock) \
                else [((row.organization_id, row.external_customer_id, row.code), row.window_start_ms)]
            for key, start in pairs:
                window = self._window(start)
                if key not in window.positions:
                    window.extend([key], [0], [0], [OWED])
                position = window.positions[key]
                self._changed_in(start)[position] = None
                window.emitted[position] = OWED


KEYS = [("o", c, x) for c in "abcdef" for x in "xy"]
adds = st.lists(st.tuples(st.sampled_from([0, 60_000, 120_000]), st.sampled_from(KEYS),
                          st.integers(1, 3), st.integers(-5, 5)), max_size=30)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(adds, st.sampled_from([0, 60_000, 120_000]), adds, st.booleans(), adds, st.booleans(),
       st.integers(0, 180_000), adds)
def test_bulk_owe_holds_and_packs_what_one_row_at_a_time_did(before, emitted_at, more, snap,
                                                            scratch_adds, blocks, closing, after):
    stores = [WindowStore(TumblingWindows(60_000), allowed_lateness_ms=120_000),
              OneRowAtATime(TumblingWindows(60_000), allowed_lateness_ms=120_000)]
    for store in stores:
        for start, key, count, total in before:
            store.add_groups(start, [key], [count], [total])
        store.emit_closed(emitted_at, emitted_at)  # some rows written for real, kept open
        for start, key, count, total in more:
            store.add_groups(start, [key], [count], [total])
        if snap:
            store.snapshot()
        scratch = store.copy()
        for start, key, count, total in scratch_adds:
            scratch.add_groups(start, [key], [count], [total])
        store.owe(scratch.emit_closed(closing, emitted_at, provisional=True, blocks=blocks), emitted_at)
    bulk, reference = stores
    assert live(bulk) == live(reference) == live(resumed(bulk)) == live(resumed(reference))
    for store in stores:
        if snap:  # the mark, then what changes after it
            store.snapshot()
        for start, key, count, total in after:
            store.add_groups(start, [key], [count], [total])
        store.emit_closed(closing + 60_000, emitted_at + 60_000)
    assert live(bulk) == live(reference) == live(resumed(bulk)) == live(resumed(reference))


def test_a_window_owed_whole_is_marked_not_packed_again():
    store = WindowStore(TumblingWindows(60_000))
    store.add(0, ("o", "c", "x"), 5)
    store.snapshot()
    scratch = store.copy()
    scratch.add(0, ("o", "d", "x"), 2)
    store.owe(scratch.emit_closed(60_000, 0, provisional=True, blocks=True), 0)
    first, mark, new = store.snapshot().windows[0]
    assert mark == OWED and unpack_window(new) == {("o", "d", "x"): [0, 0, OWED]}
    assert live(resumed(store)) == live(store) == [(0, [(("o", "c", "x"), [1, 5, OWED]),
                                                        (("o", "d", "x"), [0, 0, OWED])])]


def live(store: WindowStore) -> list:
    return [(start, list(window.aggregates().items())) for start, window in store._open.items()]


def resumed(store: WindowStore) -> WindowStore:
    """A store resumed from ``store``'s snapshot (taken on a copy, so ``store`` packs on as it would)."""
    twin = store.copy()
    return WindowStore(store.windows, pickle.loads(pickle.dumps(twin.snapshot())),
                       store.allowed_lateness_ms)
