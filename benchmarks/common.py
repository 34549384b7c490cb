"""Shared by the benchmark scripts: run one child process and measure it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def run_measured(command: list[str], env: dict | None = None, log: Path | None = None) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one child process; RSS from wait4, so it is that child's own.
    `log`: a file for its stderr (by default it is dropped), whose tail a failure shows."""
    start = time.perf_counter()
    with open(log, "w") if log else open(os.devnull, "w") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, **(env or {})})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-20:]) if log else ""
        raise RuntimeError(f"failed: {' '.join(command)}{tail}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024, out
