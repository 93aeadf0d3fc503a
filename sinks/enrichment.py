"""Customer attributes from Redis for aggregate rows: a bounded TTL cache over pipelined lookups.

Attributes live in Redis hashes ``tallyflow:customer:{organization_id}:{external_customer_id}``
(each id percent-encoded as ``sinks.redis_client.key_part`` does: ``%`` -> ``%25``, ``:`` ->
``%3A``, control characters -> ``%XX``, so ``("acme", "eu:42")`` and ``("acme:eu", "42")`` never
share a hash);
:class:`CustomerAttributes` returns the configured fields of many customers at once. Customers
cached for less than the TTL cost nothing; the others cost one pipelined round trip per call
(one script per 1,000 customers: ``EXISTS``, then ``HMGET`` of a hash that exists), never one
per event: the ClickHouse sink calls it once per flush with the distinct customers of the rows
it writes. Each script call takes the customers' names (their hashes' names without the
prefix) as one JSON array and answers one JSON array holding only the customers that have a
hash (their position and values), so neither side packs or parses a reply per customer, and
the client decodes next to nothing when few customers have attributes (the usual case); a
standalone Redis (the only kind ``connect`` makes) allows key names built in a script, a Redis
Cluster would not.

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
from collections import Counter
from functools import cache
from itertools import compress, islice, repeat
from operator import ge, is_, itemgetter
from typing import Callable, Iterable

import msgspec

from operators.telemetry import metrics
from sinks.redis_client import REDIS_ERRORS, Breaker, connect, key_part, plain

log = logging.getLogger(__name__)

CUSTOMER_PREFIX = "tallyflow:customer"
KEYS_PER_CALL = 1_000
_READ_SCRIPT = """
local names = cjson.decode(ARGV[1])
local prefix = ARGV[2]
local fields = {unpack(ARGV, 3)}
local out = {}
for i, name in ipairs(names) do
  local key = prefix .. name
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = i - 1
    local values = redis.call('HMGET', key, unpack(fields))
    for j = 1, #fields do
      out[#out + 1] = values[j] or ''
    end
  end
end
if #out == 0 then
  return '[]'
end
return cjson.encode(out)
"""  # ARGV[1]: JSON array of customer names (:func:`customer_names`); ARGV[2]: the hashes'
# prefix; ARGV[3:]: the fields. Answers a JSON array of the customers that have a hash only:
# for each, its position (from 0), then its values ("" where a field is absent).
_encode_json = msgspec.json.Encoder().encode
_decode_json = msgspec.json.Decoder().decode


Customer = tuple  # (organization_id, external_customer_id)

_EXPIRES = itemgetter(0)
_ATTRIBUTES = itemgetter(1)


def customer_key(organization_id: str, external_customer_id: str) -> str:
    """The Redis hash holding a customer's attributes.

    >>> customer_key("org_1", "cus_9"), customer_key("acme:eu", "42%")
    ('tallyflow:customer:org_1:cus_9', 'tallyflow:customer:acme%3Aeu:42%25')
    """
    return f"{CUSTOMER_PREFIX}:{customer_names([organization_id], [external_customer_id])[0]}"


def customer_names(organizations, customers) -> list[str]:
    """Each customer's name: its hash's name after ``tallyflow:customer:``, the two ids
    percent-encoded (``sinks.redis_client.key_part``) and joined by ``:``, so one name is one
    customer. ``organizations`` and ``customers``: lists of str, or Arrow string arrays (the
    sink's key columns), which Arrow joins, making one Python string per customer. The ids are
    checked all at once and joined as they are when none needs encoding (nearly always).

    >>> customer_names(["o", "o"], ["c1", "c2"]), customer_names(["acme:eu", "o"], ["42%", "c"])
    (['o:c1', 'o:c2'], ['acme%3Aeu:42%25', 'o:c'])
    >>> import pyarrow as pa
    >>> customer_names(pa.array(["o", "acme:eu"]), pa.array(["c1", "42%"]))
    ['o:c1', 'acme%3Aeu:42%25']
    """
    if not isinstance(organizations, list):
        if _verbatim(organizations) and _verbatim(customers):
            from pyarrow._compute import call_function

            return call_function("binary_join_element_wise", [organizations, customers, ":"]).to_pylist()
        organizations, customers = organizations.to_pylist(), customers.to_pylist()
    if not (plain("".join(organizations)) and plain("".join(customers))):
        organizations, customers = map(key_part, organizations), map(key_part, customers)
    return list(map(":".join, zip(organizations, customers)))


def _verbatim(strings) -> bool:
    """Whether ``key_part`` keeps every string of the Arrow ``strings`` as it is: no byte of
    ``%``, ``:`` or an ASCII control character in their UTF-8 (no such byte is ever part of
    another character's), found by one table lookup of the bytes in numpy.

    >>> import pyarrow as pa
    >>> _verbatim(pa.array(["acme", "café", ""])), _verbatim(pa.array(["a:b", "x"])[1:]), _verbatim(pa.array(["a\x7f"]))
    (True, True, False)
    """
    import numpy as np

    offsets_buffer, data = strings.buffers()[1:3]
    if data is None or not len(strings):
        return True
    offsets = np.frombuffer(offsets_buffer, np.int32, len(strings) + 1, strings.offset * 4)
    text = np.frombuffer(data, np.uint8, offsets[-1] - offsets[0], offsets[0])
    return not _encoded_bytes()[text].any()


@cache
def _encoded_bytes():
    """Per byte value: whether it is (the UTF-8 of) a character ``key_part`` encodes."""
    import numpy as np

    return np.array([byte < 0x20 or byte == 0x7F or chr(byte) in "%:" for byte in range(256)])


class CustomerAttributes:
    """Fields ``fields`` of customers' hashes, through a cache of ``max_entries`` for ``ttl_ms``.

    Unknown customers are cached too (as no attributes), so a customer without a hash is
    looked up at most once per TTL. ``stats`` counts outcomes (also exported to Prometheus).

    The cache is a plain dict keyed by customer name (:func:`customer_names`), in the order
    customers were fetched: every entry lives for the same TTL, so that order is also the order
    in which they expire (a customer fetched again moves to the end), and a hit moves nothing.
    Past ``max_entries`` the cache is rebuilt with the newer half of its entries: the customers
    fetched longest ago (first to expire) go, whether or not they were asked for since; they
    are fetched again when next asked for. An entry costs ~110 bytes (a name of 20 characters,
    ~70, and the dict's slot; customers fetched together share one expiry, and those without
    attributes one entry), so the 250,000 by default hold ~28 MB for a worker (its sink
    partitions share one client): a minute of the high-cardinality bench's customers (~65,000)
    four times over, so that a TTL's worth of customers is never evicted at up to four times
    that rate (100,000 before, when each partition had its own).
    """

    def __init__(self, url: str, fields: tuple[str, ...], ttl_ms: int, *,
                 max_entries: int = 250_000, timeout_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fields = tuple(fields)
        self.ttl_s = ttl_ms / 1000
        self.max_entries = max_entries
        self.clock = clock
        self.stats: Counter[str] = Counter()
        self._empty = ("",) * len(self.fields)
        # name -> (expires, attributes, or None where it has none): in order of expiry
        self._cache: dict[str, tuple[float, tuple[str, ...] | None]] = {}
        self._redis = connect(url, timeout_s=timeout_s)
        self._script = self._redis.register_script(_READ_SCRIPT)
        self._breaker = Breaker(clock=clock)

    def lookup(self, customers: Iterable[Customer]) -> dict[Customer, tuple[str, ...]]:
        """Attributes (one string per field, ``""`` when absent) of each distinct customer."""
        distinct = list(set(customers))
        found = self.present([org for org, _ in distinct], [customer for _, customer in distinct])
        empty = self._empty
        return {customer: found.get(at, empty) for at, customer in enumerate(distinct)}

    def present(self, organizations, customers) -> dict[int, tuple[str, ...]]:
        """The attributes of those of the distinct customers ``zip(organizations, customers)``
        (lists of str, or Arrow string arrays: see :func:`customer_names`) that have some (a
        field that is not ``""``), by their position; every other customer's are all ``""``.
        The sink's call: when few customers have attributes, what it maps rows to is small.

        Cached entries are read and checked in bulk (C iterators, no Python code per customer
        cached); a customer not cached is entered as fetched with no attributes by the same
        search (``setdefault``: one search a customer, not two), and only the new or expired go
        to :meth:`_fetch`.
        """
        if not self.fields:
            return {}
        names = customer_names(organizations, customers)
        now = self.clock()
        unknown = (now + self.ttl_s, None)  # a customer fetched now without attributes
        entries = list(map(self._cache.setdefault, names, repeat(unknown)))
        new = list(compress(range(len(names)), map(is_, entries, repeat(unknown))))
        expired = list(compress(range(len(names)), map(ge, repeat(now), map(_EXPIRES, entries))))
        found = dict(compress(enumerate(map(_ATTRIBUTES, entries)), map(_ATTRIBUTES, entries)))
        self._count("hit", len(names) - len(new) - len(expired))
        if new or expired:
            for at in expired:
                found.pop(at, None)  # what the fetch gives (stale where Redis is down) replaces it
            due = new + expired
            fetched = self._fetch(list(map(names.__getitem__, due)), len(new), unknown)
            found.update(zip(map(due.__getitem__, fetched), fetched.values()))
        return found

    def _fetch(self, names: list[str], new: int, unknown: tuple) -> dict[int, tuple[str, ...]]:
        """Those of customers ``names`` (the first ``new`` entered as ``unknown`` just now, the
        others expired) that have attributes, by position, and theirs: from Redis, else (Redis
        unavailable) from the cache even when expired, the new ones taken out of it again."""
        if self._breaker.ready():
            try:
                fetched = self._read(names)
            except REDIS_ERRORS as err:
                delay = self._breaker.failed(err)
                log.warning("Redis unavailable for enrichment: using cached or empty attributes",
                            extra={"customers": len(names), "retry_in_s": delay,
                                   "error": str(err)})
            else:
                if self._breaker.succeeded():
                    log.info("Redis is back for enrichment")
                return self._store(names, new, unknown, fetched)
        cache = self._cache
        for name in names[:new]:
            cache.pop(name, None)  # not fetched: asked again next time
        self._count("unavailable", new)
        self._count("stale", len(names) - new)
        stale = zip(range(new, len(names)), map(_ATTRIBUTES, map(cache.__getitem__, names[new:])))
        return {at: attributes for at, attributes in stale if attributes is not None}

    def _read(self, names: list[str]) -> dict[int, tuple[str, ...]]:
        """The attributes (``""`` for a field it lacks) of those of customers ``names`` that
        have a hash, by position: one pipelined round trip, one script call per 1,000
        customers, each answering only the customers that have a hash. Values that are not
        UTF-8 read with U+FFFD in place of the bad bytes."""
        pipe = self._redis.pipeline(transaction=False)
        starts = range(0, len(names), KEYS_PER_CALL)
        for start in starts:
            self._script(keys=[], args=[_encode_json(names[start:start + KEYS_PER_CALL]),
                                        f"{CUSTOMER_PREFIX}:", *self.fields], client=pipe)
        found = {}
        width = len(self.fields) + 1
        for start, reply in zip(starts, pipe.execute()):
            flat = _decode_json(reply.decode("utf-8", "replace"))
            values = zip(*[flat[field::width] for field in range(1, width)])
            found.update(zip(map(start.__add__, flat[::width]), values))
        return found

    def _store(self, names: list[str], new: int, unknown: tuple,
               fetched: dict[int, tuple[str, ...]]) -> dict[int, tuple[str, ...]]:
        """Cache customers ``names`` as just read (``fetched``: those with a hash, by position)
        until ``unknown``'s expiry; the first ``new`` are cached already, as ``unknown``, the
        expired others move to the end (the cache's order stays the order of expiry). Those
        that have attributes, and theirs."""
        cache = self._cache
        for name in names[new:]:
            del cache[name]
            cache[name] = unknown
        found = {}
        for at, attributes in fetched.items():
            if any(attributes):
                cache[names[at]] = (unknown[0], attributes)
                found[at] = attributes
        self._count("unknown", len(names) - len(fetched))
        self._count("fetched", len(fetched))
        if len(cache) > self.max_entries:
            self._evict()
        return found

    def _evict(self) -> None:
        """Keep the newer half of ``max_entries`` (those fetched last), in one rebuild: never
        deleting the oldest one by one, whose empty slots each next search would walk past."""
        cache = self._cache
        self._cache = dict(islice(cache.items(), len(cache) - self.max_entries // 2, None))

    def _count(self, outcome: str, n: int = 1) -> None:
        if n:
            self.stats[outcome] += n
            metrics.record_enrichment_lookups(outcome, n)

    def close(self) -> None:
        self._redis.close()
