"""Running the benchmark's child processes: timing them, sampling their peak RSS, stopping them.

Standard library only at import.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from deploy.bench.settings import REPO_ROOT, BenchOptions


@dataclass
class ChildRun:
    """Finished child processes: wall seconds from the first spawn to the last exit, the sum of
    their peak RSS, the first non-zero exit status (else 0), and the CPU seconds (user + system,
    every thread) they used: on a machine shared with other work the wall time stretches with
    the load, the CPU time much less, so ratios of CPU time are the steadier comparison."""

    seconds: float
    peak_rss_mb: float
    returncode: int
    log: Path
    peak_rss_mb_each: list[float] = field(default_factory=list)
    cpu_seconds: float = 0.0


def measure_child(command: list[str], *, log: Path, env: dict | None = None,
                  timeout: float = 1_800, cwd: Path = REPO_ROOT) -> ChildRun:
    """Run ``command`` to its exit, timing it and sampling its peak RSS."""
    return measure_children([command], logs=[log], env=env, timeout=timeout, cwd=cwd)


def peak_rss_bytes(pid: int) -> int | None:
    """``VmHWM`` of a live process: the peak RSS of its current program image.

    Not ``ru_maxrss`` from wait4: Linux carries the forking parent's peak into the child's
    across exec, so every child of a big benchmark process would report at least its size.
    """
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def measure_children(commands: list[list[str]], *, logs: list[Path], env: dict | None = None,
                     timeout: float = 1_800, cwd: Path = REPO_ROOT) -> ChildRun:
    """Run ``commands`` side by side until all exit (one failing stops the others).

    Peak RSS is ``VmHWM`` sampled every 5 ms while each child lives (growth in its last few
    milliseconds can be missed).
    """
    started = time.perf_counter()
    processes = []
    for command, log in zip(commands, logs):
        with open(log, "ab") as out:
            processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                              stdout=out, stderr=subprocess.STDOUT))
    peaks = {process.pid: 0 for process in processes}
    running = {process.pid: process for process in processes}
    returncode, cpu = 0, 0.0
    while running:
        if time.perf_counter() > started + timeout:
            _kill_all(running.values())
            for process in running.values():
                process.wait()
            what = " ".join(Path(commands[0][0]).name if i == 0 else str(a)
                            for i, a in enumerate(commands[0][:6]))
            raise TimeoutError(f"{what} did not exit within {timeout:g}s; log {logs[0]}")
        for pid, process in list(running.items()):
            peaks[pid] = max(peaks[pid], peak_rss_bytes(pid) or 0)
            used = _reap(process)
            if used is None:
                continue
            cpu += used
            del running[pid]
            if process.returncode and not returncode:
                returncode = process.returncode
                _kill_all(running.values())
        time.sleep(0.005)
    seconds = time.perf_counter() - started
    each = [peaks[process.pid] / 2**20 for process in processes]
    return ChildRun(seconds, sum(each), returncode, logs[0], each, cpu)


def _reap(process: subprocess.Popen) -> float | None:
    """None while ``process`` runs; once it has exited, its CPU seconds (its return code set)."""
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid == 0:
        return None
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def _kill_all(processes) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()


def tail_of(path: Path, limit: int = 3_000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def check_run(run: ChildRun, what: str) -> None:
    if run.returncode != 0:
        raise RuntimeError(f"{what} exited with {run.returncode}; log {run.log}:\n{tail_of(run.log)}")


def bench_child(role: str, *args: object) -> list[str]:
    return [sys.executable, "-m", "deploy.bench", role, *map(str, args)]


PROJECT_PACKAGES = ("dataflows", "operators", "state", "sinks", "recovery", "deploy")


def compile_project() -> None:
    """Byte-compile the project's packages, as the image does when it is built
    (``python -m compileall``, deploy/Dockerfile): with ``PYTHONDONTWRITEBYTECODE`` set, as in
    the image and on this machine, a child would otherwise compile every module it imports
    from source at each start (~75 ms of CPU for the flow). Python reads bytecode only when it
    matches its source, so an edited module is still compiled afresh."""
    import compileall

    for package in PROJECT_PACKAGES:
        if not compileall.compile_dir(REPO_ROOT / package, quiet=1):
            raise RuntimeError(f"byte-compiling {package} failed")


def project_env(**extra: object) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def say(options: BenchOptions, text: str) -> None:
    if options.verbose:
        print(text, file=sys.stderr, flush=True)


@contextmanager
def dev_clickhouse(data_dir: Path, log: Path) -> Iterator[str]:
    """``tallyflow dev-clickhouse`` on ``data_dir`` in a child process; yields its URL.

    A cluster of flow processes needs it: chdb opens a data directory in one process only.
    """
    from deploy.broker import free_port

    port, password = free_port(), secrets.token_urlsafe(12)
    processes: list[subprocess.Popen] = []
    try:
        server = spawn([sys.executable, "-m", "deploy.cli", "dev-clickhouse", "--data",
                         str(data_dir), "--port", str(port)], log, processes,
                       project_env(DEV_CLICKHOUSE_PASSWORD=password))
        wait_http(f"http://127.0.0.1:{port}", server)
        yield f"http://default:{password}@127.0.0.1:{port}/default"
    finally:
        for process in processes:
            stop_process(process)


def spawn(command: list[str], log: Path, processes: list, env: dict | None = None) -> subprocess.Popen:
    with open(log, "ab") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env or project_env(),
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    process.log = log  # type: ignore[attr-defined]
    processes.append(process)
    return process


def stop_process(process: subprocess.Popen, timeout: float = 15) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_http(url: str, server: subprocess.Popen, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dev ClickHouse exited: {tail_of(server.log)}")  # type: ignore[attr-defined]
        try:
            urllib.request.urlopen(f"{url}/ping", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"dev ClickHouse did not answer on {url}")




@contextmanager
def private_redis(data_dir: Path, log: Path) -> Iterator[str | None]:
    """A throwaway ``redis-server`` (no persistence) on a free port; yields its URL, or None
    when ``redis-server`` is not installed (the live-totals runs are then skipped)."""
    import shutil

    from deploy.broker import free_port

    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes: list[subprocess.Popen] = []
    try:
        spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
               "no", "--dir", str(data_dir), "--loglevel", "warning"], log, processes)
        _wait_redis(port, processes[0])
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for process in processes:
            stop_process(process)


def _wait_redis(port: int, server: subprocess.Popen, timeout: float = 10) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"redis-server exited: {tail_of(server.log)}")  # type: ignore[attr-defined]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"redis-server did not answer on port {port}")
