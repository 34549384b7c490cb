"""`thumbalign train`: train a policy on binary feedback (BCO by default)."""

from __future__ import annotations

import argparse

from ..trainers.config import TrainConfig
from .launch import run_training
from .options import add_arguments

EPILOG = """\
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


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "train", help="train a model on binary feedback (BCO by default)", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a causal language model on thumbs-up / thumbs-down feedback with Binary Classifier "
                    "Optimization. Writes checkpoints, metrics.jsonl, summary.json and a final model folder "
                    "(loadable with transformers) into --output-dir.")
    add_arguments(parser, TrainConfig)
    parser.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    def trainer():
        from ..trainers.policy import train

        return train

    return run_training(args, argv, TrainConfig, trainer)
