"""ClickHouse access for the sinks: one small interface, two engines chosen by URL.

* ``chdb://<dir>`` runs the ClickHouse engine inside this process (chdb) on a data directory.
* ``http://user:pass@host:port/db`` (or ``https://``) talks to a ClickHouse server through
  clickhouse-connect.
* ``discard://`` accepts every statement and drops it (the benchmark's scaling mode measures
  the flow without a ClickHouse on the same machine; never for real data).

Both decode results with clickhouse-connect's Native reader, so they return the same Python
values: ``Decimal`` for decimals (exact, never via float), ``int`` for integers of any width,
timezone-aware UTC ``datetime`` for ``DateTime``/``DateTime64``, ``date`` for ``Date``.
Both parse inserted datetimes with ``date_time_input_format=best_effort``.
This module adds no delivery guarantee: an insert either raises or has been accepted by the
engine; exactly-once is the sink's job (ReplacingMergeTree versions, deterministic rows).
Failures are ``ClickHouseError`` (the engine rejected the statement: retrying will not help)
or its subclass ``ClickHouseUnavailable`` (no server or engine to talk to: retry later).

chdb hosts one engine, on one data directory, per process (measured with chdb 4.4.0): any
number of connections to that directory may be open, a different directory can be opened only
after every connection to the first is closed, and a second process cannot open a directory
in use. So chdb backends share a process-wide, reference-counted engine per directory, and one
lock serialises every chdb call in the process (``ChdbEngineLease``; the dev server uses it too).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp, connect(f"chdb://{tmp}") as ch:
    ...     ch.query("SELECT toDecimal128('-0.000000000000000001', 18) AS v, toUInt64(7) AS n")
    (['v', 'n'], [(Decimal('-1E-18'), 7)])
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import ssl
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger(__name__)


class ClickHouseError(RuntimeError):
    """The engine rejected a statement; ``code`` is ClickHouse's error code when known.

    >>> ClickHouseError("Code: 62. DB::Exception: Syntax error", code=62).code
    62
    """

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class ClickHouseUnavailable(ClickHouseError):
    """Could not reach the server or open the engine; the same call may succeed later."""


class ClickHouseMisconfigured(ClickHouseError):
    """A failure no retry can cure: an unknown host, a TLS failure, refused credentials.

    The flow stops at once with this message instead of waiting for ClickHouse forever.
    """


class ClickHouseBackend(Protocol):
    """What the sinks need from ClickHouse. Implementations are safe to share between threads."""

    def command(self, sql: str) -> None:
        """Run a statement that has no result (DDL, OPTIMIZE, INSERT … SELECT)."""

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """Column names and rows of a SELECT (no FORMAT clause). Names may be empty when no rows."""

    def text_rows(self, sql: str) -> list[tuple[str, ...]]:
        """The rows of a SELECT whose every column is a ``String`` (no FORMAT clause), as ``str``.

        The schema check at start-up asks the engine's catalog this way: an embedded engine
        answers it without clickhouse-connect's typed reader (~0.1 s to import and start).
        """

    def insert_json_each_row(self, table: str, columns: Sequence[str], payload: bytes,
                             settings: Mapping[str, str] | None = None) -> None:
        """Insert newline-delimited JSON objects (decimals and DateTime64 as strings).

        ``settings`` are optional per-insert ClickHouse settings (e.g. a dedup token).
        """

    def insert_arrow(self, table: str, columns: Sequence[str], payload: bytes,
                     settings: Mapping[str, str] | None = None) -> None:
        """Insert an Arrow IPC stream (``ArrowStream``; see ``sinks.columnar``) into ``columns``."""

    def close(self) -> None:
        """Release the connection or the engine reference; idempotent."""


def connect(url: str) -> ClickHouseBackend:
    """Open a backend for ``url`` (``chdb://dir``, ``http://…``, ``https://…``).

    HTTP backends connect lazily (the first call raises ``ClickHouseUnavailable`` if the
    server is down); chdb backends open the engine at once.

    >>> connect("ftp://example.com")
    Traceback (most recent call last):
    ...
    ValueError: unsupported ClickHouse URL scheme 'ftp' (use chdb://dir, http:// or https://)
    """
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "chdb":
        return ChdbBackend(url[len("chdb://"):])
    if scheme in ("http", "https"):
        return HttpBackend(url)
    if scheme == "discard":
        return DiscardBackend()
    raise ValueError(f"unsupported ClickHouse URL scheme {scheme!r} (use chdb://dir, http:// or https://)")


# --------------------------------------------------------------------------- errors from chdb

_CODE_RE = re.compile(r"Code: (\d+)\.")


def engine_error(err: Exception, what: str = "") -> ClickHouseError:
    """Turn a chdb exception into ``ClickHouseError`` keeping the engine's ``Code: N. …`` text.

    >>> e = engine_error(RuntimeError("Streaming insert finish failed: Code: 27. DB::Exception: x"))
    >>> (str(e), e.code)
    ('Code: 27. DB::Exception: x', 27)
    """
    text = str(err)
    start = text.find("Code: ")
    message = text[start:].strip() if start >= 0 else text.strip()
    match = _CODE_RE.search(message)
    code = int(match.group(1)) if match else None
    return ClickHouseError(f"{what}{message}" if what else message, code=code)


def _directory_locked_elsewhere(path: str) -> bool:
    """Whether another process holds ClickHouse's lock on ``<path>/status``."""
    status = os.path.join(path, "status")
    if not os.path.exists(status):
        return False
    with open(status, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


# --------------------------------------------------------------------------- chdb engine registry

_PROCESS_LOCK = threading.Lock()  # serialises every chdb call and the registry below
_ENGINES: dict[str, "_ChdbEngine"] = {}  # realpath -> engine (chdb allows at most one)
_SETTING_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_CONNECTIONS = 16  # distinct (database, settings) connections kept per engine


def quote_identifier(name: str) -> str:
    """Backquote a ClickHouse identifier.

    >>> quote_identifier("a`b")
    '`a\\\\`b`'
    """
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_string(value: str) -> str:
    """Single-quote a ClickHouse string literal.

    >>> quote_string("it's")
    "'it\\\\'s'"
    """
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def settings_sql(settings: Mapping[str, str]) -> str:
    """Render ``k = 'v', …`` for SET/SETTINGS, refusing names that are not identifiers.

    >>> settings_sql({"max_threads": "2"})
    "max_threads = '2'"
    """
    for name in settings:
        if not _SETTING_NAME_RE.match(name):
            raise ClickHouseError(f"Code: 115. DB::Exception: Unknown setting {name!r}", code=115)
    return ", ".join(f"{name} = {quote_string(str(value))}" for name, value in settings.items())


class _ChdbEngine:
    """The process's chdb engine on one directory and its connections (one per settings)."""

    def __init__(self, path: str) -> None:
        try:
            import chdb  # imported here: ~0.2 s and 500 MB that HTTP-only processes never need
        except ImportError as err:  # the production image leaves the embedded engine out
            raise ClickHouseMisconfigured(
                "CLICKHOUSE_URL: chdb:// needs the embedded engine (pip install 'tallyflow[embedded]'); "
                "the production image has none: use http(s)://user:password@host:8123/db") from err

        self.path = path
        self.refs = 0
        self._chdb = chdb
        try:
            self._keepalive = chdb.connect(path)  # the engine lives while a connection is open
        except RuntimeError as err:
            if _directory_locked_elsewhere(path):
                raise ClickHouseUnavailable(
                    f"chdb data directory {path} is in use by another process "
                    "(ClickHouse allows one process per data directory)") from err
            raise engine_error(err, f"cannot open chdb engine at {path}: ") from err
        self._connections: OrderedDict[tuple, Any] = OrderedDict()
        self._reader: Any = None

    def reader(self) -> Any:
        """clickhouse-connect's chdb client on this engine, for typed results (caller holds the lock).

        Its Native decoder is the one the HTTP backend uses, so both return identical values,
        and it is fast (200k rows x 8 columns: 0.35 s; JSONCompact decoded in Python: 2.7 s).
        """
        if self._reader is None:
            import clickhouse_connect

            try:
                self._reader = clickhouse_connect.get_client(interface="chdb", path=self.path, tz_mode="aware")
            except Exception as err:  # clickhouse-connect raises several types while connecting
                raise cc_error(err, f"chdb engine at {self.path}") from err
        return self._reader

    def connection(self, database: str, settings: Mapping[str, str]) -> Any:
        """The connection for ``database`` with ``settings`` applied (caller holds the lock)."""
        key = (database, tuple(sorted(settings.items())))
        conn = self._connections.get(key)
        if conn is not None:
            self._connections.move_to_end(key)
            return conn
        conn = self._open(database, settings)
        self._connections[key] = conn
        while len(self._connections) > _MAX_CONNECTIONS:
            _, evicted = self._connections.popitem(last=False)
            evicted.close()
        return conn

    def scratch(self, database: str, settings: Mapping[str, str]) -> Any:
        """A fresh connection the caller closes (for statements that change session state)."""
        return self._open(database, settings)

    def _open(self, database: str, settings: Mapping[str, str]) -> Any:
        conn = self._chdb.connect(self.path)
        try:
            if database != "default":
                conn.query(f"USE {quote_identifier(database)}", "TabSeparated")
            if settings:
                conn.query(f"SET {settings_sql(settings)}", "TabSeparated")
        except RuntimeError as err:
            conn.close()
            raise engine_error(err) from err
        except ClickHouseError:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        for conn in self._connections.values():
            conn.close()
        self._connections.clear()
        self._keepalive.close()


class ChdbEngineLease:
    """One reference to this process's chdb engine on a data directory.

    Every engine call goes through ``locked()`` (a ``chdb`` connection with the requested
    database and settings), ``locked_scratch()`` (a throwaway one) or ``locked_reader()``
    (clickhouse-connect's chdb client, for typed results); each holds the process-wide chdb
    lock. ``release()`` drops the reference; the engine shuts down (freeing the directory) when
    the last one goes.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     lease = ChdbEngineLease.acquire(tmp)
        ...     with lease.locked(settings={"max_threads": "1"}) as conn:
        ...         conn.query("SELECT getSetting('max_threads')", "TabSeparated").bytes()
        ...     lease.release()
        b'1\\n'
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._released = False

    @classmethod
    def acquire(cls, data_dir: str) -> "ChdbEngineLease":
        """Open (or share) the engine on ``data_dir``, creating the directory if missing."""
        os.makedirs(data_dir, exist_ok=True)
        path = os.path.realpath(data_dir)  # chdb compares engine paths literally
        with _PROCESS_LOCK:
            engine = _ENGINES.get(path)
            if engine is None:
                if _ENGINES:
                    other = next(iter(_ENGINES))
                    raise ClickHouseError(
                        f"this process already runs chdb on {other}; chdb hosts one data directory "
                        f"per process, so close every backend and dev server on it before opening {path}")
                engine = _ChdbEngine(path)
                _ENGINES[path] = engine
                log.info("chdb engine opened", extra={"data_dir": path})
            engine.refs += 1
        return cls(path)

    @contextmanager
    def locked(self, database: str = "default", settings: Mapping[str, str] | None = None) -> Iterator[Any]:
        """Hold the process chdb lock and yield a connection (cached per database and settings)."""
        with _PROCESS_LOCK:
            yield self._engine().connection(database, dict(settings or {}))

    @contextmanager
    def locked_scratch(self, database: str = "default",
                       settings: Mapping[str, str] | None = None) -> Iterator[Any]:
        """Like ``locked`` but with a throwaway connection, for SET/USE that must not persist."""
        with _PROCESS_LOCK:
            conn = self._engine().scratch(database, dict(settings or {}))
            try:
                yield conn
            finally:
                conn.close()

    @contextmanager
    def locked_reader(self) -> Iterator[Any]:
        """Hold the process chdb lock and yield clickhouse-connect's client on the engine."""
        with _PROCESS_LOCK:
            yield self._engine().reader()

    def _engine(self) -> _ChdbEngine:
        if self._released:
            raise ClickHouseUnavailable(f"chdb engine lease on {self.path} was released")
        return _ENGINES[self.path]

    def release(self) -> None:
        """Drop this reference (idempotent); the last one shuts the engine down."""
        with _PROCESS_LOCK:
            if self._released:
                return
            self._released = True
            engine = _ENGINES[self.path]
            engine.refs -= 1
            if engine.refs == 0:
                del _ENGINES[self.path]
                engine.close()
                log.info("chdb engine closed", extra={"data_dir": self.path})


def open_chdb_engines() -> list[str]:
    """Data directories this process has a chdb engine open on (at most one)."""
    with _PROCESS_LOCK:
        return list(_ENGINES)


# --------------------------------------------------------------------------- chdb backend

# Settings of the chdb backend's connection: parse datetimes as clickhouse-connect has a server
# do, so both backends accept the same payloads.
_CHDB_INSERT_SETTINGS = {"date_time_input_format": "best_effort"}


class ChdbBackend:
    """``chdb://<dir>``: the engine in this process (shared with every backend on ``dir``).

    Inserts stream the payload (JSONEachRow or ArrowStream) straight into the engine (``send_insert``);
    queries read Native and decode it with clickhouse-connect (exactly as ``HttpBackend``).
    """

    def __init__(self, data_dir: str) -> None:
        if not data_dir:
            raise ValueError("chdb URL needs a directory: chdb://./var/clickhouse or chdb:///abs/dir")
        self._lease = ChdbEngineLease.acquire(data_dir)
        self.path = self._lease.path

    def command(self, sql: str) -> None:
        with self._lease.locked(settings=_CHDB_INSERT_SETTINGS) as conn:
            _chdb_call(lambda: conn.query(sql, "TabSeparated"))

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        from clickhouse_connect.driver.exceptions import Error

        with self._lease.locked_reader() as client:
            try:
                result = client.query(sql)
            except Error as err:
                raise cc_error(err, f"chdb engine at {self.path}") from err
        return list(result.column_names), [tuple(row) for row in result.result_rows]

    def text_rows(self, sql: str) -> list[tuple[str, ...]]:
        """Read as ``JSONCompactEachRow`` straight from the engine (its strings are the values).

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, connect(f"chdb://{tmp}") as ch:
        ...     ch.text_rows("SELECT concat('row ', toString(number)), toString(number) FROM numbers(2)")
        [('row 0', '0'), ('row 1', '1')]
        """
        import msgspec

        with self._lease.locked(settings=_CHDB_INSERT_SETTINGS) as conn:  # command's connection
            text = _chdb_call(lambda: conn.query(sql, "JSONCompactEachRow")).bytes()
        return [tuple(row) for row in msgspec.json.decode(b"[" + b",".join(text.splitlines()) + b"]")]

    def insert_json_each_row(self, table: str, columns: Sequence[str], payload: bytes,
                             settings: Mapping[str, str] | None = None) -> None:
        """Insert JSONEachRow ``payload``; optional per-insert ClickHouse ``settings``."""
        if payload.strip():
            self._insert(table, columns, "JSONEachRow", payload, settings)

    def insert_arrow(self, table: str, columns: Sequence[str], payload: bytes,
                     settings: Mapping[str, str] | None = None) -> None:
        """Insert an Arrow IPC stream ``payload``; optional per-insert ClickHouse ``settings``."""
        if payload:
            self._insert(table, columns, "ArrowStream", payload, settings)

    def _insert(self, table: str, columns: Sequence[str], fmt: str, payload: bytes,
                settings: Mapping[str, str] | None) -> None:
        """Stream ``payload`` in format ``fmt`` into ``table (columns)`` under one engine lock."""
        head = f"INSERT INTO {table} ({', '.join(quote_identifier(c) for c in columns)})"
        if settings:
            head += f" SETTINGS {settings_sql(settings)}"
        with self._lease.locked(settings=_CHDB_INSERT_SETTINGS) as conn:
            _chdb_call(lambda: stream_insert(conn, head, fmt, payload))

    def close(self) -> None:
        self._lease.release()

    def __enter__(self) -> "ChdbBackend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def stream_insert(conn: Any, head: str, fmt: str, data: bytes) -> int:
    """Insert ``data`` (in ``fmt``) with chdb's streaming inserter; returns rows written.

    An unfinished insert is cancelled, so the connection stays usable after a bad payload.
    """
    with conn.send_insert(head, fmt) as inserter:
        if data:
            inserter.append(data)
        return inserter.finish().rows_written


def _chdb_call(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except RuntimeError as err:  # chdb raises RuntimeError / ChdbError(RuntimeError)
        raise engine_error(err) from err


# --------------------------------------------------------------------------- HTTP backend

_CLIENT_OPTIONS = {"compress", "connect_timeout", "send_receive_timeout", "query_retries", "verify",
                   "ca_cert", "client_name"}


def http_client_kwargs(url: str) -> dict[str, Any]:
    """``get_client`` keyword arguments for an http(s) URL; unknown query params are settings.

    >>> kw = http_client_kwargs("http://u:p%40ss@h:9000/metrics?compress=false&max_threads=2")
    >>> (kw["host"], kw["port"], kw["username"], kw["password"], kw["database"], kw["compress"])
    ('h', 9000, 'u', 'p@ss', 'metrics', 'false')
    >>> kw["settings"]
    {'max_threads': '2'}
    """
    parts = urlsplit(url)
    options: dict[str, Any] = {}
    settings: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        (options if key in _CLIENT_OPTIONS else settings)[key] = value
    return {
        "interface": parts.scheme,
        "host": parts.hostname or "localhost",
        "port": parts.port or (8443 if parts.scheme == "https" else 8123),
        "username": unquote(parts.username or "default"),
        "password": unquote(parts.password or ""),
        "database": unquote(parts.path.strip("/")) or "default",
        "settings": settings,
        **options,
    }


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions that caused it, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _transport_failure(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a network-level failure."""
    import urllib3.exceptions

    return any(isinstance(c, (urllib3.exceptions.HTTPError, OSError)) for c in _causes(err))


# ClickHouse's codes for credentials it refuses: UNKNOWN_USER, REQUIRED_PASSWORD,
# IP_ADDRESS_NOT_ALLOWED, ACCESS_DENIED, AUTHENTICATION_FAILED.
AUTHENTICATION_CODES = frozenset({192, 194, 195, 497, 516})
# getaddrinfo's "no such name" answers; EAI_AGAIN (a DNS server not answering now) stays transient.
# A handshake cut short by the peer (a server restarting) may succeed on the next try.
_TLS_CONNECTION_DROPPED = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
_UNKNOWN_HOST = frozenset({socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)})


def permanent_failure(err: BaseException, code: int | None) -> str | None:
    """Why retrying ``err`` cannot help (``"TLS failure"``…), or None when it may be transient.

    >>> import ssl
    >>> permanent_failure(ssl.SSLCertVerificationError("certificate verify failed"), None)
    'TLS failure (check the https:// URL, verify= and ca_cert=)'
    >>> permanent_failure(ConnectionRefusedError(111, "Connection refused"), None) is None
    True
    """
    if code in AUTHENTICATION_CODES:
        return "authentication failed (check the user and password in CLICKHOUSE_URL)"
    for cause in _causes(err):
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, _TLS_CONNECTION_DROPPED):
            return "TLS failure (check the https:// URL, verify= and ca_cert=)"
        if isinstance(cause, socket.gaierror) and cause.errno in _UNKNOWN_HOST:
            return "unknown host (check the host name in CLICKHOUSE_URL)"
    return None


def cc_error(err: Exception, where: str, secrets: Sequence[str] = ()) -> ClickHouseError:
    """Classify a clickhouse-connect failure: unreachable -> ``ClickHouseUnavailable``; an
    unknown host, TLS or credentials -> ``ClickHouseMisconfigured``; ``secrets`` are scrubbed.

    >>> from clickhouse_connect.driver.exceptions import DatabaseError
    >>> e = cc_error(DatabaseError("Received ClickHouse exception, code: 60, server response: "
    ...                            "Code: 60. DB::Exception: no table", code=60), "h")
    >>> (type(e).__name__, str(e), e.code)
    ('ClickHouseError', 'Code: 60. DB::Exception: no table', 60)
    """
    from clickhouse_connect.driver.exceptions import OperationalError, StreamFailureError

    code = getattr(err, "code", None)
    text = str(err)
    for secret in secrets:
        text = text.replace(secret, "<redacted>") if secret else text
    start = text.find("Code: ")
    message = text[start:].strip() if start >= 0 else text
    reason = permanent_failure(err, code)
    if reason is not None:
        return ClickHouseMisconfigured(f"ClickHouse at {where}: {reason}; not retried: {message}", code=code)
    if _transport_failure(err) or (isinstance(err, OperationalError) and not code):
        return ClickHouseUnavailable(f"ClickHouse at {where} unavailable: {text}", code=code)
    if isinstance(err, OperationalError) and not isinstance(err, StreamFailureError):
        return ClickHouseUnavailable(message, code=code)  # retryable HTTP status after retries
    return ClickHouseError(message, code=code)


class HttpBackend:
    """``http(s)://user:pass@host:port/db``: a ClickHouse server via clickhouse-connect.

    The client is created on first use (and again after a failed attempt), without an HTTP
    session so several threads can share it. Datetimes come back timezone-aware (UTC).
    """

    def __init__(self, url: str) -> None:
        self._kwargs = http_client_kwargs(url)
        self._where = f"{self._kwargs['interface']}://{self._kwargs['host']}:{self._kwargs['port']}"
        self._secrets = (self._kwargs["password"],) if self._kwargs["password"] else ()
        self._client: Any = None
        self._lock = threading.Lock()

    def _get_client(self) -> Any:
        import clickhouse_connect

        with self._lock:
            if self._client is None:
                try:
                    self._client = clickhouse_connect.get_client(
                        **self._kwargs, tz_mode="aware", autogenerate_session_id=False)
                except Exception as err:  # clickhouse-connect raises many types while connecting
                    raise cc_error(err, self._where, self._secrets) from err
            return self._client

    def _call(self, action: Callable[[Any], Any]) -> Any:
        from clickhouse_connect.driver.exceptions import Error

        client = self._get_client()
        try:
            return action(client)
        except (Error, OSError) as err:
            raise cc_error(err, self._where, self._secrets) from err

    def command(self, sql: str) -> None:
        self._call(lambda c: c.command(sql))

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        result = self._call(lambda c: c.query(sql))
        return list(result.column_names), [tuple(row) for row in result.result_rows]

    def text_rows(self, sql: str) -> list[tuple[str, ...]]:
        return self.query(sql)[1]

    def insert_json_each_row(self, table: str, columns: Sequence[str], payload: bytes,
                             settings: Mapping[str, str] | None = None) -> None:
        """Insert JSONEachRow ``payload``; optional per-insert ClickHouse ``settings``."""
        if not payload.strip():
            return
        self._call(lambda c: c.raw_insert(table, list(columns), insert_block=payload,
                                          settings=dict(settings or {}), fmt="JSONEachRow"))

    def insert_arrow(self, table: str, columns: Sequence[str], payload: bytes,
                     settings: Mapping[str, str] | None = None) -> None:
        """Insert an Arrow IPC stream ``payload``; optional per-insert ClickHouse ``settings``."""
        if not payload:
            return
        self._call(lambda c: c.raw_insert(table, list(columns), insert_block=payload,
                                          settings=dict(settings or {}), fmt="ArrowStream"))

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> "HttpBackend":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- discarding backend


class DiscardBackend:
    """``discard://``: takes every statement and insert, keeps nothing, answers every query empty.

    Only for measuring the flow without a ClickHouse (``tallyflow bench --scaling``).

        >>> backend = connect("discard://")
        >>> backend.insert_json_each_row("t", ("a",), b'{"a":1}\\n'); backend.query("SELECT 1")
        ([], [])
    """

    def command(self, sql: str) -> None:
        return None

    def query(self, sql: str) -> tuple[list[str], list[tuple]]:
        return [], []

    def text_rows(self, sql: str) -> list[tuple[str, ...]]:
        return []

    def insert_json_each_row(self, table: str, columns: Sequence[str], payload: bytes,
                             settings: Mapping[str, str] | None = None) -> None:
        return None

    def insert_arrow(self, table: str, columns: Sequence[str], payload: bytes,
                     settings: Mapping[str, str] | None = None) -> None:
        return None

    def close(self) -> None:
        return None
