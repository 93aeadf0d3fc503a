"""Redis key names: ids holding ``:``, ``%`` or control characters never share a hash, and a key
built the README's way (by a gateway, without tallyflow's code) reads the right one.

The oracle ``gateway_key`` below is written from the README's rule, not imported from the sinks;
the shell function is taken from the README itself and run by bash.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deploy.broker import ensure_topic
from operators.live_totals import QuotaAlert
from sinks.alerts import AlertsPartition, fence_key
from sinks.enrichment import CustomerAttributes
from sinks.redis_client import key_part, plain
from sinks.redis_sink import RedisTotalsWriter
from support.kafka import read_all, unique_topic
from support.redis import redis_server  # noqa: F401

FEB_1_2026_MS = 1_769_904_000_000
README = Path(__file__).resolve().parents[1] / "README.md"

# Pairs that a plain ":".join would map to one key, and ids with the escape character itself.
COLLIDING_CUSTOMERS = [
    ("acme", "eu:42"),
    ("acme:eu", "42"),
    ("acme%3Aeu", "42"),      # looks like an encoded ':' but is literally "%3A"
    ("acme", "eu%3A42"),
    ("acme", "eu\x0042"),     # a NUL
    ("acme", "eu\n42"),
    ("acme", "eu%0A42"),
    ("ac:me", "e:u:4:2"),
    ("acmé", "ユーロ:42"),     # non-ASCII stays as it is
]


def gateway_part(text: str) -> str:
    """The README's rule, written out: %, : and ASCII control characters as %XX."""
    out = []
    for char in text:
        if char in "%:" or ord(char) < 0x20 or ord(char) == 0x7F:
            out.append("%" + format(ord(char), "02X"))
        else:
            out.append(char)
    return "".join(out)


def gateway_key(kind: str, *ids: str, period: str | None = None) -> str:
    parts = ["tallyflow", kind, *(gateway_part(i) for i in ids)]
    return ":".join(parts + ([period] if period else []))


def readme_shell_key_part() -> str:
    """The ``key_part`` shell function exactly as the README shows it."""
    match = re.search(r"^key_part\(\) \{.*\}$", README.read_text(), re.MULTILINE)
    assert match, "the README no longer shows the shell key_part function"
    return match.group(0)


def test_every_colliding_pair_gets_its_own_live_totals_hash(redis_server):
    writer = RedisTotalsWriter(redis_server.url, "0", timeout_s=1.0)
    totals = {(org, customer, "api:calls", "day", FEB_1_2026_MS): (i + 1, (i + 1) * 10**18 + 5)
              for i, (org, customer) in enumerate(COLLIDING_CUSTOMERS)}
    try:
        writer.submit(totals)
        assert writer.drain(10)
    finally:
        writer.close(1)
    client = redis_server.client()
    assert len(list(client.scan_iter("tallyflow:usage:*"))) == len(COLLIDING_CUSTOMERS)
    for (org, customer, code, _kind, _start), (count, total) in totals.items():
        stored = client.hgetall(gateway_key("usage", org, customer, code, period="2026-02-01"))
        whole, fraction = divmod(total, 10**18)
        assert stored == {b"count": str(count).encode(), b"value": f"{whole}.{fraction:018d}".encode()}


def test_enrichment_reads_the_hash_a_gateway_named(redis_server):
    client = redis_server.client()
    for i, (org, customer) in enumerate(COLLIDING_CUSTOMERS):
        client.hset(gateway_key("customer", org, customer), mapping={"plan": f"plan-{i}"})
    attributes = CustomerAttributes(redis_server.url, ("plan",), ttl_ms=60_000)
    try:
        found = attributes.lookup(COLLIDING_CUSTOMERS)
    finally:
        attributes.close()
    assert found == {customer: (f"plan-{i}",) for i, customer in enumerate(COLLIDING_CUSTOMERS)}


def test_alerts_of_colliding_customers_are_fenced_apart(kafka_broker, redis_server):
    topic = unique_topic("alerts")
    ensure_topic(kafka_broker.bootstrap, topic, 2)
    alerts = [QuotaAlert(org, customer, "api", "day", "2026-02-01", "count", "25", "26", FEB_1_2026_MS)
              for org, customer in COLLIDING_CUSTOMERS]
    part = AlertsPartition([kafka_broker.bootstrap], topic, redis_server.url)
    try:
        part.write_batch(alerts)
        part.snapshot()
    finally:
        part.close()
    client = redis_server.client()
    for alert in alerts:
        name = gateway_key("alert", alert.organization_id, alert.external_customer_id, "api",
                           "2026-02-01", "count", "25")
        assert fence_key(alert) == name.encode() and client.get(name) == b"sent"
    sent = [tuple(json.loads(m.key())[:2]) for m in read_all(kafka_broker.bootstrap, topic)]
    assert sorted(sent) == sorted(COLLIDING_CUSTOMERS)


@pytest.mark.parametrize("org, customer", [c for c in COLLIDING_CUSTOMERS
                                           if not re.search("[\x00-\x1f\x7f]", "".join(c))])
def test_the_readme_shell_function_builds_the_same_key(org, customer):
    script = readme_shell_key_part() + '\nprintf "%s:%s" "$(key_part "$1")" "$(key_part "$2")"'
    built = subprocess.run(["bash", "-c", script, "key", org, customer], capture_output=True,
                           check=True, text=True).stdout
    assert built == f"{gateway_part(org)}:{gateway_part(customer)}"


@given(st.text(st.characters(codec="utf-8")))
def test_text_called_plain_is_kept_as_it_is(text):
    """``plain`` is the key builders' shortcut: it may say False for text ``key_part`` keeps,
    never True for text it encodes."""
    if plain(text):
        assert key_part(text) == text
    if text.isascii() and text.isprintable():  # there it says exactly whether text is kept
        assert plain(text) == (key_part(text) == text)
