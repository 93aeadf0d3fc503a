"""Child processes a test leaves behind (a flow started by a test that failed half-way)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def running_flow_children() -> list[int]:
    """Process ids of this process's children that run a Bytewax flow (Linux /proc)."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == me and b"bytewax.run" in command:
            found.append(int(entry.name))
    return found


def kill_leftover_flows(keep: frozenset[int] = frozenset()) -> int:
    """SIGKILL every flow this process started that still runs, but those in ``keep`` (a
    longer-lived fixture's); returns how many."""
    leftovers = [pid for pid in running_flow_children() if pid not in keep]
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    return len(leftovers)
