"""HeldEvents against a plain list of events: order, exact values, keys, kept events, snapshots."""

import pickle

import numpy as np
from hypothesis import given, settings, strategies as st

from state.held import VALUE_UNIT, HeldEvents, _decision_order
from state.records import ShardEvent

VALUES = st.one_of(st.integers(-10**20, 10**20), st.integers(-(10**38) + 1, 10**38 - 1),
                   st.sampled_from([0, 1, -1, 10**18, 2**63 * 10**18, -(2**63) * 10**18 - 1]))
EVENT = st.tuples(st.integers(0, 3_000), st.integers(0, 2), st.integers(0, 2), VALUES, st.booleans(),
                  st.integers(0, 4))  # time, org, customer, value, has metric values, digest
STEPS = st.sampled_from([(1, 700), (1, 0), (250, 250), (600, 1_200), (1_000, 1_000), (3_000, 3_500)])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(EVENT, max_size=12), max_size=10), st.booleans(), STEPS, STEPS,
       st.integers(0, 2**32))
def test_held_events_come_out_when_due_in_decision_order_with_exact_values(
        batches, per_event, steps, resumed_steps, seed):
    """The model: a list of events; due at ``t - t % step + offset``; taken in (time, partition,
    offset) order. A resume may come with other windows or lateness (another step and offset)."""
    rng = np.random.default_rng(seed)
    (step, offset), held, model, kafka_offset = steps, HeldEvents(per_event, *steps), [], 0
    for batch in batches:
        partition = int(rng.integers(0, 3))
        by_bucket: dict[int, list] = {}
        for timestamp, org, customer, value, has_metrics, digest in batch:
            kafka_offset += 1
            txn = f"tx-é\ud800{kafka_offset}"[:kafka_offset % 9]  # empty, non-ASCII, a lone surrogate
            event = ShardEvent(digest, f"org{org}", f"cust{customer}", "code", timestamp, value, -5,
                               kafka_offset, txn, [(0, (), 1)] if has_metrics else None)
            by_bucket.setdefault(held.bucket_of(timestamp - timestamp % step + offset), []).append(event)
            model.append((partition, event))
        for key, events in by_bucket.items():
            held.add(key, partition, events)
        if rng.random() < 0.3:
            if rng.random() < 0.3:
                step, offset = resumed_steps
            held = HeldEvents(per_event, step, offset, pickle.loads(pickle.dumps(held.snapshot())))
        if rng.random() < 0.5:
            through = int(rng.integers(-1, 7_000))
            due = [e.timestamp_ms - e.timestamp_ms % step + offset <= through for _p, e in model]
            taken = sorted((e.timestamp_ms, p, e.offset, e) for (p, e), d in zip(model, due) if d)
            model = [entry for entry, d in zip(model, due) if not d]
            check_ready(held.take_through(through), taken, per_event)
        assert len(held) == len(model)
    taken = sorted((e.timestamp_ms, p, e.offset, e) for p, e in model)
    check_ready(held.take_through(10**6), taken, per_event)
    assert not held and held.take_through(10**7) is None


def check_ready(ready, taken: list, per_event: bool) -> None:
    if not taken:
        assert ready is None
        return
    events = [e for *_, e in taken]
    assert ready.times.tolist() == [t for t, *_ in taken]
    assert ready.partitions.tolist() == [p for _t, p, *_ in taken]
    assert ready.offsets.tolist() == [e.offset for e in events]
    assert ready.digests.tolist() == [e.digest for e in events]
    assert [ready.value(i) for i in range(len(events))] == [e.value_scaled for e in events]
    assert [ready.keys[k] for k in ready.key_ids.tolist()] == \
        [(e.organization_id, e.external_customer_id, e.code) for e in events]
    used = set(ready.key_ids.tolist())  # one number a key (decisions group by number), whichever bucket held it
    assert len({ready.keys[k] for k in used}) == len(used)
    kept = {i: e for i, e in enumerate(events) if e.metric_values}
    assert ready.events == kept and list(ready.events) == sorted(kept)
    if per_event:
        assert [ready.event(i) for i in range(len(events))] == events
        assert ready.rebuilt(np.arange(len(events) - 1, -1, -1)) == events[::-1]
    # sums per key over every other event, exactly
    positions = np.arange(0, len(events), 2)
    positions = positions[np.argsort(ready.key_ids[positions], kind="stable")]
    expected: dict[int, int] = {}
    for i in positions.tolist():
        key_id = int(ready.key_ids[i])
        expected[key_id] = expected.get(key_id, 0) + events[i].value_scaled
    key_ids = ready.key_ids[positions]
    heads = np.flatnonzero(np.concatenate(([True], key_ids[1:] != key_ids[:-1]))) if len(positions) \
        else np.empty(0, dtype=np.int64)
    if len(positions):
        assert run_totals(*ready.run_parts(positions, heads)) == list(expected.values())


def run_totals(wholes, highs, lows, wide) -> list[int]:
    """The exact sums ``Ready.run_parts`` gave in parts."""
    return [int(whole) * VALUE_UNIT + int(high) * 10**9 + int(low) + wide.get(run, 0)
            for run, (whole, high, low) in enumerate(zip(wholes, highs.tolist(), lows.tolist()))]


def test_a_snapshot_holds_columns_not_events():
    held = HeldEvents(per_event=False, step=60_000, offset=60_000)
    events = [ShardEvent(i, "org", "customer", "api_calls", 1_000 + i, 15 * 10**17, 0, i, f"tx-{i:020d}", None)
              for i in range(1_000)]
    held.add(held.bucket_of(60_000), 0, events)
    packed = pickle.dumps(held.snapshot())
    assert len(packed) < 60 * len(events), len(packed)  # 7 columns of 8 or 4 bytes; keys once
    assert HeldEvents(False, 60_000, 60_000, pickle.loads(packed)).take_through(60_000).times.tolist() == \
        [1_000 + i for i in range(1_000)]


def test_a_key_held_in_several_buckets_has_one_number_when_taken_together_and_after_a_resume():
    """Each bucket numbers its own keys: a take of several buckets, and a snapshot (which lists
    every bucket's keys), still give one number a key."""
    held = HeldEvents(per_event=False, step=60_000, offset=60_000)
    for minute in range(3):
        held.add(held.bucket_of((minute + 1) * 60_000), minute % 2, [
            ShardEvent(minute, "org", customer, "api_calls", minute * 60_000 + 5, 10**18, 0, minute, "t", None)
            for customer in ("a", "b", "a")])
    snapshot = pickle.loads(pickle.dumps(held.snapshot()))
    assert len(snapshot.keys) == 6  # two keys in each of three buckets
    for holder in (held, HeldEvents(False, 60_000, 60_000, snapshot)):
        ready = holder.take_through(180_000)
        assert sorted(ready.keys[k] for k in set(ready.key_ids.tolist())) == \
            [("org", "a", "api_calls"), ("org", "b", "api_calls")]
        assert [ready.keys[k][1] for k in ready.key_ids.tolist()] == ["a", "b", "a"] * 3


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.one_of(st.integers(0, 70_000), st.integers(-(2**63), 2**63 - 1)),
                          st.integers(0, 3), st.one_of(st.integers(0, 50), st.integers(0, 2**42), st.integers(0, 2**62))),
                max_size=60),
       st.integers(0, 2**40))
def test_the_decision_order_is_lexsorts(rows, base):
    """Packed in one integer where it fits (with or without the arrival position), else lexsort:
    always (time, partition, offset), equal ones in arrival order."""
    times = np.array([base + t if base + t < 2**63 else t for t, _p, _o in rows], dtype=np.int64)
    partitions = np.array([p for _t, p, _o in rows], dtype=np.int32)
    offsets = np.array([o for _t, _p, o in rows], dtype=np.int64)
    assert _decision_order(times, partitions, offsets).tolist() == \
        np.lexsort((offsets, partitions, times)).tolist()
    repeated = np.repeat(np.arange(len(rows)), 3)  # equal triples: arrival order
    assert _decision_order(times[repeated], partitions[repeated], offsets[repeated]).tolist() == \
        np.lexsort((offsets[repeated], partitions[repeated], times[repeated])).tolist()
