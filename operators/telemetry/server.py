"""The flow's HTTP server: ``/metrics``, ``/status`` (the live page), ``/status.json``, ``/healthz``.

It binds ``METRICS_HOST`` (default ``0.0.0.0``: in Kubernetes Prometheus scrapes the pod's
address, and the NetworkPolicy in ``deploy/k8s`` admits only the scraper to port 9464). It is
bounded: :data:`WORKERS` threads answer, at most :data:`QUEUED` connections wait (more are
closed at once), and a client that sends nothing for :data:`REQUEST_TIMEOUT_S` seconds is
dropped, so idle or slow connections cannot pile up threads in the flow's process.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Callable, Mapping

from operators.telemetry.board import StatusBoard
from operators.telemetry.settings import TelemetrySettings

log = logging.getLogger(__name__)

STATUS_PAGE = Path(__file__).with_name("status_page.html")
WORKERS = 4
QUEUED = 32
REQUEST_TIMEOUT_S = 5.0


class BoundedHTTPServer(HTTPServer):
    """An HTTP server with a fixed pool of ``workers`` threads and a queue of ``queued`` connections.

    ``ThreadingHTTPServer`` starts a thread per connection: 500 idle connections held 500 threads.
    Here a connection beyond the queue is closed without an answer, and the handler's ``timeout``
    (set it on the handler class) drops a client that stops sending.
    """

    request_queue_size = 128  # the listen backlog: accepting (and refusing) must keep up with a burst

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], *,
                 workers: int = WORKERS, queued: int = QUEUED) -> None:
        self._pending: queue.Queue[tuple[socket.socket, Any] | None] = queue.Queue(maxsize=queued)
        self._workers: list[threading.Thread] = []
        super().__init__(address, handler)  # binds (or raises, after calling server_close)
        self._workers = [threading.Thread(target=self._work, name=f"tallyflow-http-{i}", daemon=True)
                         for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            self._pending.put_nowait((request, client_address))
        except queue.Full:
            self.shutdown_request(request)  # overloaded: refuse rather than grow

    def _work(self) -> None:
        while (job := self._pending.get()) is not None:
            request, client_address = job
            try:
                self.finish_request(request, client_address)
            except Exception:  # noqa: BLE001 - one bad client must not end the worker
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics client dropped", extra={"client": str(client_address)})

    def server_close(self) -> None:
        super().server_close()
        for _ in self._workers:
            try:
                self._pending.put(None, timeout=1)
            except queue.Full:
                break


def start_server(settings: TelemetrySettings, board: StatusBoard,
                 metrics_text: Callable[[], tuple[bytes, str]]) -> BoundedHTTPServer | None:
    """Serve in a daemon thread; None (and a warning) when the port is taken."""
    page = STATUS_PAGE.read_bytes()
    recovery = recovery_configured()

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT_S  # a client silent this long is dropped

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, kind = metrics_text()
            elif path in ("/", "/status"):
                body, kind = page, "text/html; charset=utf-8"
            elif path == "/status.json":
                status = board.status()
                status["trace_sample_ratio"] = settings.trace_sample_ratio
                status["recovery"] = recovery
                body, kind = json.dumps(status).encode(), "application/json"
            elif path == "/healthz":
                body, kind = b"ok\n", "text/plain; charset=utf-8"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet access log
            return

    try:
        server = BoundedHTTPServer((settings.metrics_host, settings.metrics_port), Handler)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        log.warning("metrics port in use: no /metrics or status page in this process "
                    "(give each process of a cluster its own METRICS_PORT)",
                    extra={"host": settings.metrics_host, "port": settings.metrics_port})
        return None
    threading.Thread(target=server.serve_forever, name="tallyflow-metrics", daemon=True).start()
    return server


def recovery_configured(argv: list[str] | None = None, env: Mapping[str, str] = os.environ) -> bool:
    """Whether this ``bytewax.run`` process has a recovery store (``-r`` or its env variable).

    Bytewax snapshots state at every epoch either way; only with a store is it kept.

    >>> recovery_configured(["bytewax.run", "dataflows.usage:flow", "-r", "/var/recovery"], {})
    True
    >>> recovery_configured(["bytewax.run", "dataflows.usage:flow"], {})
    False
    """
    import sys

    argv = sys.argv if argv is None else argv
    flags = ("-r", "--recovery-directory")
    return bool(env.get("BYTEWAX_RECOVERY_DIRECTORY")) or any(
        arg in flags or arg.startswith("--recovery-directory=") for arg in argv)
