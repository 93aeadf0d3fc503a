"""Both ClickHouse backends on the real engine, and clickhouse-connect against the dev server.

No mocks: ``chdb://`` runs the engine in this process, ``http://`` goes through the dev server
(the same engine behind ClickHouse's HTTP interface). Fixtures ``chdb_url``, ``dev_clickhouse``
and ``clickhouse_url`` come from ``tests/support/clickhouse.py`` (loaded by ``tests/conftest.py``).
"""

from __future__ import annotations

import http.client
import json
import struct
import threading
import urllib.error
import urllib.request
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Iterator

import clickhouse_connect
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from deploy.dev_clickhouse import DevClickHouseServer
from sinks.clickhouse_backend import (
    ClickHouseBackend,
    ClickHouseError,
    ClickHouseUnavailable,
    connect,
    open_chdb_engines,
)

pytestmark = pytest.mark.integration

UTC = timezone.utc
DDL = """
    CREATE TABLE usage (
        key String,
        total Decimal(38, 18),
        window_start DateTime64(3, 'UTC'),
        version UInt64
    ) ENGINE = ReplacingMergeTree(version) ORDER BY key
"""
COLUMNS = ("key", "total", "window_start", "version")
UINT64_MAX = 2**64 - 1


def json_rows(*rows: tuple[str, str, str, int]) -> bytes:
    """JSONEachRow as the sink writes it: decimals and DateTime64 as strings."""
    return b"".join(json.dumps(dict(zip(COLUMNS, row))).encode() + b"\n" for row in rows)


@pytest.fixture
def backend(clickhouse_url: str) -> Iterator[ClickHouseBackend]:
    opened = connect(clickhouse_url)
    try:
        opened.command(DDL)
        yield opened
    finally:
        opened.close()


def test_exact_decimals_datetimes_and_uint64_round_trip(backend: ClickHouseBackend) -> None:
    backend.insert_json_each_row("usage", COLUMNS, json_rows(
        ("big", "12345678901234567890.123456789012345678", "2026-01-01 00:00:00.000", 1),
        ("tiny", "-0.000000000000000001", "2026-01-01 00:01:00.999", UINT64_MAX),
        ("zero", "0.000000000000000000", "1969-12-31 23:59:59.500", 0),
    ))

    columns, rows = backend.query("SELECT key, total, window_start, version FROM usage ORDER BY key")

    assert columns == list(COLUMNS)
    assert rows == [
        ("big", Decimal("12345678901234567890.123456789012345678"), datetime(2026, 1, 1, tzinfo=UTC), 1),
        ("tiny", Decimal("-0.000000000000000001"), datetime(2026, 1, 1, 0, 1, 0, 999000, tzinfo=UTC), UINT64_MAX),
        ("zero", Decimal(0), datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=UTC), 0),
    ]
    assert all(isinstance(row[1], Decimal) and row[2].utcoffset().total_seconds() == 0 for row in rows)
    _, [(total,)] = backend.query("SELECT sum(total) FROM usage")
    assert total == Decimal("12345678901234567890.123456789012345677")


def test_final_keeps_the_highest_version(backend: ClickHouseBackend) -> None:
    backend.insert_json_each_row("usage", COLUMNS, json_rows(
        ("k", "1.5", "2026-01-01 00:00:00.000", 1), ("k", "3.5", "2026-01-01 00:00:00.000", 3)))
    backend.insert_json_each_row("usage", COLUMNS, json_rows(("k", "2.5", "2026-01-01 00:00:00.000", 2)))

    _, rows = backend.query("SELECT key, total, version FROM usage FINAL")

    assert rows == [("k", Decimal("3.5"), 3)]


def test_engine_errors_carry_the_engine_message(backend: ClickHouseBackend) -> None:
    with pytest.raises(ClickHouseError) as syntax:
        backend.query("SELEC 1")
    with pytest.raises(ClickHouseError) as missing:
        backend.command("INSERT INTO no_such_table SELECT 1")
    with pytest.raises(ClickHouseError) as bad_payload:
        backend.insert_json_each_row("usage", COLUMNS, b'{"key": "x", "total": "not a number"}\n')

    assert not isinstance(syntax.value, ClickHouseUnavailable)
    assert (syntax.value.code, missing.value.code) == (62, 60)
    assert "Syntax error" in str(syntax.value) and "no_such_table" in str(missing.value)
    assert bad_payload.value.code is not None and "DB::Exception" in str(bad_payload.value)
    backend.insert_json_each_row("usage", COLUMNS, json_rows(("ok", "1", "2026-01-01 00:00:00.000", 1)))
    assert backend.query("SELECT count() FROM usage")[1] == [(1,)]


def test_http_backend_reports_a_stopped_server_as_unavailable(tmp_path: Path) -> None:
    server = DevClickHouseServer(str(tmp_path / "ch")).start()
    url = server.url
    before_stop = connect(url)
    try:
        assert before_stop.query("SELECT 1 AS one") == (["one"], [(1,)])
        server.stop()
        with pytest.raises(ClickHouseUnavailable) as after_stop:
            before_stop.query("SELECT 1")
        with pytest.raises(ClickHouseUnavailable) as never_reached:
            connect(url).command("SELECT 1")
    finally:
        before_stop.close()
        server.stop()

    assert after_stop.value.__cause__ is not None and never_reached.value.__cause__ is not None


@pytest.mark.parametrize("compress", [True, "gzip", "zstd", False])
def test_clickhouse_connect_native_round_trip_through_dev_server(
        dev_clickhouse: DevClickHouseServer, compress: bool | str) -> None:
    client = clickhouse_connect.get_client(host="127.0.0.1", port=dev_clickhouse.port, username="default",
                                           password=dev_clickhouse.password, compress=compress, tz_mode="aware")
    try:
        assert client.server_version == "26.9.2.1"
        client.command(DDL)
        rows = [
            ["a", Decimal("12345678901234567890.123456789012345678"), datetime(2026, 1, 1, 0, 0, 0, 123000, UTC), 1],
            ["b", Decimal("-0.000000000000000001"), datetime(1970, 1, 1, tzinfo=UTC), UINT64_MAX],
        ]
        client.insert("usage", rows, column_names=list(COLUMNS))

        result = client.query("SELECT key, total, window_start, version FROM usage ORDER BY key")
        count = client.command("SELECT count() FROM usage")
        with pytest.raises(DatabaseError) as missing:
            client.query("SELECT * FROM no_such_table")
    finally:
        client.close()

    assert result.column_names == COLUMNS
    assert [list(r) for r in result.result_rows] == rows
    assert count == 2
    assert missing.value.code == 60 and "no_such_table" in str(missing.value)


def test_dev_server_data_survives_a_restart(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "ch")
    with DevClickHouseServer(data_dir) as first, connect(first.url) as ch:
        ch.command(DDL)
        ch.insert_json_each_row("usage", COLUMNS, json_rows(("kept", "7.25", "2026-01-01 00:00:00.000", 1)))
    assert open_chdb_engines() == []

    with DevClickHouseServer(data_dir) as second, connect(second.url) as ch:
        _, over_http = ch.query("SELECT key, total FROM usage")
    with connect(f"chdb://{data_dir}") as ch:
        _, embedded = ch.query("SELECT key, total FROM usage")

    assert over_http == embedded == [("kept", Decimal("7.25"))]


def test_dev_server_and_chdb_backend_share_one_engine(dev_clickhouse: DevClickHouseServer,
                                                      tmp_path: Path) -> None:
    with connect(dev_clickhouse.url) as http_backend, connect(f"chdb://{dev_clickhouse.data_dir}") as embedded:
        http_backend.command(DDL)
        embedded.insert_json_each_row("usage", COLUMNS, json_rows(("x", "1", "2026-01-01 00:00:00.000", 1)))
        assert http_backend.query("SELECT key FROM usage")[1] == [("x",)]
        with pytest.raises(ClickHouseError, match="one data directory per process"):
            connect(f"chdb://{tmp_path / 'elsewhere'}")


def test_chdb_directories_open_one_after_another(tmp_path: Path) -> None:
    for name in ("a", "b"):
        with connect(f"chdb://{tmp_path / name}") as ch:
            ch.command("CREATE TABLE t (name String) ENGINE = MergeTree ORDER BY name")
            ch.insert_json_each_row("t", ["name"], json.dumps({"name": name}).encode())

    with connect(f"chdb://{tmp_path / 'a'}") as first, connect(f"chdb://{tmp_path / 'a'}/") as same_dir:
        assert first.query("SELECT name FROM t")[1] == same_dir.query("SELECT name FROM t")[1] == [("a",)]
    assert open_chdb_engines() == []


def test_chdb_backends_in_many_threads(chdb_url: str) -> None:
    with connect(chdb_url) as setup:
        setup.command(DDL)

    def write(worker: int) -> None:
        with connect(chdb_url) as ch:
            for batch in range(10):
                ch.insert_json_each_row("usage", COLUMNS, json_rows(
                    *[(f"{worker}-{batch}-{i}", "0.1", "2026-01-01 00:00:00.000", 1) for i in range(10)]))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    with connect(chdb_url) as ch:
        assert ch.query("SELECT count(), sum(total) FROM usage")[1] == [(400, Decimal("40.0"))]


def _http(server: DevClickHouseServer, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(server.base_url + path, data=body, headers=server.auth_headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_dev_server_speaks_clickhouse_http(dev_clickhouse: DevClickHouseServer) -> None:
    assert _http(dev_clickhouse, "/ping")[2] == b"Ok.\n"
    assert _http(dev_clickhouse, "/?query=SELECT%20%7Bn%3AUInt8%7D%20%2B%201&param_n=41")[2] == b"42\n"
    _http(dev_clickhouse, "/", b"CREATE TABLE t (n UInt64, s String) ENGINE = MergeTree ORDER BY n")
    # The query in the URL, the data in the body (ClickHouse joins them with a newline).
    _http(dev_clickhouse, "/?query=INSERT%20INTO%20t%20FORMAT%20JSONEachRow", b'{"n": 1, "s": "json"}\n')
    # RowBinary in a chunked body.
    row_binary = struct.pack("<Q", 2) + bytes([9]) + b"rowbinary"
    conn = http.client.HTTPConnection("127.0.0.1", dev_clickhouse.port)
    conn.request("POST", "/", iter([b"INSERT INTO t (n, s) FORMAT RowBinary\n", row_binary]),
                 headers=dev_clickhouse.auth_headers, encode_chunked=True)
    assert conn.getresponse().status == 200
    conn.close()

    status, headers, body = _http(dev_clickhouse, "/?default_format=JSONEachRow", b"SELECT n, s FROM t ORDER BY n")
    assert (status, headers["X-ClickHouse-Format"]) == (200, "JSONEachRow")
    assert [json.loads(line) for line in body.splitlines()] == [{"n": 1, "s": "json"}, {"n": 2, "s": "rowbinary"}]

    status, headers, body = _http(dev_clickhouse, "/", b"SELECT * FROM missing")
    assert (status, headers["X-ClickHouse-Exception-Code"]) == (404, "60")
    assert body.startswith(b"Code: 60. DB::Exception:")
    # SET is checked but, without HTTP sessions, does not persist.
    assert _http(dev_clickhouse, "/", b"SET max_threads = 3")[0] == 200
    assert _http(dev_clickhouse, "/", b"SET no_such_setting = 1")[1]["X-ClickHouse-Exception-Code"] == "115"
    assert _http(dev_clickhouse, "/?max_threads=3", b"SELECT getSetting('max_threads')")[2] == b"3\n"
    assert _http(dev_clickhouse, "/", b"SELECT getSetting('max_threads')")[2] != b"3\n"


def test_dev_server_decodes_every_request_encoding_clickhouse_connect_uses() -> None:
    import gzip
    import zlib

    import lz4.frame

    from deploy.dev_clickhouse import decode_body

    two_lz4_frames = lz4.frame.compress(b"INSERT INTO t ") + lz4.frame.compress(b"FORMAT Native\n")
    assert decode_body(two_lz4_frames, "lz4") == b"INSERT INTO t FORMAT Native\n"
    assert decode_body(gzip.compress(b"x"), "gzip") == decode_body(zlib.compress(b"x"), "deflate") == b"x"
    with pytest.raises(ClickHouseError) as unknown:
        decode_body(b"x", "snappy")
    assert unknown.value.code == 36
