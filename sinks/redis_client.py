"""Redis connections for the flow's Redis features, and a breaker that never makes them wait.

Every Redis user in the flow (enrichment, live totals, alert fences) talks to Redis with short
timeouts and no client-side retries, and goes through a :class:`Breaker`: after a failure it
skips Redis until a backoff delay has passed (0.2 s doubling up to 10 s), so an unreachable or
slow Redis costs at most one timeout per delay, never one per call. Time is injected::

    >>> now = [0.0]
    >>> breaker = Breaker(clock=lambda: now[0])
    >>> breaker.ready(), breaker.failed("down"), breaker.ready()
    (True, 0.2, False)
    >>> now[0] = 0.25; breaker.ready()
    True
    >>> breaker.failed("still down"), breaker.succeeded(), breaker.ready()
    (0.4, True, True)
"""

from __future__ import annotations

import logging
import re
import select
import socket
import time
from typing import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.RedisError, OSError)
"""What a call to an unreachable, restarting or overloaded Redis raises."""

_ESCAPED = re.compile("[%:\x00-\x1f\x7f]")


def _percent(match: re.Match) -> str:
    return f"%{ord(match.group()):02X}"


def key_part(component: str) -> str:
    """One component of a ``:``-separated Redis key, percent-encoded so that keys cannot collide.

    ``%`` becomes ``%25``, ``:`` becomes ``%3A`` and ASCII control characters (U+0000-U+001F,
    U+007F) become ``%XX`` (upper-case hex), so every key names exactly one tuple of ids and
    stays printable in ``redis-cli``; every other character is kept as it is (UTF-8 on the wire).
    Gateways build the same keys with the few lines in the README.

    >>> key_part("eu:42"), key_part("100%"), key_part("tab\\there"), key_part("café")
    ('eu%3A42', '100%25', 'tab%09here', 'café')
    >>> ":".join(map(key_part, ("acme", "eu:42"))) != ":".join(map(key_part, ("acme:eu", "42")))
    True
    """
    if _ESCAPED.search(component) is None:
        return component
    return _ESCAPED.sub(_percent, component)


def plain(text: str) -> bool:
    """True only when :func:`key_part` keeps ``text`` as it is: no ``%`` or ``:``, and printable
    (so no control character); a key builder checks the concatenated ids at once and formats
    them directly, and leaves any other text to :func:`key_part` (which keeps, say, a no-break
    space as it is). Three scans in C: a third of the pattern's cost.

    >>> plain("acme" "cust_0042"), plain("acme" "eu:42"), plain("tab\\t"), plain("no\\xa0break")
    (True, False, False, False)
    """
    return "%" not in text and ":" not in text and text.isprintable()


def redis_key(prefix: str, *components: str) -> str:
    """``prefix`` followed by each component, percent-encoded (:func:`key_part`), joined by ``:``.

    >>> redis_key("tallyflow:customer", "acme:eu", "42")
    'tallyflow:customer:acme%3Aeu:42'
    """
    return ":".join((prefix, *map(key_part, components)))


def connect(url: str, *, timeout_s: float = 0.5) -> redis.Redis:
    """A client for ``url`` (``redis://host:port/db``) that fails fast instead of retrying.

    The connection is lazy: this never blocks, the first command connects.
    """
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
        decode_responses=False,
    )


def raw_connection(url: str, *, timeout_s: float = 0.5) -> redis.connection.AbstractConnection:
    """One connection to ``url`` (TLS, password and database as the URL says) for
    :func:`send_commands`, failing fast like :func:`connect`; it connects on first use."""
    pool = connect(url, timeout_s=timeout_s).connection_pool
    return pool.connection_class(**pool.connection_kwargs)


def command(*words: str) -> bytes:
    """One command in Redis's protocol (RESP), for :func:`send_commands`.

    >>> command("SET", "k", "1", "NX")
    b'*4\\r\\n$3\\r\\nSET\\r\\n$1\\r\\nk\\r\\n$1\\r\\n1\\r\\n$2\\r\\nNX\\r\\n'
    """
    encoded = [word.encode() for word in words]
    return b"".join([b"*%d\r\n" % len(encoded), *(b"$%d\r\n%s\r\n" % (len(w), w) for w in encoded)])


def send_commands(connection: redis.connection.AbstractConnection, payload: list[bytes],
                  replies: int, reply_size: int = 0) -> bytes:
    """Send ``payload`` (encoded commands, in pieces) and return the ``replies`` replies as
    bytes, for commands whose every reply is one line (integers, status, nil, errors, array
    headers): the lines are counted, not parsed one by one. At the first error reply it raises
    ``redis.ResponseError`` with it and drops the connection (an aborted transaction answers
    fewer lines than counted), as it does when sending or reading fails: the next call starts
    afresh rather than reading stale replies. ``reply_size``, the bytes the replies take when
    none is an error, lets the reader sleep until they are all there (see :func:`_read_lines`).

    >>> send_commands(raw_connection("redis://127.0.0.1:1/0"), [command("PING")], 1)
    Traceback (most recent call last):
    redis.exceptions.ConnectionError: Error ... connecting to 127.0.0.1:1. ...
    """
    try:
        connection.send_packed_command(payload, check_health=False)
        return bytes(_read_lines(connection._sock, replies, reply_size))  # redis-py's socket
    except BaseException:
        connection.disconnect()
        raise


def _read_lines(sock, lines: int, size: int = 0) -> bytearray:
    """``lines`` CRLF-terminated lines from ``sock`` (nothing else is in flight), or the
    ``redis.ResponseError`` of the first error line among them. With the ``size`` they are
    expected to take, it waits for that many bytes before reading (:func:`_await_bytes`), so a
    pipeline's replies, which Redis sends a few dozen at a time, wake the thread (and take the
    GIL) a few times rather than a hundred."""
    received = bytearray()
    seen, error = 0, -1  # where the first error line starts
    while seen < lines:
        if size > len(received) + _SMALL_REPLY:
            _await_bytes(sock, size - len(received))
        chunk = sock.recv(max(1 << 16, size - len(received)))
        if not chunk:
            raise redis.ConnectionError("Redis closed the connection")
        start = len(received)
        received += chunk
        seen += chunk.count(b"\n")  # one a line: these replies hold no CR or LF of their own
        if error < 0:
            error = _error_line(received, start)
        if error >= 0 and (end := received.find(b"\r\n", error)) >= 0:
            raise redis.ResponseError(received[error + 1:end].decode("utf-8", "replace"))
    return received


def _error_line(received: bytearray, start: int) -> int:
    """Where the first line starting with ``-`` (an error) at or after ``start`` begins, or -1:
    a ``-`` found by memchr, skipped where it is inside a line (``$-1``, a nil), which is rare,
    rather than every line boundary searched.

    >>> replies = bytearray(b"$-1\\r\\n+QUEUED\\r\\n-ERR a-b\\r\\n")
    >>> _error_line(replies, 0), _error_line(replies, 15), _error_line(bytearray(b"-X\\r\\n"), 0)
    (14, -1, 0)
    """
    at = received.find(b"-", start)
    while at > 0 and received[at - 1] != 0x0A:  # not at a line's start
        at = received.find(b"-", at + 1)
    return at


_SMALL_REPLY = 4_096
"""Replies shorter than this are read as they come."""

_QUIET_S = 0.05
"""How long a wait for the expected replies lasts at most before reading what came: an error
reply can make them shorter than expected, and it must be seen without a timeout's delay."""


def _await_bytes(sock, size: int) -> None:
    """Sleep until ``size`` bytes can be read from ``sock`` or ``_QUIET_S`` has passed (no
    more: a hint, after which reading goes on as without it). A plain TCP socket only (its
    receive low-water mark says when to wake); a TLS one (whose decrypted bytes may wait in
    it) or any other is read as the bytes come."""
    if type(sock) is not socket.socket or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    readable = select.poll()  # not select(): the descriptor may be past its 1024
    readable.register(sock, select.POLLIN)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, min(size, 1 << 30))
    try:
        readable.poll(_QUIET_S * 1_000)
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class Breaker:
    """Whether to try Redis now: closed until a failure, then open for a growing delay."""

    def __init__(self, first_s: float = 0.2, cap_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.first_s, self.cap_s, self.clock = first_s, cap_s, clock
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = ""

    def ready(self) -> bool:
        """True when Redis may be tried (no failure, or the delay has passed)."""
        return self.failures == 0 or self.clock() >= self.retry_at

    def seconds_until_ready(self) -> float:
        return 0.0 if self.ready() else self.retry_at - self.clock()

    def failed(self, error: object) -> float:
        """Record a failure; returns the delay before the next attempt."""
        delay = min(self.cap_s, self.first_s * 2 ** self.failures)
        self.failures += 1
        self.retry_at = self.clock() + delay
        self.last_error = str(error)
        return delay

    def succeeded(self) -> bool:
        """Record a success; True if this ended an outage."""
        recovered = self.failures > 0
        self.failures = 0
        return recovered
