"""The end of input's provisional flush decides and emits on a copy of the shard
(``UsageWindowLogic._scratch``). That copy used to be a resume from a snapshot,
``UsageWindowLogic(params, logic._snapshot())``; it is now built from the stores' own copies,
with the window stores' aggregates shared until changed. Whatever the input, both ways write
the same rows, late records and live totals, leave the shard in the same state, and a later
run resumed from either writes the same again.

``TALLYFLOW_PROPERTY_EXAMPLES`` sets the number of examples (default 200).
"""

from __future__ import annotations

import json
import os
import pickle
import random

from hypothesis import HealthCheck, given, settings, strategies as st

from operators.catalog import load_catalog_text
from operators.intake import IntakeLogic
from operators.usage_windows import UsageWindowLogic, UsageWindowParams
from state.sessions import SessionStore
from state.watermark import END_OF_STREAM
from state.window_kinds import SessionWindows, SlidingWindows, TumblingWindows
from state.windows import AggregateWindowStore, WindowStore

EXAMPLES = int(os.environ.get("TALLYFLOW_PROPERTY_EXAMPLES", "200"))
SCALE = 10**18
CATALOG = """
[[metric]]
name = "calls"
code = "x"
aggregation = "count"
window = { kind = "tumbling", size = "30s" }

[[metric]]
name = "running"
code = "x"
aggregation = "sum"
recurring = true
window = { kind = "tumbling", size = "20s" }

[[metric]]
name = "users"
code = "y"
aggregation = "unique_count"
field = "properties.user"
window = { kind = "session", gap = "15s" }
"""
WINDOWS = {"tumbling": TumblingWindows(20_000), "sliding": SlidingWindows(20_000, 10_000),
           "session": SessionWindows(10_000)}


class SnapshotScratch(UsageWindowLogic):
    """The flush's copy built the old way: a snapshot of the shard, resumed."""

    def _scratch(self) -> UsageWindowLogic:
        return UsageWindowLogic(self.params, self._snapshot())


def encode(record: tuple) -> bytes:
    org, customer, code, txn, timestamp, value, user = record
    return json.dumps({"transaction_id": txn, "organization_id": org, "external_customer_id": customer,
                       "code": code, "timestamp": timestamp, "value": str(value),
                       "properties": {"user": user}}).encode()


class Twins:
    """One shard's logic built both ways, fed the same batches by the same intakes."""

    def __init__(self, params: UsageWindowParams, partitions: dict, start=None) -> None:
        self.params, self.partitions = params, partitions
        positions, old_state, new_state = start or ({}, None, None)
        self.next_offset = {p: positions.get(p, (0, None))[0] for p in partitions}
        self.intakes = {p: IntakeLogic("usage", p, len(partitions), 1, params.windows, 5_000,
                                       params.allowed_lateness_ms, positions.get(p, (0, None))[1],
                                       params.catalog)
                        for p in partitions}
        self.old = SnapshotScratch(params, _pickled(old_state))
        self.new = UsageWindowLogic(params, _pickled(new_state))

    def poll(self, partition: int, size: int) -> bool:
        """Feed up to ``size`` records of ``partition`` to both; True once it reported its end."""
        records, start = self.partitions[partition], self.next_offset[partition]
        chunk = records[start:start + size]
        at_end = start + len(chunk) >= len(records)
        batch = self.intakes[partition].process(
            [(start + i, None, encode(r), None) for i, r in enumerate(chunk)], at_end=at_end)
        self.next_offset[partition] = start + len(chunk)
        for shard_batch in batch.shard_batches()[1]:
            old_out, _ = self.old.on_batch([shard_batch])
            new_out, _ = self.new.on_batch([_pickled(shard_batch)])
            assert new_out == old_out
            assert state_of(self.new) == state_of(self.old)
        return at_end

    def snapshot(self) -> tuple:
        positions = {p: (self.next_offset[p], self.intakes[p].watermark.max_event_ms)
                     for p in self.partitions}
        return positions, self.old.snapshot(), self.new.snapshot()


def _pickled(value):
    return None if value is None else pickle.loads(pickle.dumps(value))


def state_of(logic: UsageWindowLogic) -> tuple:
    """What the shard holds, as plain values (not how its snapshots are packed)."""
    ready = logic.held.copy().take_through(END_OF_STREAM)
    held = [] if ready is None else list(zip(
        ready.times.tolist(), ready.partitions.tolist(), ready.offsets.tolist(),
        ready.digests.tolist(), [ready.keys[k] for k in ready.key_ids.tolist()],
        [ready.value(i) for i in range(len(ready))]))
    counted = logic.counted.copy().snapshot()
    return (logic.decided_through, logic.duplicates, logic.reported_late, logic.pending_late,
            sorted(logic._late_points), held, (counted.digests, counted.times, counted.earlier),
            [store_state(store) for store in logic._stores()])


def store_state(store) -> tuple:
    if isinstance(store, WindowStore):
        return store.owed_after, store._open
    if isinstance(store, AggregateWindowStore):
        return store.owed_after, store._open, store._carried
    assert isinstance(store, SessionStore)
    return store.owed_after, store._sessions, store._owed_tombstones


@st.composite
def scenario(draw):
    kind = draw(st.sampled_from(sorted(WINDOWS)))
    params = UsageWindowParams(
        WINDOWS[kind], draw(st.sampled_from([30_000, 90_000])), 1,
        draw(st.sampled_from([0, 10_000])), draw(st.sampled_from([(), ("hour", "day")])),
        load_catalog_text(CATALOG) if draw(st.booleans()) else load_catalog_text(""),
        emit_counted_usage=draw(st.booleans()))
    partitions = {}
    for p in range(draw(st.integers(1, 3))):
        records, t = [], draw(st.integers(0, 30_000))
        for _ in range(draw(st.integers(0, 14))):
            t = max(0, t + draw(st.sampled_from([0, 1_000, 4_000, 9_000, 25_000, -6_000, -40_000])))
            records.append(("o1", draw(st.sampled_from(["a", "b", "c"])), draw(st.sampled_from("xy")),
                            f"t{draw(st.integers(0, 9))}", t, draw(st.integers(0, 3)),
                            draw(st.sampled_from(["u1", "u2"]))))
        partitions[p] = records
    return params, partitions


def run_to_end(params: UsageWindowParams, partitions: dict, rng: random.Random, start=None) -> tuple:
    """Both logics through one stop-at-end run (random polls); the snapshot it ends with."""
    twins, done = Twins(params, partitions, start), set()
    while len(done) < len(partitions):
        partition = rng.choice([p for p in partitions if p not in done])
        if twins.poll(partition, rng.randrange(1, 6)):
            done.add(partition)
        if rng.random() < 0.2:
            start = twins.snapshot()
            twins = Twins(params, partitions, start)
    return twins.snapshot()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(scenario(), st.integers(0, 2**32), st.integers(0, 2))
def test_the_copied_scratch_flushes_as_the_snapshot_resume_did(case, seed, stops):
    params, partitions = case
    rng, snapshot = random.Random(seed), None
    cuts = {p: 0 for p in partitions}
    for _ in range(stops):  # earlier runs on what each partition held then, each resumed by the next
        cuts = {p: rng.randint(cuts[p], len(records)) for p, records in partitions.items()}
        snapshot = run_to_end(params, {p: r[:cuts[p]] for p, r in partitions.items()}, rng, snapshot)
    run_to_end(params, partitions, rng, snapshot)


def test_a_flush_with_every_kind_of_store_writes_rows():
    # The property above compares; this checks that it compares something.
    params = UsageWindowParams(TumblingWindows(20_000), 90_000, 1, 0, ("hour", "day"),
                               load_catalog_text(CATALOG), emit_counted_usage=True)
    twins = Twins(params, {0: [("o1", "a", "x", "t1", 1_000, 2, "u1"), ("o1", "a", "y", "t2", 2_000, 1, "u2")]})
    logic = twins.new
    flushed = []
    original = logic._provisional_flush
    logic._provisional_flush = lambda *args: flushed.append(original(*args)) or flushed[-1]
    twins.poll(0, 5)
    assert sorted({type(row).__name__ for row in flushed[0]}) == ["MetricRow", "WindowRow"]
    assert {getattr(row, "grain", None) for row in flushed[0]} == {"", "hour", "day", None}
