"""`thumbalign` command line: one module per command. Problems with the user's input end in one line on stderr and
exit code 2; anything else that fails ends in one line too, exit code 1 (THUMBALIGN_DEBUG=1 lets its traceback out).

Each command module builds its parser from light imports only and loads torch inside its `run`, so that
`thumbalign --help` and `thumbalign train --help` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import ThumbalignError
from ..files import as_os_error, reason
from . import (best_of_n, env, evaluate, importer, inspect_file, methods, online, report, reward, starter, train,
               vllm_serve)

COMMANDS = (train, online, methods, evaluate, report, reward, best_of_n, importer, inspect_file, starter, env,
            vllm_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thumbalign", description="Train language models on thumbs-up / "
                                     "thumbs-down feedback.")
    parser.add_argument("--version", action="version", version=f"thumbalign {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        return args.run(args, argv)
    except ThumbalignError as err:
        say(f"thumbalign: error: {err}")
        return 2
    except OSError as err:  # a file-system failure not caught closer to where it happened: still one line
        say(f"thumbalign: error: {err.filename or 'a file'}: {reason(err)}")
        return 2
    except KeyboardInterrupt:
        say("thumbalign: interrupted; continue with --resume (from the last checkpoint)")
        return 130
    except Exception as err:  # not foreseen here (a library's failure, a bug): still one line; the trace on request
        if os.environ.get("THUMBALIGN_DEBUG"):
            raise
        if as_os_error(err) is not None:  # a library's report of a file-system failure (safetensors' full disk)
            say(f"thumbalign: error: {reason(as_os_error(err))}")
            return 2
        detail = " ".join(str(err).split())[:500] or "no message"
        say(f"thumbalign: error: {type(err).__name__}: {detail} (unexpected: THUMBALIGN_DEBUG=1 shows where it "
            "happened; please report it)")
        return 1


def say(line: str) -> None:
    """The line in one write: under --num-processes N, N processes and their launcher share one pipe, and a line
    written in two parts (print writes its end apart) could be split by another process's output."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
