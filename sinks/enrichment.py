"""Customer attributes from Redis for aggregate rows: a bounded TTL cache over pipelined lookups.

Attributes live in Redis hashes ``tallyflow:customer:{organization_id}:{external_customer_id}``
(each id percent-encoded as ``sinks.redis_client.key_part`` does: ``%`` -> ``%25``, ``:`` ->
``%3A``, control characters -> ``%XX``, so ``("acme", "eu:42")`` and ``("acme:eu", "42")`` never
share a hash);
:class:`CustomerAttributes` returns the configured fields of many customers at once. Customers
cached for less than the TTL cost nothing; the others cost one pipelined round trip per call
(one script per 1,000 customers: ``EXISTS``, then ``HMGET`` of a hash that exists), never one
per event: the ClickHouse sink calls it once per flush with the distinct customers of the rows
it writes. Each script call takes the key names as one JSON array and answers one JSON array,
so neither side packs or parses a reply per customer (that cost ~7 us of client CPU a
customer); a standalone Redis (the only kind ``connect`` makes) allows key names in arguments,
a Redis Cluster would not.

No guarantee of freshness is needed for exactness: attributes are not part of any row key, so
a row written again with changed attributes replaces its twin with the same totals.

Redis down or slow never stops the caller: the lookup falls back to the cached attributes even
when expired (``stale``), or to empty strings for customers never seen (``unavailable``), logs
a warning, and skips Redis until a backoff delay has passed (see ``sinks.redis_client``).

    >>> attributes = CustomerAttributes("redis://127.0.0.1:1/0", ("plan",), ttl_ms=60_000)
    >>> attributes.lookup([("org", "cust")])   # nothing listens on port 1: empty, not an error
    {('org', 'cust'): ('',)}
    >>> attributes.stats["unavailable"]
    1
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from typing import Callable, Iterable

import msgspec

from operators.telemetry import metrics
from sinks.redis_client import REDIS_ERRORS, Breaker, connect, plain, redis_key

log = logging.getLogger(__name__)

CUSTOMER_PREFIX = "tallyflow:customer"
KEYS_PER_CALL = 1_000
_READ_SCRIPT = """
local keys = cjson.decode(ARGV[1])
local fields = {unpack(ARGV, 2)}
local out = {}
for i, key in ipairs(keys) do
  if redis.call('EXISTS', key) == 1 then
    out[i] = redis.call('HMGET', key, unpack(fields))
  else
    out[i] = false
  end
end
return cjson.encode(out)
"""  # ARGV[1]: JSON array of customer hashes; ARGV[2:]: the fields. Answers a JSON array: per
# key, its values (false where a field is absent), or false when there is no hash.
_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


Customer = tuple  # (organization_id, external_customer_id)


def customer_key(organization_id: str, external_customer_id: str) -> str:
    """The Redis hash holding a customer's attributes.

    >>> customer_key("org_1", "cus_9"), customer_key("acme:eu", "42%")
    ('tallyflow:customer:org_1:cus_9', 'tallyflow:customer:acme%3Aeu:42%25')
    """
    if plain(organization_id + external_customer_id):  # nearly always: nothing to encode
        return f"{CUSTOMER_PREFIX}:{organization_id}:{external_customer_id}"
    return redis_key(CUSTOMER_PREFIX, organization_id, external_customer_id)


class CustomerAttributes:
    """Fields ``fields`` of customers' hashes, through a cache of ``max_entries`` for ``ttl_ms``.

    Unknown customers are cached too (as empty attributes), so a customer without a hash is
    looked up at most once per TTL. ``stats`` counts outcomes (also exported to Prometheus).
    """

    def __init__(self, url: str, fields: tuple[str, ...], ttl_ms: int, *,
                 max_entries: int = 100_000, timeout_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fields = tuple(fields)
        self.ttl_s = ttl_ms / 1000
        self.max_entries = max_entries
        self.clock = clock
        self.stats: Counter[str] = Counter()
        self._empty = ("",) * len(self.fields)
        self._cache: OrderedDict[Customer, tuple[float, tuple[str, ...]]] = OrderedDict()
        self._redis = connect(url, timeout_s=timeout_s)
        self._script = self._redis.register_script(_READ_SCRIPT)
        self._breaker = Breaker(clock=clock)

    def lookup(self, customers: Iterable[Customer]) -> dict[Customer, tuple[str, ...]]:
        """Attributes (one string per field, ``""`` when absent) of each distinct customer."""
        now = self.clock()
        found: dict[Customer, tuple[str, ...]] = {}
        missing: list[Customer] = []
        cache = self._cache
        for customer in set(customers):
            entry = cache.get(customer)
            if entry is not None and entry[0] > now:
                cache.move_to_end(customer)
                found[customer] = entry[1]
            else:
                missing.append(customer)
        self._count("hit", len(found))
        if missing:
            found.update(self._fetch(missing, now))
        return found

    def _fetch(self, customers: list[Customer], now: float) -> dict[Customer, tuple[str, ...]]:
        if not self.fields:
            return {customer: () for customer in customers}
        if self._breaker.ready():
            try:
                fetched = self._read(customers)
            except REDIS_ERRORS as err:
                delay = self._breaker.failed(err)
                log.warning("Redis unavailable for enrichment: using cached or empty attributes",
                            extra={"customers": len(customers), "retry_in_s": delay,
                                   "error": str(err)})
            else:
                if self._breaker.succeeded():
                    log.info("Redis is back for enrichment")
                return self._store(fetched, now)
        out = {}
        for customer in customers:
            entry = self._cache.get(customer)
            out[customer] = self._empty if entry is None else entry[1]
        unavailable = sum(1 for customer in customers if customer not in self._cache)
        self._count("unavailable", unavailable)
        self._count("stale", len(customers) - unavailable)
        return out

    def _read(self, customers: list[Customer]) -> list[tuple[Customer, tuple[str, ...] | None]]:
        """One pipelined round trip, one script call per 1,000 customers; values that are not
        UTF-8 read with U+FFFD in place of the bad bytes."""
        pipe = self._redis.pipeline(transaction=False)
        for start in range(0, len(customers), KEYS_PER_CALL):
            keys = _encode_json([customer_key(org, customer)
                                 for org, customer in customers[start:start + KEYS_PER_CALL]])
            self._script(keys=[], args=[keys, *self.fields], client=pipe)
        replies = [reply for chunk in pipe.execute()
                   for reply in _decode_json(chunk.decode("utf-8", "replace"))]
        return [(customer, None if values is False else tuple(value or "" for value in values))
                for customer, values in zip(customers, replies)]

    def _store(self, fetched, now: float) -> dict[Customer, tuple[str, ...]]:
        expires = now + self.ttl_s
        out = {}
        unknown = 0
        for customer, attributes in fetched:
            if attributes is None:
                unknown += 1
                attributes = self._empty
            self._cache[customer] = (expires, attributes)
            self._cache.move_to_end(customer)
            out[customer] = attributes
        self._count("unknown", unknown)
        self._count("fetched", len(fetched) - unknown)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return out

    def _count(self, outcome: str, n: int = 1) -> None:
        if n:
            self.stats[outcome] += n
            metrics.record_enrichment_lookups(outcome, n)

    def close(self) -> None:
        self._redis.close()
