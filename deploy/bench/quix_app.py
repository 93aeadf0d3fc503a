"""Quix Streams' contender: run under ``.venv-quix/bin/python -m deploy.bench.quix_app``.

That venv has Quix Streams and its confluent-kafka, not the project's dependencies: this module
and what it imports (``deploy.bench.values``, through the package's stdlib-only imports) use the
standard library only.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from deploy.bench.settings import OUT_OF_ORDERNESS_MS, WINDOW_MS
from deploy.bench.values import SCALE, event_time_ms, scaled_value


def quix_child(bootstrap: str, topic: str, total: str, out: str, state_dir: str) -> int:
    """Quix Streams: tumbling 1-minute count + exact sum per key and code, stop after ``total``."""
    from quixstreams import Application
    from quixstreams.models.serializers.json import JSONDeserializer

    total_records = int(total)
    read, first_at = [0], []

    def loads(data: bytes) -> dict:  # {} for anything without a usable event time
        try:
            event = json.loads(data, parse_float=str)
            event["_ms"] = event_time_ms(event["timestamp"])
        except (ValueError, KeyError, TypeError):
            return {}
        return event

    def event_time(value, headers, timestamp, timestamp_type) -> int:
        return value.get("_ms", 0)  # a record without one is filtered before the window

    def count_read(value) -> None:
        if not read[0]:
            first_at.append(time.perf_counter())
        read[0] += 1
        if read[0] >= total_records:
            app.stop()

    def usage(value):  # [code, whole units, 10**-18 units]: Quix state holds 64-bit ints only
        try:
            code = value["code"]
            if type(code) is not str or type(value["organization_id"]) is not str:
                return None
            return [code, *divmod(scaled_value(value.get("value")), SCALE)]
        except (KeyError, ValueError, TypeError):
            return None

    def initial(value) -> dict:
        return {value[0]: [1, value[1], value[2]]}

    def add(aggregate: dict, value) -> dict:
        slot = aggregate.get(value[0])
        if slot is None:
            aggregate[value[0]] = [1, value[1], value[2]]
        else:
            slot[0] += 1
            slot[1] += value[1]
            slot[2] += value[2]
            if slot[2] >= SCALE:
                slot[1] += 1
                slot[2] -= SCALE
        return aggregate

    app = Application(broker_address=bootstrap, consumer_group=f"bench-quix-{uuid.uuid4().hex[:8]}",
                      auto_offset_reset="earliest", state_dir=state_dir, loglevel="WARNING",
                      consumer_extra_config={"session.timeout.ms": 6_000})
    source = app.topic(topic, value_deserializer=JSONDeserializer(loads=loads),
                       timestamp_extractor=event_time)
    sdf = app.dataframe(source)
    sdf = sdf.update(count_read)
    sdf = sdf.apply(usage).filter(lambda value: value is not None)
    sdf = sdf.tumbling_window(WINDOW_MS, grace_ms=OUT_OF_ORDERNESS_MS).reduce(add, initial).final()
    started = time.perf_counter()
    app.run(timeout=60)
    Path(out).write_text(json.dumps({
        "records": read[0], "loop_seconds": round(time.perf_counter() - started, 3),
        "first_record_after_s": round(first_at[0] - started, 3) if first_at else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(quix_child(*sys.argv[1:]))
