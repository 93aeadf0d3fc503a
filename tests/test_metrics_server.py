"""The metrics server stays small under idle or slow clients: a fixed pool, a queue, a timeout."""

from __future__ import annotations

import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler
from typing import Iterator

import pytest

from operators.telemetry import server as metrics_server
from operators.telemetry.board import StatusBoard
from operators.telemetry.server import BoundedHTTPServer
from operators.telemetry.settings import TelemetrySettings


class _Ok(BaseHTTPRequestHandler):
    timeout = 1.0

    def do_GET(self) -> None:  # noqa: N802
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def bounded() -> Iterator[BoundedHTTPServer]:
    server = BoundedHTTPServer(("127.0.0.1", 0), _Ok, workers=4, queued=8)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def get(server: BoundedHTTPServer) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/healthz", timeout=30) as r:
        return r.read()


def test_500_idle_connections_do_not_hold_500_threads(bounded):
    before = threading.active_count()
    idle = [socket.create_connection(bounded.server_address, timeout=30) for _ in range(500)]
    try:
        assert threading.active_count() <= before  # the pool was started with the server
    finally:
        for sock in idle:
            sock.close()
    assert get(bounded) == b"ok\n"  # and it still answers once they are gone


def test_a_silent_client_is_dropped_by_the_request_timeout(bounded):
    with socket.create_connection(bounded.server_address, timeout=30) as silent:
        assert silent.recv(1024) == b""  # the server closed it (recv would time out otherwise)
    assert get(bounded) == b"ok\n"


def test_the_flow_metrics_server_is_the_bounded_one():
    settings = TelemetrySettings(metrics_port=0, metrics_host="127.0.0.1")
    server = metrics_server.start_server(settings, StatusBoard(), lambda: (b"", "text/plain"))
    try:
        assert isinstance(server, BoundedHTTPServer)
        assert server.RequestHandlerClass.timeout == metrics_server.REQUEST_TIMEOUT_S > 0
        assert get(server) == b"ok\n"
    finally:
        server.shutdown()
        server.server_close()
