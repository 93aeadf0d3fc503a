"""The flow's HTTP server: ``/metrics``, ``/status`` (the live page), ``/status.json``, ``/healthz``."""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Mapping

from operators.telemetry.board import StatusBoard
from operators.telemetry.settings import TelemetrySettings

log = logging.getLogger(__name__)

STATUS_PAGE = Path(__file__).with_name("status_page.html")


def start_server(settings: TelemetrySettings, board: StatusBoard,
                 metrics_text: Callable[[], tuple[bytes, str]]) -> ThreadingHTTPServer | None:
    """Serve in a daemon thread; None (and a warning) when the port is taken."""
    page = STATUS_PAGE.read_bytes()
    recovery = recovery_configured()

    class Handler(BaseHTTPRequestHandler):
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
        server = ThreadingHTTPServer((settings.metrics_host, settings.metrics_port), Handler)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        log.warning("metrics port in use: no /metrics or status page in this process "
                    "(give each process of a cluster its own METRICS_PORT)",
                    extra={"host": settings.metrics_host, "port": settings.metrics_port})
        return None
    server.daemon_threads = True
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
