"""`thumbalign` command line. Problems with the user's input end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .errors import ThumbalignError

TRAIN_EPILOG = """\
examples:
  thumbalign train --data feedback.jsonl --output-dir runs/first
  thumbalign train --config run.yaml              # keys as the flags, with underscores: learning_rate: 1e-5
  thumbalign train --config run.yaml --resume     # continue an interrupted run from its last checkpoint

data: one record per row, in any of these layouts
  {"prompt": "...", "completion": "...", "label": true}
  {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}], "label": "👎"}
  {"messages": [..., {"role": "assistant", "content": "..."}], "label": 1}
  {"prompt": "...", "chosen": "...", "rejected": "..."}           (split into one 👍 and one 👎 row)
labels: true/false, 1/0, 1/-1, "up"/"down", "👍"/"👎".
"""


def build_parser() -> argparse.ArgumentParser:
    from .config import add_arguments

    parser = argparse.ArgumentParser(prog="thumbalign", description="Train language models on thumbs-up / "
                                     "thumbs-down feedback.")
    parser.add_argument("--version", action="version", version=f"thumbalign {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = commands.add_parser(
        "train", help="train a model on binary feedback (BCO)", epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a causal language model on thumbs-up / thumbs-down feedback with Binary Classifier "
                    "Optimization. Writes checkpoints, metrics.jsonl, summary.json and a final model folder "
                    "(loadable with transformers) into --output-dir.")
    add_arguments(train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # Nothing is ever fetched from a model hub: fail fast instead of hanging on the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        if args.command == "train":
            from .config import build_config
            from .train import train

            train(build_config(args))
    except ThumbalignError as err:
        print(f"thumbalign: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("thumbalign: interrupted; continue with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
