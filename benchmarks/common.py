"""Shared by the benchmark scripts: run one child process and measure it."""

from __future__ import annotations

import os
import subprocess
import time


def run_measured(command: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one child process; RSS from wait4, so it is that child's own."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **(env or {})})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"failed: {' '.join(command)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out
