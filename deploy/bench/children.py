"""The benchmark's child programs (``python -m deploy.bench <role> ...``): the plain consumers,
the dedup memory probe and the steady producer of the latency run."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from deploy.bench.settings import PARTITIONS, START_MS, WINDOW_MS
from deploy.bench.values import event_time_ms, scaled_value


def _baseline_child(bootstrap: str, topic: str, out: str) -> int:
    """Read every record to EOF, aggregate count and exact sum per (org, code, minute)."""
    return _plain_consumer(bootstrap, topic, out, count_events=True)


def _read_ceiling_child(bootstrap: str, topic: str, out: str) -> int:
    """Read every record to EOF and touch its value, nothing more: the read ceiling."""
    return _plain_consumer(bootstrap, topic, out, count_events=False)


def _plain_consumer(bootstrap: str, topic: str, out: str, *, count_events: bool) -> int:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

    started = time.perf_counter()
    # librdkafka defaults but a short fetch wait; queued.min.messages stays at its default
    # (100000): 20000 caps Tansu reads at ~38k records/s (measured, see the report).
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "fetch.wait.max.ms": 50})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
    decode = json.JSONDecoder(parse_float=str).decode  # keep decimals exact
    aggregates: dict[tuple, list[int]] = {}
    pending, records, rejected = set(partitions), 0, 0
    while pending:
        for message in consumer.consume(1_000, 0.1):
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
                pending.discard(message.partition())
                continue
            records += 1
            if not count_events:
                message.value()
                continue
            try:
                event = decode(message.value().decode())
                key = (event["organization_id"], event["code"],
                       event_time_ms(event["timestamp"]) // WINDOW_MS)
                value = scaled_value(event.get("value"))
                aggregate = aggregates.get(key)  # TypeError: an id that is not a string
            except (ValueError, KeyError, TypeError, AttributeError):
                rejected += 1
                continue
            if aggregate is None:
                aggregates[key] = [1, value]
            else:
                aggregate[0] += 1
                aggregate[1] += value
    consumer.close()
    counted = sum(count for count, _ in aggregates.values())
    Path(out).write_text(json.dumps({"records": records, "counted": counted, "rejected": rejected,
                                     "keys": len(aggregates),
                                     "loop_seconds": round(time.perf_counter() - started, 3)}))
    return 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _dedup_child(ids: str, out: str) -> int:
    """RSS growth per id of the shard's counted copies (``state.counted.CountedCopies``) holding
    ``ids`` digests; tracemalloc as a cross-check.

    The store is filled the way the flow fills it: decisions on batches of 5,000 copies.
    """
    import gc
    import random
    import tracemalloc

    import numpy as np

    from state.counted import CountedCopies
    from state.dedup import transaction_digest

    n = int(ids)
    rng = random.Random(1)
    batch = 5_000

    def fill(store: CountedCopies) -> None:
        for start in range(0, n, batch):
            stop = min(n, start + batch)
            digests = np.array([transaction_digest("org_001", f"{rng.getrandbits(128):032x}")
                                for _ in range(start, stop)], dtype=np.int64)
            times = np.array([START_MS + i * 600_000 // n for i in range(start, stop)], dtype=np.int64)
            store.count(digests, times)

    gc.collect()
    before = _rss_bytes()
    store = CountedCopies(horizon_ms=86_400_000)
    fill(store)
    gc.collect()
    rss_growth = _rss_bytes() - before
    remembered = len(store)
    snapshot = store.snapshot()
    snapshot_bytes = len(snapshot.digests) + len(snapshot.times)
    del store, snapshot
    gc.collect()
    tracemalloc.start()
    store = CountedCopies(horizon_ms=86_400_000)
    fill(store)
    traced, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    Path(out).write_text(json.dumps({
        "ids": remembered, "rss_bytes_per_id": round(rss_growth / remembered, 1),
        "tracemalloc_bytes_per_id": round(traced / remembered, 1),
        "snapshot_bytes_per_id": round(snapshot_bytes / remembered, 1),
    }))
    return 0


def _produce_child(bootstrap: str, topic: str, rate: str, seconds: str, start_at_ms: str,
                   out: str) -> int:
    """Generate a steady stream whose event time is the wall clock from ``start_at_ms``; produce it."""
    from deploy.generator import generate, produce

    count, start = int(float(rate) * float(seconds)), int(start_at_ms)
    records = list(generate(count, seed=7, partitions=PARTITIONS, start_ms=start,
                            span_ms=int(float(seconds) * 1000), jitter_ms=500, duplicate_share=0.02,
                            malformed_share=0.001, very_late_share=0.0))
    late_ms = time.time() * 1000 - start
    if late_ms < 0:
        time.sleep(-late_ms / 1000)
    started_ms = time.time() * 1000
    kinds = produce(bootstrap, topic, records, rate=float(rate))
    Path(out).write_text(json.dumps({
        "start_at_ms": start, "end_at_ms": start + int(float(seconds) * 1000),
        "started_ms": started_ms, "finished_ms": time.time() * 1000,
        "started_late_ms": round(max(0.0, late_ms)), "kinds": kinds,
    }))
    return 0


CHILDREN = {"_baseline": _baseline_child, "_read_ceiling": _read_ceiling_child,
             "_dedup": _dedup_child, "_produce": _produce_child}
"""Child programs by role: ``python -m deploy.bench <role> <args...>``."""
