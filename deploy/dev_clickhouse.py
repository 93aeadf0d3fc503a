"""``tallyflow dev-clickhouse``: a LOCAL STAND-IN for a ClickHouse server, for tests and laptops.

NOT FOR PRODUCTION. It serves enough of ClickHouse's HTTP interface over the embedded chdb
engine for clickhouse-connect 1.12 (and curl) to work against a data directory:

* ``GET /ping`` -> ``Ok.``; queries from the ``query`` URL parameter, the POST body, or both
  (parameter, newline, body, as ClickHouse joins them);
* results in the format the query names (``FORMAT Native``, ``JSON…``, ``TabSeparated…``) or
  else ``default_format`` (default ``TabSeparated``); DDL and other statements;
* inserts ``INSERT INTO t (cols) [SETTINGS …] FORMAT <fmt>`` followed by the data in any
  streamable input format (Native, RowBinary, JSONEachRow, CSV…), chunked or not;
* engine settings as URL parameters (applied with SET on a connection cached per database and
  settings; HTTP-interface parameters such as ``session_id``, ``query_id``, ``compress``,
  ``wait_end_of_query`` are dropped), ``param_<name>`` query parameters, ``database``;
* request bodies with ``Content-Encoding`` gzip, deflate, zstd or lz4 (clickhouse-connect
  compresses inserts with lz4 by default); responses compressed as ClickHouse does when
  ``enable_http_compression`` is on (chdb reports it on by default, so clickhouse-connect
  does not send it) and ``Accept-Encoding`` lists lz4, zstd, gzip or deflate (the first listed
  wins; clickhouse-connect asks for lz4); ``enable_http_compression=0`` turns it off;
* errors as ClickHouse reports them: ``Code: N. DB::Exception: …`` body, the
  ``X-ClickHouse-Exception-Code`` header, a 4xx/5xx status.

Guarded (``deploy.dev_clickhouse_guard``): the user ``default`` with a random password per run
(:attr:`DevClickHouseServer.url` carries it; ``DEV_CLICKHOUSE_PASSWORD`` picks one for the CLI),
loopback ``Host`` headers only (a DNS-rebinding defence), and no SQL that reads or writes files
or reaches the network (``file()``, ``url()``, ``INTO OUTFILE``, the File engine, ``SYSTEM``…):
the engine's local mode would let ``file()`` touch any path, so the server refuses them all
(Code 497, ACCESS_DENIED). ``/ping`` needs no password.

Not provided: users other than ``default``, HTTP sessions (``SET``/``USE`` statements are checked but do not persist: pass
settings as URL parameters), ClickHouse's own ``compress=1``/``decompress=1`` block format,
multipart external data, progress headers. Requests run one at a time (chdb is one engine per
process, serialised by one lock) and request bodies are read whole into memory.

    >>> import tempfile, urllib.request
    >>> with tempfile.TemporaryDirectory() as tmp, DevClickHouseServer(tmp) as server:
    ...     ask = urllib.request.Request(server.base_url + "/?query=SELECT%20version()",
    ...                                  headers=server.auth_headers)
    ...     urllib.request.urlopen(ask).read()
    b'26.9.2.1\\n'
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, Mapping, Sequence
from urllib.parse import parse_qsl

from deploy.dev_clickhouse_guard import (
    DEV_USER,
    LOOPBACK_HOSTS,
    authorized,
    host_allowed,
    new_password,
    refused_access,
)
from sinks.clickhouse_backend import ChdbEngineLease, ClickHouseError, engine_error, stream_insert

log = logging.getLogger(__name__)

PRODUCTION_WARNING = "local stand-in for tests and laptops, NOT for production"

# URL parameters that belong to the HTTP interface, not to the engine (never passed to chdb).
HTTP_INTERFACE_PARAMS = frozenset({
    "query", "database", "default_format", "user", "password", "quota_key", "query_id",
    "session_id", "session_timeout", "session_check", "close_session", "compress", "decompress",
    "buffer_size", "wait_end_of_query", "client_protocol_version", "stacktrace", "role",
    "send_progress_in_http_headers", "http_headers_progress_interval_ms",
    "cancel_http_readonly_queries_on_client_close", "enable_http_compression",
    "http_zlib_compression_level", "http_native_compression_disable_checksumming_on_decompress",
    "http_response_buffer_size", "http_wait_end_of_query", "_",
})
_PARAM_PREFIX = "param_"
_INSERT_RE = re.compile(rb"\s*(INSERT\s+INTO\s.+?)\s+FORMAT\s+([A-Za-z0-9_]+)[ \t]*(?:\r?\n)?",
                        re.IGNORECASE | re.DOTALL)
_INLINE_DATA_RE = re.compile(rb"\b(VALUES|SELECT|WITH)\b", re.IGNORECASE)
_TRAILING_FORMAT_RE = re.compile(r"\bFORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
_SESSION_STATEMENT_RE = re.compile(r"\s*(SET|USE)\b", re.IGNORECASE)
_RESULT_STATEMENT_RE = re.compile(r"\s*(\(|SELECT|WITH|SHOW|DESC|DESCRIBE|EXPLAIN|EXISTS|CHECK)\b",
                                  re.IGNORECASE)
_NOT_CLICKHOUSE_FORMATS = {"arrowtable", "dataframe", "datastore"}  # chdb Python-only formats
# Modelled on ClickHouse's exception-code -> HTTP status mapping; anything else is 500.
_HTTP_STATUS = {6: 400, 26: 400, 27: 400, 32: 400, 36: 400, 38: 400, 41: 400, 42: 400, 43: 400,
                53: 400, 62: 400, 73: 400, 115: 400, 271: 400,
                46: 404, 47: 404, 60: 404, 81: 404, 48: 501, 497: 403, 516: 403}
_CONTENT_TYPES = {"Native": "application/octet-stream", "RowBinary": "application/octet-stream",
                  "Parquet": "application/octet-stream", "Arrow": "application/octet-stream",
                  "CSV": "text/csv; charset=UTF-8; header=absent"}
_UNKNOWN_ERROR = 1001  # ClickHouse's STD_EXCEPTION
ACCESS_DENIED, AUTHENTICATION_FAILED = 497, 516


@dataclass(frozen=True)
class HttpQuery:
    """One request, decoded: the statement text, where and how to run it."""

    sql: bytes
    database: str = "default"
    settings: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    default_format: str = "TabSeparated"
    query_id: str = ""


@dataclass
class Reply:
    """What goes back: status, body, the result format (None for statements), summary."""

    status: int = 200
    body: bytes = b""
    fmt: str | None = None
    summary: dict[str, str] = field(default_factory=dict)
    exception_code: int | None = None


def parse_request(url_query: str, body: bytes, database_header: str | None = None) -> HttpQuery:
    """Split URL parameters into engine settings, query parameters and interface knobs.

    >>> q = parse_request("query=SELECT%20{n:UInt8}&param_n=3&max_threads=2&session_id=x", b"")
    >>> (q.sql, dict(q.settings), dict(q.params))
    (b'SELECT {n:UInt8}', {'max_threads': '2'}, {'n': '3'})
    """
    url_params = dict(parse_qsl(url_query, keep_blank_values=True))
    query_param = url_params.get("query", "").encode()
    sql = query_param + b"\n" + body if query_param and body else query_param or body
    return HttpQuery(
        sql=sql,
        database=url_params.get("database") or database_header or "default",
        settings={k: v for k, v in url_params.items()
                  if k not in HTTP_INTERFACE_PARAMS and not k.startswith(_PARAM_PREFIX)},
        params={k[len(_PARAM_PREFIX):]: v for k, v in url_params.items() if k.startswith(_PARAM_PREFIX)},
        default_format=url_params.get("default_format") or "TabSeparated",
        query_id=url_params.get("query_id") or str(uuid.uuid4()),
    )


def split_insert(sql: bytes) -> tuple[str, str, bytes] | None:
    """``INSERT INTO t (a) FORMAT JSONEachRow\\n<data>`` -> (head, format, data); else None.

    >>> split_insert(b'INSERT INTO t (a) FORMAT JSONEachRow\\n{"a":1}\\n')
    ('INSERT INTO t (a)', 'JSONEachRow', b'{"a":1}\\n')
    >>> split_insert(b"INSERT INTO t VALUES (1)") is None
    True
    """
    match = _INSERT_RE.match(sql)
    if match is None or _INLINE_DATA_RE.search(match.group(1)):
        return None
    return match.group(1).decode(), match.group(2).decode(), sql[match.end():]


def result_format(sql: str, default_format: str) -> str:
    """The output format: a trailing ``FORMAT x`` clause wins over ``default_format``.

    >>> result_format("SELECT 1 FORMAT Native", "TabSeparated"), result_format("SELECT 1", "JSON")
    ('Native', 'JSON')
    """
    match = _TRAILING_FORMAT_RE.search(sql)
    return match.group(1) if match else default_format


def execute(lease: ChdbEngineLease, q: HttpQuery) -> Reply:
    """Run one request on the engine; engine failures raise ``ClickHouseError``."""
    started = time.perf_counter()
    insert = split_insert(q.sql)
    _refuse_files_and_network(insert[0] if insert else q.sql.decode(errors="replace"), q.settings)
    try:
        if insert is not None:
            return _insert(lease, q, *insert)
        return _query(lease, q)
    except RuntimeError as err:  # chdb's ChdbError and RuntimeError
        if isinstance(err, ClickHouseError):
            raise
        raise engine_error(err) from err
    finally:
        log.debug("dev-clickhouse request", extra={
            "query_id": q.query_id, "sql": q.sql[:160].decode(errors="replace"),
            "elapsed_ms": round((time.perf_counter() - started) * 1000, 2)})


def _refuse_files_and_network(statement: str, settings: Mapping[str, str]) -> None:
    refused = refused_access(statement, settings)
    if refused is not None:
        raise ClickHouseError(
            f"Code: {ACCESS_DENIED}. DB::Exception: the dev server refuses {refused}: it reads or writes "
            "files or reaches the network, and the server serves its data directory only. (ACCESS_DENIED)",
            code=ACCESS_DENIED)


def _insert(lease: ChdbEngineLease, q: HttpQuery, head: str, fmt: str, data: bytes) -> Reply:
    started = time.perf_counter()
    with lease.locked(q.database, q.settings) as conn:
        rows = stream_insert(conn, head, fmt, data)
    return Reply(summary=_summary(written_rows=rows, written_bytes=len(data), started=started))


def _query(lease: ChdbEngineLease, q: HttpQuery) -> Reply:
    try:
        sql = q.sql.decode()
    except UnicodeDecodeError as err:
        raise ClickHouseError("Code: 62. DB::Exception: query is not valid UTF-8 (SYNTAX_ERROR)",
                              code=62) from err
    if not sql.strip():
        raise ClickHouseError("Code: 62. DB::Exception: Empty query. (SYNTAX_ERROR)", code=62)
    fmt = result_format(sql, q.default_format)
    if fmt.lower() in _NOT_CLICKHOUSE_FORMATS:
        raise ClickHouseError(f"Code: 73. DB::Exception: Unknown format {fmt}. (UNKNOWN_FORMAT)", code=73)
    started = time.perf_counter()
    session_statement = _SESSION_STATEMENT_RE.match(sql) is not None
    locked = lease.locked_scratch if session_statement else lease.locked
    with locked(q.database, q.settings) as conn:
        result = conn.query(sql, fmt, params=dict(q.params))
        body = result.bytes() or b""
        summary = _summary(read_rows=result.rows_read(), read_bytes=result.bytes_read(), started=started)
    produces_result = bool(body) or _RESULT_STATEMENT_RE.match(sql) is not None
    return Reply(body=body, fmt=fmt if produces_result else None, summary=summary)


def _summary(started: float, **counts: int) -> dict[str, str]:
    summary = {name: str(value) for name, value in counts.items()}
    summary["elapsed_ns"] = str(int((time.perf_counter() - started) * 1e9))
    return summary


def error_reply(err: ClickHouseError) -> Reply:
    """ClickHouse's error response for ``err``.

    >>> r = error_reply(ClickHouseError("Code: 60. DB::Exception: Table x does not exist.", code=60))
    >>> (r.status, r.exception_code, r.body)
    (404, 60, b'Code: 60. DB::Exception: Table x does not exist.\\n')
    """
    code = err.code or _UNKNOWN_ERROR
    text = str(err).strip()
    if not text.startswith("Code: "):
        text = f"Code: {code}. DB::Exception: {text}"
    return Reply(status=_HTTP_STATUS.get(code, 500), body=(text + "\n").encode(), exception_code=code)


# --------------------------------------------------------------------------- compression

def _zstd() -> Any:
    try:
        from compression import zstd  # type: ignore[import-not-found]  # Python 3.14+
    except ImportError:
        from backports import zstd  # type: ignore[no-redef]  # installed with clickhouse-connect
    return zstd


def _lz4_decompress_frames(data: bytes) -> bytes:
    """Decompress concatenated LZ4 frames (clickhouse-connect sends one frame per block)."""
    import lz4.frame

    parts = []
    while data:
        decompressor = lz4.frame.LZ4FrameDecompressor()
        parts.append(decompressor.decompress(data))
        if not decompressor.eof:
            raise ClickHouseError("Code: 271. DB::Exception: truncated lz4 body (CANNOT_DECOMPRESS)", code=271)
        data = decompressor.unused_data
    return b"".join(parts)


def decode_body(body: bytes, content_encoding: str | None) -> bytes:
    """Undo ``Content-Encoding`` (gzip, deflate, zstd, lz4, identity).

    >>> decode_body(gzip.compress(b"SELECT 1"), "gzip")
    b'SELECT 1'
    """
    encoding = (content_encoding or "").strip().lower()
    try:
        if encoding in ("", "identity"):
            return body
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding == "zstd":
            return _zstd().decompress(body)
        if encoding == "lz4":
            return _lz4_decompress_frames(body)
    except (OSError, EOFError, zlib.error, RuntimeError, ValueError) as err:
        if isinstance(err, ClickHouseError):
            raise
        raise ClickHouseError(f"Code: 271. DB::Exception: cannot decompress {encoding} body: {err} "
                              "(CANNOT_DECOMPRESS)", code=271) from err
    raise ClickHouseError(f"Code: 36. DB::Exception: Unknown Content-Encoding {encoding!r} (BAD_ARGUMENTS)",
                          code=36)


def response_encoding(accept_encoding: str | None, url_query: str, enabled_by_default: bool) -> str | None:
    """The encoding to compress a response with, or None.

    ClickHouse compresses when ``enable_http_compression`` is on (the URL parameter, else the
    server's setting, which chdb reports as 1) and ``Accept-Encoding`` names a method.

    >>> response_encoding("lz4,zstd,gzip", "", True), response_encoding("gzip", "enable_http_compression=0", True)
    ('lz4', None)
    """
    flag = dict(parse_qsl(url_query)).get("enable_http_compression")
    enabled = enabled_by_default if flag is None else flag.lower() in ("1", "true")
    if not enabled:
        return None
    for token in (accept_encoding or "").split(","):
        name = token.split(";")[0].strip().lower()
        if name in ("lz4", "zstd", "gzip", "deflate"):
            return name
    return None


def encode_body(body: bytes, encoding: str) -> bytes:
    """Compress a response body with ``encoding`` (one of ``response_encoding``'s answers)."""
    if encoding == "gzip":
        return gzip.compress(body, compresslevel=1)
    if encoding == "deflate":
        return zlib.compress(body, 1)
    if encoding == "zstd":
        return _zstd().compress(body)
    import lz4.frame

    return lz4.frame.compress(body)


# --------------------------------------------------------------------------- HTTP plumbing

def read_chunked(stream: BinaryIO) -> bytes:
    """Read a ``Transfer-Encoding: chunked`` body (trailers are skipped).

    >>> import io
    >>> read_chunked(io.BytesIO(b"3\\r\\nabc\\r\\n2;x=y\\r\\nde\\r\\n0\\r\\n\\r\\n"))
    b'abcde'
    """
    parts = []
    while True:
        size_line = stream.readline(65537)
        if not size_line:
            raise ValueError("chunked body ended early")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            while stream.readline(65537) not in (b"\r\n", b"\n", b""):
                continue
            return b"".join(parts)
        chunk = stream.read(size)
        if len(chunk) != size:
            raise ValueError("chunked body ended early")
        parts.append(chunk)
        stream.readline(65537)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "tallyflow-dev-clickhouse"
    timeout = 120  # idle keep-alive connections are closed after this many seconds
    server: "_HttpServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path, _, url_query = self.path.partition("?")
        if not self._admitted(url_query, needs_password=path != "/ping"):
            return
        if path == "/ping" or (path in ("", "/") and "query" not in dict(parse_qsl(url_query))):
            self._send(Reply(body=b"Ok.\n"), None)
        elif path in ("", "/"):
            self._serve(url_query, b"")
        else:
            self._send(error_reply(ClickHouseError(f"There is no handler for {path}", code=_UNKNOWN_ERROR)), None)

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        path, _, url_query = self.path.partition("?")
        try:
            raw = self._read_body()
        except ValueError as err:
            self.close_connection = True
            self._send(error_reply(ClickHouseError(f"bad request body: {err}", code=_UNKNOWN_ERROR)), None)
            return
        if not self._admitted(url_query, needs_password=True):
            return
        if path not in ("", "/"):
            self._send(error_reply(ClickHouseError(f"There is no handler for {path}", code=_UNKNOWN_ERROR)), None)
            return
        self._serve(url_query, raw)

    def _admitted(self, url_query: str, *, needs_password: bool) -> bool:
        """A loopback Host header, and the password unless ``needs_password`` is False."""
        if not host_allowed(self.headers.get("Host"), self.server.allowed_hosts):
            self.close_connection = True
            refusal = ClickHouseError(f"Host header {self.headers.get('Host')!r} is not this server's "
                                      "(loopback only: DNS-rebinding defence)", code=ACCESS_DENIED)
        elif needs_password and not authorized(self.headers, dict(parse_qsl(url_query)), self.server.password):
            refusal = ClickHouseError(f"Code: {AUTHENTICATION_FAILED}. DB::Exception: {DEV_USER}: Authentication "
                                      "failed: password is incorrect, or there is no user with such name. "
                                      "(AUTHENTICATION_FAILED)", code=AUTHENTICATION_FAILED)
        else:
            return True
        self._send(error_reply(refusal), None)
        return False

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return read_chunked(self.rfile)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _serve(self, url_query: str, raw: bytes) -> None:
        encoding = response_encoding(self.headers.get("Accept-Encoding"), url_query,
                                     self.server.http_compression)
        try:
            if "multipart/form-data" in self.headers.get("Content-Type", ""):
                raise ClickHouseError("Code: 48. DB::Exception: multipart requests (external data) are "
                                      "not supported by the dev server (NOT_IMPLEMENTED)", code=48)
            if dict(parse_qsl(url_query)).get("decompress", "0") not in ("0", "false"):
                raise ClickHouseError("Code: 48. DB::Exception: decompress=1 (ClickHouse block compression) "
                                      "is not supported by the dev server (NOT_IMPLEMENTED)", code=48)
            body = decode_body(raw, self.headers.get("Content-Encoding"))
            query = parse_request(url_query, body, self.headers.get("X-ClickHouse-Database"))
            reply = execute(self.server.lease, query)
        except ClickHouseError as err:
            reply = error_reply(err)
        except Exception as err:  # the request boundary: report it as ClickHouse would, keep serving
            log.exception("dev-clickhouse request failed")
            reply = error_reply(ClickHouseError(f"{type(err).__name__}: {err}", code=_UNKNOWN_ERROR))
        self._send(reply, encoding)

    def _send(self, reply: Reply, encoding: str | None) -> None:
        body = reply.body
        self.send_response(reply.status)
        if encoding and body:
            body = encode_body(body, encoding)
            self.send_header("Content-Encoding", encoding)
        fmt = reply.fmt
        content_type = _CONTENT_TYPES.get(fmt or "", "application/json; charset=UTF-8"
                                          if (fmt or "").startswith("JSON") else "text/plain; charset=UTF-8")
        self.send_header("Content-Type", content_type)
        self.send_header("X-ClickHouse-Server-Display-Name", "tallyflow-dev-clickhouse")
        self.send_header("X-ClickHouse-Timezone", self.server.timezone_name)
        self.send_header("X-ClickHouse-Summary", json.dumps(reply.summary))
        if fmt:
            self.send_header("X-ClickHouse-Format", fmt)
        if reply.exception_code is not None:
            self.send_header("X-ClickHouse-Exception-Code", str(reply.exception_code))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server signature)
        log.debug("dev-clickhouse http: " + format, *args)


class _HttpServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its client sockets, so ``stop`` can close them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], lease: ChdbEngineLease, timezone_name: str,
                 http_compression: bool, password: str, allowed_hosts: frozenset[str]) -> None:
        super().__init__(address, _Handler)
        self.password = password
        self.allowed_hosts = allowed_hosts
        self.lease = lease
        self.timezone_name = timezone_name
        self.http_compression = http_compression
        self._clients: set[socket.socket] = set()
        self._clients_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._clients_lock:
            self._clients.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._clients_lock:
            self._clients.discard(request)
        super().shutdown_request(request)

    def close_clients(self) -> None:
        with self._clients_lock:
            clients = list(self._clients)
        for sock in clients:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as err:  # already closed by the peer
                log.debug("client socket already closed", extra={"error": str(err)})

    def handle_error(self, request: Any, client_address: Any) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, (ConnectionError, TimeoutError)):
            log.debug("client connection dropped", extra={"client": str(client_address), "error": str(err)})
        else:
            log.error("dev-clickhouse connection failed", exc_info=err)


class DevClickHouseServer:
    """The stand-in server on ``data_dir``, in a background thread (port 0 picks a free port).

    ``password`` defaults to a new random one; give the same one to a restart on the same port
    so that running clients keep working.

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, DevClickHouseServer(tmp, password="pw") as server:
        ...     server.url.startswith("http://default:pw@127.0.0.1:") and server.url.endswith("/default")
        True
    """

    def __init__(self, data_dir: str, host: str = "127.0.0.1", port: int = 0,
                 password: str | None = None) -> None:
        self.data_dir = data_dir
        self.host = host
        self.password = password or new_password()
        wildcard = host in ("", "0.0.0.0", "::")
        self.allowed_hosts = LOOPBACK_HOSTS if wildcard else LOOPBACK_HOSTS | {host.lower()}
        self._requested_port = port
        self._lease: ChdbEngineLease | None = None
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "DevClickHouseServer":
        """Open the engine, bind the port and serve in a daemon thread."""
        if self._httpd is not None:
            return self
        lease = ChdbEngineLease.acquire(self.data_dir)
        try:
            with lease.locked() as conn:
                probe = "SELECT version(), timezone(), getSetting('enable_http_compression')"
                version, tz, compression = conn.query(probe, "TabSeparated").bytes().decode().split()
            httpd = _HttpServer((self.host, self._requested_port), lease, tz, compression in ("1", "true"),
                                self.password, self.allowed_hosts)
        except BaseException:
            lease.release()
            raise
        self._lease, self._httpd = lease, httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                         name="dev-clickhouse", daemon=True)
        self._thread.start()
        log.warning("dev ClickHouse listening on %s: %s", self.base_url, PRODUCTION_WARNING,
                    extra={"data_dir": lease.path, "engine_version": version})
        return self

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("dev server not started")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The ``http://default:PASSWORD@127.0.0.1:PORT/default`` URL for ``clickhouse_backend.connect``."""
        return dev_url(self.host, self.port, self.password)

    @property
    def auth_headers(self) -> dict[str, str]:
        """ClickHouse's credential headers, for plain HTTP clients (curl, urllib)."""
        return {"X-ClickHouse-User": DEV_USER, "X-ClickHouse-Key": self.password}

    def wait(self) -> None:
        """Block until the server stops."""
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        """Stop serving, drop client connections, then close the engine (idempotent)."""
        httpd, lease, thread = self._httpd, self._lease, self._thread
        self._httpd = self._lease = self._thread = None
        if httpd is None or lease is None:
            return
        httpd.shutdown()
        httpd.close_clients()
        httpd.server_close()
        if thread is not None:
            thread.join(5)
        lease.release()  # waits for a request still inside the engine
        log.info("dev ClickHouse stopped", extra={"data_dir": lease.path})

    def __enter__(self) -> "DevClickHouseServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve(data_dir: str, host: str = "127.0.0.1", port: int = 8123, password: str | None = None) -> None:
    """Run the stand-in server until Ctrl-C or SIGTERM (blocking)."""
    server = DevClickHouseServer(data_dir, host, port, password).start()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        server.wait()
    except KeyboardInterrupt:
        log.info("dev ClickHouse interrupted")
    finally:
        server.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line, the same flags as ``tallyflow dev-clickhouse [--data DIR] [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(prog="tallyflow dev-clickhouse",
                                     description=f"ClickHouse HTTP interface over chdb: {PRODUCTION_WARNING}.")
    parser.add_argument("--data", default="var/clickhouse", help="data directory (default var/clickhouse)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (keep it loopback)")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    password = dev_password()
    print(f"CLICKHOUSE_URL={dev_url(args.host, args.port, password)}", flush=True)
    serve(args.data, args.host, args.port, password)
    return 0


def dev_password() -> str:
    """``DEV_CLICKHOUSE_PASSWORD`` when set (a script that starts the server picks it), else random."""
    return os.environ.get("DEV_CLICKHOUSE_PASSWORD", "").strip() or new_password()


def dev_url(host: str, port: int, password: str) -> str:
    """The URL a client of the server on ``host:port`` uses.

    >>> dev_url("127.0.0.1", 8123, "pw")
    'http://default:pw@127.0.0.1:8123/default'
    """
    return f"http://{DEV_USER}:{password}@{host}:{port}/default"


if __name__ == "__main__":
    sys.exit(main())
