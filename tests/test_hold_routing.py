"""The shard's routing of a batch into held buckets (``UsageWindowLogic._hold``, by arrays)
against the rule event by event: an event already due is written late, the others held in the
bucket of their due point, each bucket's in arrival order, buckets in the order first met."""

import numpy as np
from hypothesis import given, settings, strategies as st

from operators.usage_windows import UsageWindowLogic, UsageWindowParams
from state.records import ShardEvent
from state.window_kinds import SessionWindows, SlidingWindows, TumblingWindows

KINDS = st.sampled_from([TumblingWindows(60_000), TumblingWindows(500), SlidingWindows(60_000, 20_000),
                         SessionWindows(3_000)])


def held_the_plain_way(logic: UsageWindowLogic, partition: int, events: list, out: list) -> None:
    """The rule, one event at a time."""
    step, offset, granule = logic._due_step, logic._due_offset, logic.held.granule
    by_bucket: dict[int, list] = {}
    for event in events:
        due = event.timestamp_ms - event.timestamp_ms % step + offset
        if due <= logic.decided_through:
            out.append(logic._late_at_shard(partition, event, "window_closed_idle_partition",
                                            logic.decided_through))
        else:
            by_bucket.setdefault(due // granule, []).append(event)
    for key, bucket_events in by_bucket.items():
        logic.held.add(key, partition, bucket_events)


@settings(max_examples=500, deadline=None)
@given(KINDS, st.lists(st.tuples(st.integers(0, 400_000), st.integers(0, 3)), max_size=40),
       st.integers(-1, 400_000), st.integers(0, 3), st.sampled_from([None, 2_000, 70_000]))
def test_a_batch_is_held_as_the_rule_holds_it_event_by_event(kind, drawn, decided, partition, span):
    """``span``: the batch's times within so many ms around 2 minutes (one bucket or two), or anywhere."""
    if span is not None:
        drawn = [(120_000 - span // 2 + timestamp % span, customer) for timestamp, customer in drawn]
    events = [ShardEvent(i, "o", f"c{customer}", "x", timestamp, 10**18 + i, 0, i, f"t{i}", None)
              for i, (timestamp, customer) in enumerate(drawn)]
    logics = [UsageWindowLogic(UsageWindowParams(kind, 86_400_000, 1)) for _ in range(2)]
    outs: list[list] = [[], []]
    for logic in logics:
        logic.decided_through = decided
    logics[0]._hold(partition, events, outs[0])
    held_the_plain_way(logics[1], partition, events, outs[1])
    assert outs[0] == outs[1]
    fast, plain = (logic.held for logic in logics)
    assert list(fast._buckets) == list(plain._buckets) and len(fast) == len(plain)
    for key in fast._buckets:
        assert fast._buckets[key].column("offsets").tolist() == plain._buckets[key].column("offsets").tolist()
    taken = [held.take_through(10**9) for held in (fast, plain)]
    if taken[0] is None:
        assert taken[1] is None
        return
    for column in ("times", "partitions", "offsets", "digests", "wholes", "fractions"):
        assert np.array_equal(getattr(taken[0], column), getattr(taken[1], column))
    assert [taken[0].keys[k] for k in taken[0].key_ids] == [taken[1].keys[k] for k in taken[1].key_ids]
