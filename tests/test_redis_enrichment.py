"""Customer attributes from Redis on ``usage_aggregates`` rows, through a bounded TTL cache.

Real redis-server (the test's own), real ClickHouse engine, real broker and flow.
"""

from __future__ import annotations

import time

import pyarrow as pa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.broker import ensure_topic
from deploy.generator import generate, produce
from deploy.runner import run_flow
from sinks.clickhouse_backend import connect
from sinks.enrichment import CustomerAttributes, customer_key, customer_names
from sinks.schema import USAGE_AGGREGATES, ensure_schema
from support.flow import flow_env, read_output
from support.kafka import read_all, unique_topic
from support.redis import redis_server  # noqa: F401
from recovery.reconcile import diff, recompute

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def lookups_served(client) -> int:
    """How many HMGET and EXISTS commands the server has answered so far."""
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("hmget", "exists"))


def scripts_run(client) -> int:
    """How many scripts (EVAL or EVALSHA) the server has run so far."""
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha"))


def test_lookups_are_pipelined_cached_with_a_ttl_and_count_unknown_customers(redis_server):
    client = redis_server.client()
    client.hset(customer_key("o", "known"), mapping={"plan": "pro", "region": "eu"})
    client.hset(customer_key("o", "no_plan"), mapping={"region": "us"})
    clock = FakeClock()
    attributes = CustomerAttributes(redis_server.url, ("plan", "region"), ttl_ms=60_000, clock=clock)
    customers = [("o", "known"), ("o", "no_plan"), ("o", "nobody"), ("o", "known")]

    before, scripts_before = lookups_served(client), scripts_run(client)
    assert attributes.lookup(customers) == {
        ("o", "known"): ("pro", "eu"), ("o", "no_plan"): ("", "us"), ("o", "nobody"): ("", "")}
    # EXISTS per distinct customer, HMGET per existing hash, all in one script call
    assert lookups_served(client) - before == 5
    assert scripts_run(client) - scripts_before == 1
    assert attributes.stats == {"fetched": 2, "unknown": 1}

    client.hset(customer_key("o", "known"), "plan", "enterprise")
    clock.now += 59
    before = lookups_served(client)
    assert attributes.lookup(customers)[("o", "known")] == ("pro", "eu")  # cached
    assert lookups_served(client) == before
    clock.now += 2
    assert attributes.lookup([("o", "known")])[("o", "known")] == ("enterprise", "eu")
    attributes.close()


def test_redis_down_falls_back_to_cached_or_empty_and_recovers(redis_server):
    client = redis_server.client()
    client.hset(customer_key("o", "known"), "plan", "pro")
    clock = FakeClock()
    attributes = CustomerAttributes(redis_server.url, ("plan",), ttl_ms=1_000, clock=clock)
    assert attributes.lookup([("o", "known")]) == {("o", "known"): ("pro",)}

    redis_server.stop()
    clock.now += 5  # expired: Redis is asked, fails, the stale value is used
    started = time.monotonic()
    assert attributes.lookup([("o", "known"), ("o", "new")]) == {
        ("o", "known"): ("pro",), ("o", "new"): ("",)}
    for _ in range(50):  # the breaker is open: no further attempts, no waiting
        attributes.lookup([("o", "new")])
    assert time.monotonic() - started < 1.0
    assert attributes.stats["stale"] == 1 and attributes.stats["unavailable"] == 51

    redis_server.start()
    redis_server.client().hset(customer_key("o", "new"), "plan", "starter")
    clock.now += 11  # past the longest backoff
    assert attributes.lookup([("o", "new")]) == {("o", "new"): ("starter",)}
    attributes.close()


def test_cache_keeps_the_newer_half_when_full_and_fetches_the_evicted_again(redis_server):
    client = redis_server.client()
    clock = FakeClock()
    attributes = CustomerAttributes(redis_server.url, ("plan",), ttl_ms=60_000, max_entries=10,
                                    clock=clock)
    first = [("o", f"a{i}") for i in range(6)]
    second = [("o", f"b{i}") for i in range(6)]
    attributes.lookup(first)
    clock.now += 1
    attributes.lookup(second)  # 12 > 10: the 5 fetched last stay, all of them from the second call
    assert len(attributes._cache) == 5
    assert set(attributes._cache) < {f"o:{customer}" for _, customer in second}

    kept = [("o", name.split(":")[1]) for name in attributes._cache]
    before = lookups_served(client)
    attributes.lookup(kept)  # hits: nothing asked of Redis
    assert lookups_served(client) == before and attributes.stats["hit"] == 5
    client.hset(customer_key("o", "a0"), "plan", "pro")
    assert attributes.lookup(first[:1]) == {("o", "a0"): ("pro",)}  # evicted: fetched again
    assert lookups_served(client) > before
    attributes.close()


def test_a_customer_fetched_again_after_its_ttl_moves_to_the_end_and_is_served_until_then(redis_server):
    client = redis_server.client()
    clock = FakeClock()
    attributes = CustomerAttributes(redis_server.url, ("plan",), ttl_ms=10_000, clock=clock)
    attributes.lookup([("o", "early")])
    clock.now += 5
    attributes.lookup([("o", "late")])
    client.hset(customer_key("o", "early"), "plan", "pro")
    clock.now += 5  # "early" expires now (a TTL is up at its very end), "late" does not
    assert attributes.lookup([("o", "early"), ("o", "late")]) == {
        ("o", "early"): ("pro",), ("o", "late"): ("",)}
    assert list(attributes._cache) == ["o:late", "o:early"]  # the order of expiry
    assert attributes.stats == {"unknown": 2, "fetched": 1, "hit": 1}
    attributes.close()


def test_the_cache_is_bounded_whatever_one_lookup_asks(redis_server):
    attributes = CustomerAttributes(redis_server.url, ("plan",), ttl_ms=60_000, max_entries=10)
    assert attributes.lookup([("o", str(i)) for i in range(25)]) == {("o", str(i)): ("",) for i in range(25)}
    assert len(attributes._cache) == 5
    attributes.close()


def test_only_customers_with_a_hash_come_back_and_only_those_with_attributes_are_present(redis_server):
    """The sparse reply: positions and values of the few customers with a hash, a field the
    hash lacks read as "", bytes that are not UTF-8 as U+FFFD; a hash with none of the fields
    is fetched (it exists) but gives no attributes."""
    client = redis_server.client()
    organizations = ["o"] * 3_000 + ["p:x"]
    customers = [f"c{i}" for i in range(3_000)] + ["100%"]
    client.hset(customer_key("o", "c7"), mapping={"plan": b"caf\xc3\xa9", "other": "1"})
    client.hset(customer_key("o", "c1500"), mapping={"region": b"\xff\"x"})
    client.hset(customer_key("o", "c2999"), mapping={"other": "only"})
    client.hset(customer_key("p:x", "100%"), mapping={"plan": "pro", "region": "eu"})
    attributes = CustomerAttributes(redis_server.url, ("plan", "region"), ttl_ms=60_000)
    names = customer_names(organizations, customers)
    assert names[-1] == "p%3Ax:100%25"
    assert attributes._read(names) == {7: ("café", ""), 1500: ("", "\ufffd\"x"), 2999: ("", ""),
                                       3000: ("pro", "eu")}
    present = attributes.present(organizations, customers)
    assert present == {7: ("café", ""), 1500: ("", "\ufffd\"x"), 3000: ("pro", "eu")}
    assert attributes.stats == {"fetched": 4, "unknown": 2_997}
    assert attributes.present(organizations, customers) == present  # from the cache, as sparse
    assert attributes.stats["hit"] == 3_001
    assert attributes.lookup([("o", "c2999"), ("o", "c7")]) == {("o", "c2999"): ("", ""),
                                                               ("o", "c7"): ("café", "")}
    attributes.close()


def test_flow_writes_plan_per_row_and_migrates_an_existing_table(kafka_broker, chdb_url, redis_server):
    bootstrap = kafka_broker.bootstrap
    topic, dlq = unique_topic("usage"), unique_topic("dlq")
    ensure_topic(bootstrap, topic, 4)
    ensure_topic(bootstrap, dlq, 1)
    records = list(generate(8_000, seed=5, partitions=4, start_ms=START_MS, span_ms=300_000))
    produce(bootstrap, topic, records)

    # A table from before the enrichment columns, with a row in it.
    backend = connect(chdb_url)
    try:
        ensure_schema(backend)
        backend.command(f"INSERT INTO {USAGE_AGGREGATES} (organization_id, external_customer_id, "
                        "code, window_start, window_end, event_count, total_value, version) "
                        "VALUES ('old', 'row', 'x', 0, 60000, 1, 1, 1)")
    finally:
        backend.close()

    plans = {}
    client = redis_server.client()
    for org in range(1, 6):
        for customer in range(1, 21, 2):  # every other customer is known; the rest are not
            org_id, customer_id = f"org_{org:03d}", f"cus_{org:03d}_{customer:04d}"
            plans[(org_id, customer_id)] = ("free", "pro", "enterprise")[customer % 3]
            client.hset(customer_key(org_id, customer_id),
                        mapping={"plan": plans[(org_id, customer_id)], "other": "x"})

    run_flow(flow_env(bootstrap, topic, dlq, chdb_url, TALLYFLOW_SHARDS="4",
                      REDIS_URL=redis_server.url, ENRICH_FIELDS="plan"), timeout=120)

    backend = connect(chdb_url)
    try:
        _, rows = backend.query(f"SELECT organization_id, external_customer_id, plan "
                                f"FROM {USAGE_AGGREGATES} FINAL")
    finally:
        backend.close()
    assert ("old", "row", "") in rows
    flow_rows = [r for r in rows if r[0] != "old"]
    assert {plan for _o, _c, plan in flow_rows} == {"", "free", "pro", "enterprise"}
    for org, customer, plan in flow_rows:
        assert plan == plans.get((org, customer), ""), (org, customer)

    # Enrichment changes nothing else: the totals are still exact.
    raw = [(m.partition(), m.offset(), m.value()) for m in read_all(bootstrap, topic)]
    expected = recompute(raw, window_size_ms=60_000, max_out_of_orderness_ms=10_000)
    actual = {k: v for k, v in read_output(chdb_url).aggregates.items() if k[0] != "old"}
    assert diff(expected.aggregates, actual) == []


def reference_attributes(client, customer: tuple[str, str], fields: tuple[str, ...]):
    """What one customer's lookup must give, read command by command: None without a hash."""
    def part(text: str) -> str:
        return "".join(f"%{ord(c):02X}" if c in "%:" or ord(c) < 0x20 or ord(c) == 0x7F else c
                       for c in text)
    key = ":".join(["tallyflow", "customer", *map(part, customer)])
    if not client.exists(key):
        return None
    return tuple("" if v is None else v.decode("utf-8", "replace") for v in client.hmget(key, fields))


awkward_ids = st.text(st.characters(codec="utf-8", blacklist_categories=("Cs",)), min_size=1, max_size=6)
awkward_values = st.binary(max_size=12) | st.text(max_size=8).map(str.encode) | st.sampled_from(
    [b"", b'"', b"\\", b"/", b"\n\t\x00", b"\xe2\x82", b"caf\xc3\xa9", b"\xff\"x", b"null"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.tuples(awkward_ids, awkward_ids),
                       st.none() | st.dictionaries(st.sampled_from(["plan", "region", "x"]),
                                                   awkward_values, max_size=3),
                       min_size=1, max_size=12))
def test_lookups_read_what_the_hashes_hold_byte_for_byte(redis_server, customers):
    """Differential: the one-JSON-argument script answers what EXISTS and HMGET give, command by
    command, for any ids and any bytes in the values (not UTF-8: U+FFFD, as before): the
    customers that have a hash, by position."""
    client = redis_server.client()
    client.flushall()
    for customer, attributes in customers.items():
        if attributes is not None:
            client.hset(customer_key(*customer), mapping=attributes or {"other": "1"})
    fields = ("plan", "region")
    attributes = CustomerAttributes(redis_server.url, fields, ttl_ms=60_000)
    organizations, ids = [o for o, _ in customers], [c for _, c in customers]
    names = customer_names(organizations, ids)
    assert customer_names(pa.array(organizations), pa.array(ids)) == names  # the sink's columns
    assert customer_names(pa.array(["x", *organizations])[1:], pa.array(["y", *ids])[1:]) == names
    try:
        found = attributes._read(names)
        expected = {at: reference_attributes(client, c, fields) for at, c in enumerate(customers)}
        assert found == {at: values for at, values in expected.items() if values is not None}
        assert attributes.lookup(customers) == {c: expected[at] or ("", "") for at, c in enumerate(customers)}
    finally:
        attributes.close()


def test_lookups_of_many_customers_span_several_script_calls(redis_server):
    client = redis_server.client()
    customers = [("o", f"c{i}") for i in range(2_500)]
    for org, customer in customers[::7]:
        client.hset(customer_key(org, customer), "plan", f"p{customer}")
    attributes = CustomerAttributes(redis_server.url, ("plan",), ttl_ms=60_000)
    scripts_before = scripts_run(client)
    found = attributes.lookup(customers)
    assert scripts_run(client) - scripts_before == 3
    assert found == {c: (f"p{c[1]}",) if i % 7 == 0 else ("",) for i, c in enumerate(customers)}
    assert attributes.stats == {"fetched": 358, "unknown": 2_142}
    attributes.close()
