"""Permanent ClickHouse failures stop the flow at once and say why; transient ones are retried.

An unknown host, a TLS failure or refused credentials cannot heal by waiting: the sink used to
retry them forever as "unavailable". A refused connection, a timeout or a 5xx answer can.
"""

from __future__ import annotations

import http.server
import socket
import threading
from typing import Iterator

import pytest

from sinks.clickhouse_backend import ClickHouseMisconfigured, ClickHouseUnavailable, connect
from sinks.clickhouse_sink import with_retries

PASSWORD = "Ch-pw-3b7e1f-never-shown"


class _Status(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's ``status`` and an optional ClickHouse error."""

    server: "_StatusServer"

    def do_GET(self) -> None:  # noqa: N802
        self._answer()

    def do_POST(self) -> None:  # noqa: N802
        self._answer()

    def _answer(self) -> None:
        body = self.server.body
        self.send_response(self.server.status)
        if self.server.code is not None:
            self.send_header("X-ClickHouse-Exception-Code", str(self.server.code))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _StatusServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    status, code, body = 200, None, b""


@pytest.fixture
def answering() -> Iterator[_StatusServer]:
    server = _StatusServer(("127.0.0.1", 0), _Status)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def url_of(server: _StatusServer, scheme: str = "http") -> str:
    return f"{scheme}://default:{PASSWORD}@127.0.0.1:{server.server_address[1]}/default?query_retries=0"


def failure(url: str) -> Exception:
    backend = connect(url + ("&" if "?" in url else "?") + "connect_timeout=2")
    try:
        backend.query("SELECT 1")
    except Exception as err:  # noqa: BLE001 - the test classifies it
        return err
    finally:
        backend.close()
    raise AssertionError("the query succeeded")


def test_refused_credentials_fail_fast_naming_the_cause(answering):
    answering.status, answering.code = 403, 516
    answering.body = (b"Code: 516. DB::Exception: default: Authentication failed: password is incorrect, "
                      b"or there is no user with such name. (AUTHENTICATION_FAILED)\n")
    err = failure(url_of(answering))
    assert isinstance(err, ClickHouseMisconfigured)
    assert "authentication failed (check the user and password in CLICKHOUSE_URL)" in str(err)
    assert PASSWORD not in str(err)


def test_tls_to_a_plain_http_server_fails_fast(answering):
    err = failure(url_of(answering, "https"))
    assert isinstance(err, ClickHouseMisconfigured) and "TLS failure" in str(err), err


def test_an_unknown_host_fails_fast(monkeypatch):
    def no_such_name(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    err = failure(f"http://default:{PASSWORD}@clickhouse.example.invalid:8123/?query_retries=0")
    assert isinstance(err, ClickHouseMisconfigured) and "unknown host" in str(err), err
    assert PASSWORD not in str(err)


def test_a_dns_server_not_answering_is_transient(monkeypatch):
    def try_again(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", try_again)
    assert isinstance(failure("http://clickhouse.example:8123/?query_retries=0"), ClickHouseUnavailable)


def test_refused_connections_and_5xx_stay_transient(answering):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    refused = failure(f"http://127.0.0.1:{closed_port}/?query_retries=0")
    assert type(refused) is ClickHouseUnavailable, refused
    answering.status, answering.body = 503, b"Service Unavailable\n"
    overloaded = failure(url_of(answering))
    assert type(overloaded) is ClickHouseUnavailable, overloaded


def test_the_sink_retries_transient_failures_and_not_permanent_ones():
    calls, slept = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ClickHouseUnavailable("ClickHouse at http://h:8123 unavailable: refused")
        return "written"

    assert with_retries(flaky, "usage_aggregates", sleep=slept.append) == "written"
    assert len(calls) == 3 and len(slept) == 2

    def misconfigured():
        calls.append(1)
        raise ClickHouseMisconfigured("ClickHouse at https://h:8443: TLS failure")

    calls.clear()
    with pytest.raises(ClickHouseMisconfigured, match="TLS failure"):
        with_retries(misconfigured, "usage_aggregates", sleep=slept.append)
    assert len(calls) == 1
