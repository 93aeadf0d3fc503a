"""Run the usage dataflow the Bytewax way, as a child process.

    >>> bytewax_command(workers=2, recovery_dir="var/recovery", snapshot_s=5, backup_s=30)[1:]
    ['-m', 'bytewax.run', 'dataflows.usage:flow', '-w', '2', '-r', 'var/recovery', '-s', '5', '-b', '30']
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FLOW = "dataflows.usage:flow"


def bytewax_command(
    *,
    workers: int = 1,
    recovery_dir: str | os.PathLike | None = None,
    snapshot_s: float = 5,
    backup_s: float = 30,
    process_id: int | None = None,
    addresses: list[str] | None = None,
) -> list[str]:
    """``python -m bytewax.run dataflows.usage:flow`` with Bytewax's own flags."""
    command = [sys.executable, "-m", "bytewax.run", FLOW, "-w", str(workers)]
    if process_id is not None and addresses:
        command += ["-i", str(process_id), "-a", ";".join(addresses)]
    if recovery_dir is not None:
        command += ["-r", str(recovery_dir), "-s", str(snapshot_s), "-b", str(backup_s)]
    return command


def init_recovery_store(directory: str | os.PathLike, partitions: int = 1) -> None:
    """``python -m bytewax.recovery DIR PARTITIONS`` unless the store already exists."""
    path = Path(directory)
    if path.exists() and any(path.glob("part-*.sqlite3")):
        return
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "bytewax.recovery", str(path), str(partitions)],
        check=True, cwd=REPO_ROOT,
    )


def flow_environment(**settings: str) -> dict[str, str]:
    """The current environment plus flow settings, with the repo importable."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in settings.items()})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_flow(env: dict[str, str], **command_options) -> subprocess.Popen:
    """Start the flow in the background; the caller waits or signals it."""
    return subprocess.Popen(bytewax_command(**command_options), env=env, cwd=REPO_ROOT)


def run_flow(env: dict[str, str], *, timeout: float = 600, **command_options) -> None:
    """Run the flow to its end (stop-at-end mode) and raise if it fails."""
    process = start_flow(env, **command_options)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    if code != 0:
        raise RuntimeError(f"dataflow exited with {code}")
