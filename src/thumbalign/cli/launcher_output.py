"""What N launched processes and their launcher (torchrun, `accelerate launch`) write to stderr, as a user should read
it: the processes' own output as it comes (progress bars included), each of their one-line errors once, and none of
the launcher's report on a failed process (its traceback, its `ChildFailedError` table, its log lines): the process
that failed has already said why, in one line."""

from __future__ import annotations

import re

# the launcher programs: a traceback through one of them is the launcher's report, not a process's failure
LAUNCHER_FRAMES = ("torch/distributed/run.py", "torch/distributed/launcher/", "torch/distributed/elastic/",
                   "accelerate/commands/launch.py", "accelerate/commands/accelerate_cli.py")
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
# torch.distributed.elastic's log lines: "E1205 21:11:45.859000 5288 torch/distributed/elastic/...] failed ..."
LAUNCHER_LOG = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/")
# its banner about OMP_NUM_THREADS
BANNER = ("*****************************************", "Setting OMP_NUM_THREADS environment variable")
EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


class LauncherOutput:
    """Feed it the launcher's stderr in chunks; it returns what to show. Afterwards `child_exit_code` is the exit code
    of the process the launcher names as the root cause of a failure, and `said` whether a process wrote a line of
    its own beginning "thumbalign: "."""

    def __init__(self):
        self.partial = ""
        self.traceback: list[str] | None = None  # a traceback being read, until its last line tells whose it is
        self.in_table = False  # inside the launcher's failure table
        self.root_cause = False
        self.dropped = False  # the last traceback was the launcher's: a chained one's link line goes with it
        self.child_exit_code: int | None = None
        self.said: set[str] = set()
        self.mid_line = False  # what was shown last is a progress bar, with no line end after it

    def feed(self, text: str) -> str:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        shown = "".join(self._shown(kept) + "\n" for line in lines for kept in self._line(line))
        if "\r" in self.partial and self.traceback is None and not self.in_table:  # a progress bar: show it now
            shown, self.partial, self.mid_line = shown + self.partial, "", True
        return shown

    def _shown(self, line: str) -> str:
        """A process's own line starts a line of its own, also when it comes right after another's progress bar."""
        start = "\n" if self.mid_line and line.startswith("thumbalign: ") else ""
        self.mid_line = False
        return start + line

    def close(self) -> str:
        rest = self.feed("\n") if self.partial else ""
        if self.traceback:  # cut short: show what there was
            rest += "".join(line + "\n" for line in self.traceback)
            self.traceback = None
        return rest

    def _line(self, line: str) -> list[str]:
        if self.in_table:
            return self._table_line(line)
        if self.traceback is not None:
            return self._traceback_line(line)
        if line.startswith("Traceback (most recent call last):"):
            self.traceback = [line]
            return []
        if self.dropped and (line.startswith(CHAINED) or not line.strip()):
            return []
        self.dropped = False
        if LAUNCHER_LOG.match(line) or line.startswith(BANNER):
            return []
        if line.startswith("thumbalign: "):
            return self._own_line(line)
        return [line]

    def _own_line(self, line: str) -> list[str]:
        if line in self.said:  # the same error from every process: once
            return []
        self.said.add(line)
        return [line]

    def _traceback_line(self, line: str) -> list[str]:
        if line.startswith("thumbalign: "):  # a process's line amid the launcher's traceback (Ctrl-C ends both)
            return self._own_line(line)
        self.traceback.append(line)
        if line.startswith((" ", "\t")) or not line.strip():
            return []
        block, self.traceback = self.traceback, None  # its last line: the exception
        if not any(frame in text for text in block for frame in LAUNCHER_FRAMES):
            return block
        self.in_table, self.dropped = "ChildFailedError" in line, True
        return []

    def _table_line(self, line: str) -> list[str]:
        if line.startswith("Root Cause"):
            self.root_cause = True
        code = EXITCODE.match(line)
        if code and self.root_cause and self.child_exit_code is None:
            self.child_exit_code = int(code.group(1))
        if self.root_cause and line.startswith("====="):
            self.in_table = False
        return []
