"""The SIGKILL harness of the crash soaks: feed a flow chunk by chunk, kill it at random
moments, resume it on the same recovery store, then let a last run finish."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from typing import Callable, Sequence, TypeVar

from deploy.runner import start_flow

Chunk = TypeVar("Chunk")


def wait_exit(process: subprocess.Popen, timeout: float = 180) -> int:
    """The exit status of ``process``; killed and re-raised when it outlives ``timeout`` seconds."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def run_with_sigkills(env: dict, recovery: str | os.PathLike, chunks: Sequence[Chunk],
                      feed: Callable[[Chunk], None], kills_wanted: int, rng: random.Random,
                      *, resume_wait_s: tuple[float, float]) -> int:
    """Run the flow once per chunk, SIGKILLing every run but the last at a random moment.

    Each chunk is ``feed``-ed to the topic before its run starts, so every run has work when the
    kill comes. When runs ended before their kill, resumes are killed too (after a wait drawn
    from ``resume_wait_s``) until ``kills_wanted`` kills were dealt; a last run must then exit 0.
    Returns the number of kills dealt.
    """
    kills = 0
    pending = list(chunks)
    while pending:
        feed(pending.pop(0))
        flow = start_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
        if pending:
            time.sleep(rng.uniform(0.5, 2.5))
            if flow.poll() is None:
                flow.send_signal(signal.SIGKILL)
                flow.wait()
                kills += 1
                continue
        assert wait_exit(flow) == 0, "a run that was not killed must finish"
    while kills < kills_wanted:  # runs were quicker than the kills: kill resumes too
        flow = start_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)
        time.sleep(rng.uniform(*resume_wait_s))
        if flow.poll() is None:
            flow.send_signal(signal.SIGKILL)
            flow.wait()
            kills += 1
        else:
            assert flow.returncode == 0
    assert wait_exit(start_flow(env, recovery_dir=recovery, snapshot_s=1, backup_s=10)) == 0
    return kills
