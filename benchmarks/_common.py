"""Pieces shared by the benchmark scripts: the hardware line, the command line, and writing a docs section."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from flawscope.runs import _cpu_model

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it."""
    return _cpu_model()


def command() -> str:
    """The command line of this run, quoted so it can be pasted, with the thread-count variable when it was set."""
    threads = os.environ.get("OMP_NUM_THREADS")
    return " ".join([*([f"OMP_NUM_THREADS={threads}"] if threads else []), "python", shlex.join(sys.argv)])


def write_section(path: Path, heading: str, section: str) -> None:
    """Replaces the section that starts with ``heading`` (up to the next level-2 heading) in ``path``, or appends."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish(path: Path, heading: str, lines: list[str]) -> None:
    """Prints a section given as lines (the heading first) and writes it into ``path`` with ``write_section``."""
    section = "\n".join([*lines, ""])
    print(section)
    write_section(path, heading, section)


def run(args: list[str]) -> tuple[float, float]:
    """Runs a command; returns (wall seconds, peak resident MiB of that process)."""
    start = time.perf_counter()
    process = subprocess.Popen(args)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(args)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024
