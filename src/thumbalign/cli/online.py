"""`thumbalign online`: learn from binary rewards on the model's own answers (GRPO, Dr. GRPO, NFT, RFT)."""

from __future__ import annotations

import argparse

from ..trainers.config import OnlineConfig
from .launch import run_training
from .options import add_arguments

EPILOG = """\
examples:
  thumbalign online --prompts prompts.jsonl --reward numeric --objective nft --num-generations 8 --output-dir runs/on
  thumbalign online --prompts p.jsonl --reward rm:runs/rm/model --use-lora --learning-rate 1e-4
  thumbalign online --prompts p.jsonl --reward mymodule:my_trl_reward --reward numeric --reward-weights 0.2 1
  thumbalign online --config online.yaml --resume

prompts: a "prompt" (text or messages) or "messages" per row; other columns (a reference answer, test cases) go
to the rewards. A reward is a judge (vader, exact, numeric), rm:PATH, or module:function: a judge taking the answer
(and the row), or TRL's f(prompts, completions, **columns) -> list[float | None] (None leaves an answer out).
module:function imports MODULE and runs FUNCTION, with your permissions: only name code you trust.
"""


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "online", help="learn from binary rewards on the model's own answers (GRPO, Dr. GRPO, NFT, RFT)",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample several answers to each prompt with the model being trained, reward each (a judge, a "
                    "reward model or your function), and update the model on its own answers: groups that are all "
                    "👍 or all 👎 carry no signal and are dropped (their share is logged as frac_zero_std). Writes "
                    "checkpoints, metrics.jsonl, summary.json, report.html and a final model folder into "
                    "--output-dir, like `thumbalign train`.")
    add_arguments(parser, OnlineConfig)
    parser.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    def trainer():
        from ..trainers.online import train_online

        return train_online

    return run_training(args, argv, OnlineConfig, trainer)
