"""What keeps the dev ClickHouse server from being a door into the machine it runs on.

The server runs the embedded engine with the rights of whoever started it, and the engine's
local mode lets ``file()`` read and write anywhere. Three locks, checked on every request:

1. **A loopback Host header** (DNS-rebinding defence: a web page whose name now points at
   127.0.0.1 still sends its own name)::

    >>> host_allowed("127.0.0.1:8123", LOOPBACK_HOSTS), host_allowed("evil.example:8123", LOOPBACK_HOSTS)
    (True, False)

2. **A password**, random per run unless the caller picks one, sent the ways ClickHouse takes it
   (HTTP Basic, ``X-ClickHouse-User``/``X-ClickHouse-Key``, or ``user``/``password`` parameters)::

    >>> credentials({"Authorization": "Basic ZGVmYXVsdDpwdw=="}, {})
    ('default', 'pw')

3. **No files, no network from SQL:** table functions, engines and clauses that read or write
   files or reach other hosts are refused before the engine sees them::

    >>> refused_access("SELECT * FROM file('/etc/passwd', 'LineAsString')")
    'file()'
    >>> refused_access("SELECT 'file(' AS text -- file(")
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from typing import Mapping

DEV_USER = "default"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# Lower-case names that, called like a function, reach files or other hosts: table functions,
# table engines, dictionary sources and the scalar file(). The engine is the whole process.
FILE_OR_NETWORK = frozenset({
    "file", "filecluster", "filelog", "url", "urlcluster", "http", "s3", "s3cluster", "s3queue",
    "gcs", "cosn", "oss", "azureblobstorage", "azureblobstoragecluster", "azurequeue", "hdfs",
    "hdfscluster", "hive", "remote", "remotesecure", "cluster", "clusterallreplicas", "clickhouse",
    "mysql", "postgresql", "materializedpostgresql", "sqlite", "mongodb", "redis", "cassandra", "jdbc",
    "odbc", "executable", "executablepool", "iceberg", "icebergs3", "icebergazure", "iceberghdfs",
    "icebergcluster", "deltalake", "deltalakecluster", "hudi", "hudicluster", "kafka", "rabbitmq",
    "nats", "arrowflight", "ytsaurus", "python", "distributed",
})
# Statements that act on the server rather than on data.
_SERVER_STATEMENTS = re.compile(r"^\s*(SYSTEM|BACKUP|RESTORE|ATTACH|KILL|INSTALL)\b", re.IGNORECASE)
_CLAUSES = re.compile(r"\b(INTO\s+OUTFILE|FROM\s+INFILE)\b", re.IGNORECASE)
# Settings that name files the engine then reads.
FILE_SETTINGS = frozenset({"format_schema", "format_template_resultset", "format_template_row",
                           "format_template_row_format", "format_schema_source"})
_LEXEME = re.compile(r"""
    (?P<comment>--[^\n]*|\#[^\n]*|/\*.*?\*/)
  | (?P<string>'(?:[^'\\]|\\.|'')*')
  | (?P<quoted>`(?:[^`\\]|\\.|``)*`|"(?:[^"\\]|\\.|"")*")
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<open>\()
  | (?P<other>[^\sA-Za-z_('"`\#\-/]+|-|/)
  | (?P<space>\s+)
""", re.VERBOSE | re.DOTALL)


def new_password() -> str:
    """A fresh random password (URL-safe, so it sits in a URL as is)."""
    return secrets.token_urlsafe(18)


def host_allowed(host_header: str | None, allowed: frozenset[str]) -> bool:
    """Whether the ``Host`` header names an allowed host (any port).

    >>> host_allowed("[::1]:8123", LOOPBACK_HOSTS), host_allowed(None, LOOPBACK_HOSTS)
    (True, False)
    """
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in allowed


def credentials(headers: Mapping[str, str], url_params: Mapping[str, str]) -> tuple[str, str] | None:
    """The ``(user, password)`` a request presents, or None when it presents none."""
    authorization = headers.get("Authorization") or ""
    if authorization[:6].lower() == "basic ":
        try:
            user, _, password = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user, password
    if headers.get("X-ClickHouse-User") is not None or headers.get("X-ClickHouse-Key") is not None:
        return headers.get("X-ClickHouse-User") or DEV_USER, headers.get("X-ClickHouse-Key") or ""
    if "user" in url_params or "password" in url_params:
        return url_params.get("user") or DEV_USER, url_params.get("password") or ""
    return None


def authorized(headers: Mapping[str, str], url_params: Mapping[str, str], password: str) -> bool:
    """Whether the request presents user ``default`` and ``password`` (compared in constant time).

    >>> authorized({"X-ClickHouse-User": "default", "X-ClickHouse-Key": "pw"}, {}, "pw")
    True
    >>> authorized({}, {"password": "guess"}, "pw"), authorized({}, {}, "pw")
    (False, False)
    """
    presented = credentials(headers, url_params)
    if presented is None:
        return False
    user, given = presented
    return user == DEV_USER and hmac.compare_digest(given.encode(), password.encode())


def refused_access(sql: str, settings: Mapping[str, str] | None = None) -> str | None:
    """What in ``sql`` (or its URL ``settings``) would touch files or the network, else None.

    String literals and comments are skipped; quoted identifiers count as names.

    >>> refused_access("INSERT INTO FUNCTION url('http://x', CSV) SELECT 1")
    'url()'
    >>> refused_access("CREATE TABLE t (n UInt8) ENGINE = File(TSV)")
    'File()'
    >>> refused_access("SELECT 1 INTO OUTFILE 'x'"), refused_access("SYSTEM SHUTDOWN")
    ('INTO OUTFILE', 'SYSTEM')
    >>> refused_access("SELECT count() FROM usage_aggregates FINAL WHERE code = 'file'")
    >>> refused_access("SELECT 1", {"format_schema": "/etc/x:M"})
    'format_schema'
    """
    for name in settings or {}:
        if name.lower() in FILE_SETTINGS:
            return name
    words: list[tuple[str, str]] = []  # (kind, text) of the meaningful lexemes
    for match in _LEXEME.finditer(sql):
        kind = match.lastgroup
        if kind in ("comment", "space"):
            continue
        text = match.group()
        if kind == "quoted":
            kind, text = "word", text[1:-1]
        words.append((kind or "other", text))
    plain = " ".join("''" if kind == "string" else text for kind, text in words)
    statement = _SERVER_STATEMENTS.match(plain)
    if statement:
        return statement.group(1).upper()
    clause = _CLAUSES.search(plain)
    if clause:
        return " ".join(clause.group(1).upper().split())
    for (kind, text), (next_kind, _) in zip(words, words[1:]):
        if kind == "word" and next_kind == "open" and text.lower() in FILE_OR_NETWORK:
            return f"{text}()"
        if kind == "word" and text.lower() in FILE_SETTINGS:
            return text
    return None
