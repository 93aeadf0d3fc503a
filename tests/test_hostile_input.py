"""Hostile input at the intake (issue 12): every message ends valid, late or dead-lettered.

Each test here is a regression for one way a producer could stop the flow or
blur two transactions; the expected values are written out by hand.
"""

import json

from operators.intake import IntakeLogic
from operators.windows import TumblingWindows
from state.dedup import transaction_digest

MINUTE = 60_000


def event(org="org", txn="t1", timestamp=1_000_000, **extra) -> bytes:
    return json.dumps({"transaction_id": txn, "organization_id": org, "external_customer_id": "c",
                       "code": "api_calls", "timestamp": timestamp, **extra}).encode()


def intake(**options) -> IntakeLogic:
    return IntakeLogic("usage", 0, 1, shards=1, windows=TumblingWindows(MINUTE),
                       max_out_of_orderness_ms=0, **options)


def test_digest_separates_ids_that_contain_the_old_separator():
    assert transaction_digest("a\x1fb", "c") != transaction_digest("a", "b\x1fc")
    assert transaction_digest("a:1", "2") != transaction_digest("a", "1:2")
    assert transaction_digest("1:a", "") != transaction_digest("", "1:a")


def test_intake_digest_is_transaction_digest_for_any_characters():
    pairs = [("a\x1fb", "c"), ("a", "b\x1fc"), ("1:", "x"), ("é%3A", "\u2028"), ("org", "t1")]
    records = [(i, None, event(org, txn), None) for i, (org, txn) in enumerate(pairs)]
    batch = intake().process(records)
    digests = [e[0] for e in batch.events_by_shard[0]]
    assert digests == [transaction_digest(org, txn) for org, txn in pairs]
    assert len(set(digests)) == len(pairs)
