"""Dedup, watermarks and window closing, driven without Kafka."""

import copy
import pickle

import pytest

from operators.intake import IntakeLogic, shard_of
from operators.usage_windows import UsageShardSnapshot, UsageWindowLogic, UsageWindowParams
from state.dedup import transaction_digest
from state.records import ShardBatch, ShardEvent
from state.watermark import (END_OF_STREAM, NO_WATERMARK, FlowWatermark, PartitionWatermark,
                                 WatermarkRegression)
from state.window_kinds import SessionWindows, SlidingWindows, TumblingWindows
from state.windows import row_version

MINUTE = 60_000
SCALE = 10**18


def event(txn: str, ts: int, value: int = 1, org="org", cust="cust", code="api",
          seen: int = NO_WATERMARK, metrics=None) -> ShardEvent:
    return ShardEvent(transaction_digest(org, txn), org, cust, code, ts, value * SCALE, seen, 0, txn, metrics)


def make_logic(shards=1, horizon=86_400_000, resume=None) -> UsageWindowLogic:
    return UsageWindowLogic(UsageWindowParams(TumblingWindows(MINUTE), horizon, shards), resume)


# --- dedup -----------------------------------------------------------------

def test_digest_is_stable_and_separates_fields():
    assert transaction_digest("org", "t1") == transaction_digest("org", "t1")
    assert transaction_digest("org", "t1") != transaction_digest("or", "gt1")
    assert -(2**63) <= transaction_digest("a", "b") < 2**63


# --- watermarks --------------------------------------------------------------

def test_partition_watermark_is_max_event_time_minus_out_of_orderness():
    wm = PartitionWatermark(max_out_of_orderness_ms=10_000)
    assert wm.current == NO_WATERMARK
    for ts in (50_000, 40_000, 70_000, 60_000):
        wm.observe(ts)
    assert wm.current == 60_000


def test_flow_watermark_is_min_over_partitions_and_waits_for_all():
    flow = FlowWatermark()
    flow.report(0, 3, 100, at_end=False)
    flow.report(1, 3, 50, at_end=False)
    assert flow.current == NO_WATERMARK
    flow.report(2, 3, 80, at_end=False)
    assert flow.current == 50
    with pytest.raises(WatermarkRegression, match="recovery store is inconsistent"):
        flow.report(1, 3, 40, at_end=False)  # a source resumed from older state than the shard
    assert flow.current == 50
    for p, wm in enumerate((100, 50, 90)):
        flow.report(p, 3, wm, at_end=True)
    assert flow.closing == END_OF_STREAM
    assert flow.current == 50


def test_idle_partitions_stop_holding_the_watermark_back_until_they_send_again():
    flow = FlowWatermark()
    flow.report(0, 2, 500, at_end=False)
    flow.report(1, 2, 100, at_end=False)
    assert flow.current == 100
    flow.report(1, 2, 100, at_end=False, idle=True)
    assert flow.current == 500
    flow.report(0, 2, 600, at_end=False, idle=True)
    assert flow.current == 100  # all idle: the minimum again, nothing runs ahead
    flow.report(1, 2, 200, at_end=False)
    assert flow.current == 200


# --- windows ----------------------------------------------------------------

def test_tumbling_windows_are_epoch_aligned():
    windows = TumblingWindows(5 * MINUTE)
    assert windows.starts_for(7 * MINUTE + 1) == [5 * MINUTE]
    assert windows.last_end_for(5 * MINUTE) == 10 * MINUTE
    assert windows.last_end_for(10 * MINUTE - 1) == 10 * MINUTE


def test_window_closes_only_when_every_partition_passed_its_end():
    logic = make_logic()
    rows, _ = logic.on_batch([ShardBatch(0, 2, MINUTE + 5, False, [event("a", 1_000, 2)])])
    assert list(rows) == []  # partition 1 not heard from
    rows, _ = logic.on_batch([ShardBatch(1, 2, MINUTE - 1, False, [event("b", 59_999, 3)])])
    assert list(rows) == []  # partition 1 still before the end
    rows, _ = logic.on_batch([ShardBatch(1, 2, MINUTE, False, [])])
    assert [(r.window_start_ms, r.window_end_ms, r.event_count, r.total_scaled, r.version) for r in rows] == [
        (0, MINUTE, 2, 5 * SCALE, row_version(MINUTE))
    ]
    assert logic.usage.open_windows() == 0


def test_duplicates_across_partitions_count_once():
    logic = make_logic()
    logic.on_batch([ShardBatch(0, 2, 0, False, [event("a", 1_000, 7)])])
    logic.on_batch([ShardBatch(1, 2, 0, False, [event("a", 1_000, 7), event("b", 2_000, 1)])])
    rows, _ = logic.on_batch([ShardBatch(0, 2, MINUTE, True, []), ShardBatch(1, 2, MINUTE, True, [])])
    assert [(r.event_count, r.total_scaled) for r in rows] == [(2, 8 * SCALE)]
    assert logic.duplicates == 1


def test_end_of_input_flushes_but_keeps_window_correctable():
    logic = make_logic()
    rows, _ = logic.on_batch([ShardBatch(0, 1, 5_000, True, [event("a", 10_000, 1)])])
    assert [(r.event_count, r.version) for r in rows] == [(1, row_version(5_000, provisional=True))]
    # Restarted later with more input for the same window: the row is corrected.
    rows, _ = logic.on_batch([ShardBatch(0, 1, 70_000, False, [event("b", 20_000, 1)])])
    assert [(r.event_count, r.total_scaled, r.version) for r in rows] == [
        (2, 2 * SCALE, row_version(70_000))]
    rows, _ = logic.on_batch([ShardBatch(0, 1, 80_000, True, [])])
    assert list(rows) == []  # nothing new to say about a closed window


def test_event_for_a_forgotten_window_goes_to_the_late_table_not_a_stale_row():
    # Only possible when an idle partition comes back (IDLE_TIMEOUT): the shard
    # forgot windows its watermark had passed while the partition was silent.
    logic = make_logic()
    logic.on_batch([ShardBatch(0, 1, 2 * MINUTE, False, [event("a", 130_000)])])
    out, _ = logic.on_batch([ShardBatch(0, 1, 2 * MINUTE, False, [event("b", 1_000)], topic="usage")])
    assert [(r.transaction_id, r.reason, r.source_topic) for r in out] == [
        ("b", "window_closed_idle_partition", "usage")]


def test_shard_snapshot_round_trip_resumes_exactly():
    logic = make_logic()
    logic.on_batch([ShardBatch(0, 1, 0, False, [event("a", 1_000, 1), event("b", 2_000, 2)])])
    snapshot = pickle.loads(pickle.dumps(logic.snapshot()))
    assert isinstance(snapshot, UsageShardSnapshot)
    live_before = copy.deepcopy(snapshot)
    logic.on_batch([ShardBatch(0, 1, 0, False, [event("c", 3_000, 4)])])
    assert snapshot == live_before  # the snapshot did not move with the live state
    resumed = make_logic(resume=snapshot)
    resumed.on_batch([ShardBatch(0, 1, 0, False, [event("b", 2_000, 2), event("c", 3_000, 4)])])
    rows, _ = resumed.on_batch([ShardBatch(0, 1, END_OF_STREAM, True, [])])
    assert [(r.event_count, r.total_scaled) for r in rows] == [(3, 7 * SCALE)]
    assert resumed.duplicates == 1


def late_item(txn: str, ts: int, partition: int, offset: int) -> tuple:
    from state.records import LateRecord

    record = LateRecord("org", "cust", "api", txn, ts, SCALE, "window_closed", 0, "usage",
                        partition, offset, b"{}")
    return (ts - ts % MINUTE + MINUTE, transaction_digest("org", txn), record)


def test_late_events_wait_for_every_partition_then_skip_counted_copies():
    logic = make_logic(horizon=2 * MINUTE)  # a late copy waits for its window's end + the horizon
    # Partition 0 is ahead: its copy of "a" is late there, and "z" is late and new.
    out, _ = logic.on_batch([ShardBatch(0, 2, 3 * MINUTE, False, [],
                                        [late_item("a", 10_000, 0, 5), late_item("z", 11_000, 0, 6)])])
    assert list(out) == []  # partition 1 has not passed the window yet
    # Partition 1 still counts its on-time copy of "a", then passes the window + horizon.
    out, _ = logic.on_batch([ShardBatch(1, 2, 3 * MINUTE, False, [event("a", 10_000)])])
    late = [r for r in out if r.__class__.__name__ == "LateRecord"]
    rows = [r for r in out if r.__class__.__name__ == "WindowRow"]
    assert [r.transaction_id for r in late] == ["z"]
    assert [(r.event_count, r.total_scaled) for r in rows] == [(1, SCALE)]
    assert logic.duplicates == 1
    assert logic.pending_late == {}


def test_pending_late_events_survive_a_snapshot():
    logic = make_logic(horizon=2 * MINUTE)
    logic.on_batch([ShardBatch(0, 2, 3 * MINUTE, False, [], [late_item("z", 11_000, 0, 6)])])
    resumed = make_logic(horizon=2 * MINUTE, resume=pickle.loads(pickle.dumps(logic.snapshot())))
    out, _ = resumed.on_batch([ShardBatch(1, 2, 3 * MINUTE, False, [])])
    assert [r.transaction_id for r in out] == ["z"]


def test_a_resumed_run_does_not_inherit_the_last_runs_end_of_input():
    # Run 1 ended (every partition at its end). In run 2, partition 0 finishes first
    # while partition 1 has not re-read its new input yet: nothing may close early,
    # or the late copy of "a" would be released before partition 1's on-time original.
    logic = make_logic(horizon=2 * MINUTE)
    logic.on_batch([ShardBatch(0, 2, MINUTE, True, []), ShardBatch(1, 2, MINUTE, True, [])])
    resumed = make_logic(horizon=2 * MINUTE, resume=pickle.loads(pickle.dumps(logic.snapshot())))
    out, _ = resumed.on_batch([ShardBatch(0, 2, 5 * MINUTE, True, [], [late_item("a", 2 * MINUTE, 0, 9)])])
    assert list(out) == []
    out, _ = resumed.on_batch([ShardBatch(1, 2, 5 * MINUTE, True, [event("a", 2 * MINUTE)])])
    assert [(r.__class__.__name__, r.event_count) for r in out] == [("WindowRow", 1)]
    assert resumed.duplicates == 1


def test_resume_with_other_shard_count_fails_loudly():
    snapshot = make_logic(shards=4).snapshot()
    with pytest.raises(ValueError, match="shards"):
        make_logic(shards=8, resume=snapshot)


# --- intake -----------------------------------------------------------------

def raw(txn: str, ts: int, org="org") -> bytes:
    return (
        f'{{"transaction_id":"{txn}","organization_id":"{org}","external_customer_id":"c",'
        f'"code":"api","timestamp":{ts},"value":"1.25"}}'
    ).encode()


def test_intake_lateness_depends_only_on_its_own_partition():
    intake = IntakeLogic("usage", 0, 4, shards=3, windows=TumblingWindows(MINUTE),
                         max_out_of_orderness_ms=10_000)
    batch = intake.process([
        (0, b"k", raw("a", 200_000), []),
        (1, b"k", raw("b", 181_000), []),   # behind, but its window [180s,240s) is still open
        (2, b"k", raw("c", 119_999), []),   # window ended at 120s <= watermark 190s: late
        (3, b"k", b"{", [("h", b"v")]),
    ])
    assert batch.watermark == 190_000
    on_time = [e for events in batch.events_by_shard.values() for e in events]
    assert sorted(e.timestamp_ms for e in on_time) == [181_000, 200_000]
    late = [item for items in batch.late_by_shard.values() for item in items]
    assert [(due, r.source_offset, r.reason, r.watermark_ms) for due, _digest, r in late] == [
        (120_000, 2, "window_closed", 190_000)
    ]
    letter = batch.dead_letters[0]
    assert (letter.source_offset, letter.reason, letter.value) == (3, "malformed_json", b"{")
    headers = dict(letter.dlq_headers())
    assert headers["h"] == b"v" and headers["tallyflow.source.offset"] == b"3"
    keys, shard_batches = batch.shard_batches()
    assert keys == ["0", "1", "2"] and all(b.watermark == 190_000 for b in shard_batches)


def test_intake_resumes_with_its_watermark():
    intake = IntakeLogic("usage", 0, 1, 1, TumblingWindows(MINUTE), 0, max_event_ms=200_000)
    batch = intake.process([(10, None, raw("late", 100_000), None)])
    assert len(batch.late_by_shard[0]) == 1


def test_shard_of_is_stable():
    assert shard_of("org-42", 16) == shard_of("org-42", 16)
    assert {shard_of(f"org-{i}", 16) for i in range(200)} == set(range(16))


@pytest.mark.parametrize("kind", [TumblingWindows(60_000), SlidingWindows(60_000, 20_000),
                                  SlidingWindows(90_000, 90_000), SessionWindows(30_000)])
def test_the_intakes_inlined_window_end_is_last_end_for(kind):
    import random

    step, offset = kind.last_end_steps()
    rng = random.Random(3)
    for timestamp in [0, 1, 59_999, 60_000] + [rng.randrange(0, 2**42) for _ in range(2_000)]:
        assert timestamp - timestamp % step + offset == kind.last_end_for(timestamp)


def test_state_from_before_the_dedup_rule_is_refused_by_name():
    # A snapshot of the older shard logic: no decided_through, a DedupStore's snapshot.
    old = UsageShardSnapshot.__new__(UsageShardSnapshot)
    object.__setattr__(old, "__dict__", {
        "shards": 1, "watermark": FlowWatermark(), "forgotten_before": NO_WATERMARK,
        "dedup": None, "usage": None, "rollups": {}, "metrics": {}, "pending_late": (),
        "duplicates": 0, "metric_fingerprints": {}})
    with pytest.raises(ValueError, match="new recovery store"):
        make_logic(resume=pickle.loads(pickle.dumps(old)))


def test_held_events_of_a_snapshot_from_before_the_columns_are_carried_over():
    # Before the held columns a snapshot kept {due: [(time, partition, offset, digest, event)]}.
    import dataclasses

    events = [event("a", 1_000, 1), event("b", 2_000, 2), event("a", 3_000, 5, cust="other")]
    old_pending = {MINUTE: [(e.timestamp_ms, 0, e.offset, e.digest, e) for e in events]}
    logic = make_logic()
    logic.on_batch([ShardBatch(0, 1, 0, False, [])])
    old = dataclasses.replace(logic.snapshot(), pending=old_pending)
    resumed = make_logic(resume=pickle.loads(pickle.dumps(old)))
    rows, _ = resumed.on_batch([ShardBatch(0, 1, END_OF_STREAM, True, [event("c", 4_000, 4)])])
    # "a" of the other customer is a copy of the counted "a" (same organization and id)
    assert [(r.external_customer_id, r.event_count, r.total_scaled) for r in rows] == [("cust", 3, 7 * SCALE)]
    assert resumed.duplicates == 1
