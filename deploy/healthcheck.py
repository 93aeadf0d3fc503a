"""The image's HEALTHCHECK: exit 0 when the flow looks alive, 1 when not (one line on stdout).

With ``METRICS_PORT`` set (and not ``0``), the flow's metrics server must answer ``GET /metrics``
with 200 within ``--timeout`` seconds, at ``METRICS_HOST`` when that names one address, else on
127.0.0.1. Otherwise the container's main process (PID 1, which the entrypoint replaced with
``bytewax.run``) must exist and not be a zombie. Kubernetes ignores a Dockerfile
HEALTHCHECK and uses the StatefulSet's probes on the same endpoint instead.

    >>> check_process(os.getpid(), expect="python")  # doctest: +ELLIPSIS
    (True, 'pid ... is running')
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def check_metrics(port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> tuple[bool, str]:
    """Whether ``http://host:port/metrics`` answers 200."""
    url = f"http://{host}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - local URL
            return response.status == 200, f"{url} answered {response.status}"
    except urllib.error.HTTPError as err:
        return False, f"{url} answered {err.code}"
    except (urllib.error.URLError, OSError) as err:
        return False, f"{url} unreachable: {getattr(err, 'reason', err)}"


def check_process(pid: int = 1, expect: str = "bytewax.run") -> tuple[bool, str]:
    """Whether process ``pid`` runs (not a zombie) and its command line contains ``expect``."""
    proc = Path(f"/proc/{pid}")
    try:
        state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False, f"pid {pid} is not running"
    if state in ("Z", "X"):
        return False, f"pid {pid} has exited (state {state})"
    if expect not in cmdline:
        return False, f"pid {pid} runs {cmdline.strip()!r}, not {expect}"
    return True, f"pid {pid} is running"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--pid", type=int, default=1, help="process to check without METRICS_PORT")
    args = parser.parse_args(argv)
    port = os.environ.get("METRICS_PORT", "").strip()
    host = os.environ.get("METRICS_HOST", "").strip()
    if port and port != "0":
        if not port.isdigit():
            print(f"unhealthy: METRICS_PORT is not a port: {port!r}")
            return 1
        host = host if host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        healthy, detail = check_metrics(int(port), host=host, timeout=args.timeout)
    else:
        healthy, detail = check_process(args.pid)
    print(("healthy: " if healthy else "unhealthy: ") + detail)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
