"""A -w 1 run under py-spy, and a plain-text summary of its samples. Standard library only at import."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from deploy.bench.contenders import flow_command, flow_env
from deploy.bench.process import check_run, measure_child, say
from deploy.bench.settings import BenchOptions


def profile_flow(bootstrap: str, topic: str, work: Path, stamp: str, options: BenchOptions) -> dict:
    """A -w 1 stop-at-end run under ``py-spy record --native``; summary in profile-<stamp>.txt."""
    from deploy.broker import ensure_topic

    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}"
                                         f"{os.environ.get('PATH', '')}")
    if py_spy is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    dlq_topic = f"{topic}-dlq-profile"
    ensure_topic(bootstrap, dlq_topic, 1)
    raw = work / f"profile-{stamp}.raw"
    env = flow_env(bootstrap, topic, dlq_topic, f"chdb://{work / f'profile-{stamp}-clickhouse'}",
                   **options.flow_env)
    command = [py_spy, "record", "--format", "raw", "--native", "--rate", "200", "--output",
               str(raw), "--", *flow_command(1, work / f"profile-{stamp}-recovery")]
    say(options, "profiling a -w 1 run with py-spy …")
    run = measure_child(command, log=work / f"profile-{stamp}.log", env=env)
    check_run(run, "the profiled dataflow")
    text = summarize_profile(raw.read_text(), title=f"tallyflow -w 1, {options.events:,} records, "
                                                    f"{run.seconds:.1f}s under py-spy --native")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    path = options.out_dir / f"profile-{stamp}.txt"
    path.write_text(text)
    shutil.copy(raw, options.out_dir / f"profile-{stamp}.raw")
    return {"path": str(path), "raw": str(options.out_dir / f"profile-{stamp}.raw"),
            "seconds_under_profiler": round(run.seconds, 2)}


def _frame_name(frame: str) -> str:
    """``fn (path/to/file.py:12)`` -> ``fn (to/file.py)``: group a function's lines together."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path = where.rsplit(":", 1)[0] if where else ""
    short = "/".join(Path(path).parts[-2:]) if path else ""
    return f"{name} ({short})" if short else name


def summarize_profile(raw: str, *, title: str = "", top: int = 30) -> str:
    """Self and total sample shares per function from py-spy's ``--format raw`` (collapsed stacks).

    >>> print(summarize_profile("a (x/m.py:1);b (x/m.py:2) 3\\na (x/m.py:1) 1", top=2), end="")
    4 samples
    <BLANKLINE>
    == top 2 by self time
     75.0%  b (x/m.py)
     25.0%  a (x/m.py)
    <BLANKLINE>
    == top 2 by total time (inclusive)
    100.0%  a (x/m.py)
     75.0%  b (x/m.py)
    <BLANKLINE>
    == by file (self)
    100.0%  x/m.py
    """
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    file_counts: dict[str, int] = {}
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")
                  if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            total_counts[frame] = total_counts.get(frame, 0) + count
        where = frames[-1].rpartition(" (")[2].rstrip(")") if " (" in frames[-1] else "<native>"
        file_counts[where] = file_counts.get(where, 0) + count
    lines = [title] if title else []
    lines.append(f"{samples} samples")
    for heading, counts in ((f"top {top} by self time", self_counts),
                            (f"top {top} by total time (inclusive)", total_counts),
                            ("by file (self)", file_counts)):
        lines += ["", f"== {heading}"]
        for name, count in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"{100 * count / max(samples, 1):5.1f}%  {name}")
    return "\n".join(lines) + "\n"


