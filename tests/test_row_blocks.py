"""The flow's shard logic (``RowBatchingLogic``) sends a window's first rows as one
``WindowRowBlock`` (columns) and the other rows in ``WindowRows`` batches; the logic the
tests drive (``UsageWindowLogic``) sends one ``WindowRow`` per row. Whatever the input, the
two write the same rows, send the same other items in the same order, and keep the same state.

``TALLYFLOW_PROPERTY_EXAMPLES`` sets the number of examples (default 200).
"""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings, strategies as st

from operators.intake import IntakeLogic
from operators.usage_windows import RowBatchingLogic, UsageWindowLogic, UsageWindowParams
from state.records import WindowRow, WindowRowBlock, WindowRows
from state.window_kinds import TumblingWindows
from test_provisional_flush import EXAMPLES, _pickled, encode, scenario, state_of


def split(out: list) -> tuple[Counter, list]:
    """The rows an output holds (blocks and batches opened), and the other items in order."""
    rows, rest = Counter(), []
    for item in out:
        if item.__class__ is WindowRow:
            rows[item] += 1
        elif item.__class__ is WindowRows:
            rows.update(item.rows)
        elif item.__class__ is WindowRowBlock:
            rows.update(item.rows())
        else:
            rest.append(item)
    return rows, rest


def run(params: UsageWindowParams, partitions: dict, rng: random.Random) -> int:
    """Feed both logics the same batches, stop-at-end, with snapshots resumed along the way;
    the number of blocks the batching one sent."""
    intakes = {p: IntakeLogic("usage", p, len(partitions), 1, params.windows, 5_000,
                              params.allowed_lateness_ms, None, params.catalog) for p in partitions}
    plain, batching = UsageWindowLogic(params), RowBatchingLogic(params)
    offsets, blocks = {p: 0 for p in partitions}, 0
    while any(offsets[p] <= len(records) - 1 or offsets[p] == 0 for p, records in partitions.items()):
        partition = rng.choice(sorted(partitions))
        records, start = partitions[partition], offsets[partition]
        chunk = records[start:start + rng.randrange(1, 6)]
        batch = intakes[partition].process([(start + i, None, encode(r), None) for i, r in enumerate(chunk)],
                                           at_end=start + len(chunk) >= len(records))
        offsets[partition] = start + len(chunk) + (0 if chunk else 1)
        for shard_batch in batch.shard_batches()[1]:
            plain_out, _ = plain.on_batch([shard_batch])
            batching_out, _ = batching.on_batch([_pickled(shard_batch)])
            assert split(batching_out) == split(plain_out)
            assert state_of(batching) == state_of(plain)
            blocks += sum(item.__class__ is WindowRowBlock for item in batching_out)
        if rng.random() < 0.2:  # both resume from their snapshots
            plain = UsageWindowLogic(params, _pickled(plain.snapshot()))
            batching = RowBatchingLogic(params, _pickled(batching.snapshot()))
    return blocks


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(scenario(), st.integers(0, 2**32))
def test_blocks_and_batches_write_what_single_rows_write(case, seed):
    params, partitions = case
    run(params, partitions, random.Random(seed))


def test_first_emissions_leave_as_blocks():
    # The property above compares; this checks that blocks are among what it compared.
    params = UsageWindowParams(TumblingWindows(20_000), 90_000, 1, 0, ("hour", "day"))
    records = [("o1", c, "x", f"t{i}", 1_000 * i, 1, "u") for i, c in enumerate("abcabc")]
    assert run(params, {0: records}, random.Random(1)) >= 3  # a minute, an hour and a day window
