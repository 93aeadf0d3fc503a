"""The dev ClickHouse server answers only its own clients: a password, loopback Host, no file()."""

from __future__ import annotations

import http.client
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from deploy.dev_clickhouse import DevClickHouseServer
from sinks.clickhouse_backend import ClickHouseError, ClickHouseMisconfigured, connect


def ask(server: DevClickHouseServer, sql: str, headers: dict[str, str] | None = None,
        path: str = "/") -> tuple[int, str, bytes]:
    """POST ``sql``; (status, exception code header, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("POST", path, sql.encode(), headers=headers or {})
        response = conn.getresponse()
        return response.status, response.getheader("X-ClickHouse-Exception-Code") or "", response.read()
    finally:
        conn.close()


def test_a_password_per_run_is_required_except_for_ping(dev_clickhouse, tmp_path):
    assert ask(dev_clickhouse, "SELECT 1")[:2] == (403, "516")
    wrong = {"X-ClickHouse-User": "default", "X-ClickHouse-Key": "guess"}
    assert ask(dev_clickhouse, "SELECT 1", wrong)[:2] == (403, "516")
    assert ask(dev_clickhouse, "SELECT 1", dev_clickhouse.auth_headers) == (200, "", b"1\n")
    params = urllib.parse.urlencode({"user": "default", "password": dev_clickhouse.password})
    assert ask(dev_clickhouse, "SELECT 2", path=f"/?{params}")[0] == 200
    with urllib.request.urlopen(f"{dev_clickhouse.base_url}/ping", timeout=30) as ping:  # no password
        assert ping.read() == b"Ok.\n"

    with DevClickHouseServer(dev_clickhouse.data_dir) as other:  # one engine per process: share it
        assert other.password != dev_clickhouse.password  # random per run
        assert dev_clickhouse.password in dev_clickhouse.url


def test_a_wrong_password_fails_fast_through_the_client(dev_clickhouse):
    wrong_url = dev_clickhouse.url.replace(dev_clickhouse.password, "not-the-password")
    with pytest.raises(ClickHouseMisconfigured, match="authentication failed") as err:
        connect(wrong_url).query("SELECT 1")
    assert "not-the-password" not in str(err.value)
    with connect(dev_clickhouse.url) as ch:
        assert ch.query("SELECT 1 AS one") == (["one"], [(1,)])


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8123", "10.0.0.1:8123", ""])
def test_only_loopback_host_headers_are_served(dev_clickhouse, host):
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 still sends its own name."""
    conn = http.client.HTTPConnection("127.0.0.1", dev_clickhouse.port, timeout=30)
    try:
        conn.putrequest("GET", "/ping", skip_host=True)
        if host:
            conn.putheader("Host", host)
        for name, value in dev_clickhouse.auth_headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        assert (response.status, response.getheader("X-ClickHouse-Exception-Code")) == (403, "497")
        assert b"Ok." not in response.read()
    finally:
        conn.close()
    for loopback in (f"localhost:{dev_clickhouse.port}", f"127.0.0.1:{dev_clickhouse.port}"):
        assert ask(dev_clickhouse, "SELECT 1", {**dev_clickhouse.auth_headers, "Host": loopback})[0] == 200


def test_sql_cannot_read_or_write_files_or_reach_the_network(dev_clickhouse, tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the content of a private file\n")
    target = tmp_path / "written.txt"
    attempts = [
        f"SELECT * FROM file('{secret}', 'LineAsString')",
        f"SELECT * FROM `file`('{secret}', 'LineAsString')",
        f"select * from FILE /* a comment */ ('{secret}', 'LineAsString')",
        f"SELECT file('{secret}')",
        f"INSERT INTO FUNCTION file('{target}', 'LineAsString') SELECT 'x'",
        f"SELECT 'x' INTO OUTFILE '{target}'",
        f"CREATE TABLE leak (line String) ENGINE = File(LineAsString, '{secret}')",
        "SELECT * FROM url('http://127.0.0.1:1/', 'LineAsString')",
        "SYSTEM SHUTDOWN",
    ]
    for sql in attempts:
        status, code, body = ask(dev_clickhouse, sql, dev_clickhouse.auth_headers)
        assert (status, code) == (403, "497"), (sql, body)
        assert b"private file" not in body
    assert not target.exists()
    # The same through clickhouse-connect, and the data directory's own tables still work.
    with connect(dev_clickhouse.url) as ch:
        with pytest.raises(ClickHouseError) as refused:
            ch.query(f"SELECT * FROM file('{secret}', 'LineAsString')")
        assert refused.value.code == 497 and "refuses file()" in str(refused.value)
        ch.command("CREATE TABLE notes (line String) ENGINE = MergeTree ORDER BY line")
        ch.command("INSERT INTO notes SELECT 'about file( and url(' ")  # words in a string are data
        assert ch.query("SELECT line FROM notes")[1] == [("about file( and url(",)]
