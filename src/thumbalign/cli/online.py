"""`thumbalign online`: learn from binary rewards on the model's own answers (GRPO, Dr. GRPO, NFT, RFT)."""

from __future__ import annotations

import argparse
import os

from ..trainers.config import ROUTE_STAGE, OnlineConfig
from .launch import run_training, will_launch
from .options import add_arguments, build_config

EPILOG = """\
examples:
  thumbalign online --prompts prompts.jsonl --reward numeric --objective nft --num-generations 8 --output-dir runs/on
  thumbalign online --prompts p.jsonl --reward rm:runs/rm/model --use-lora --learning-rate 1e-4
  thumbalign online --prompts p.jsonl --reward mymodule:my_trl_reward --reward numeric --reward-weights 0.2 1
  thumbalign online --config online.yaml --resume
  thumbalign online --feedback thumbs.jsonl --use-lora --learning-rate 2e-4 --output-dir runs/route

--feedback THUMBS: the route from logged thumbs to on-policy learning in one command. A reward model is trained on
the thumbs (OUTPUT_DIR/reward), their distinct prompts become the prompts (a share kept apart for evaluation,
OUTPUT_DIR/prompts), and the policy learns online against the reward model's calibrated P(👍) (OUTPUT_DIR/policy).
When thumbs-up and thumbs-down come from different prompts, this beats offline methods on the same file: answers to
one prompt are compared with each other, so what the reward model learned about prompts cancels.

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
        from ..trainers.feedback_route import train_from_feedback
        from ..trainers.online import train_online

        return lambda config: (train_from_feedback if config.feedback else train_online)(config)

    config = build_config(args, OnlineConfig)
    if config.feedback and not config.reward and will_launch(config):
        # a launched process group serves one run: the reward model's stage and the policy's are launched in turn
        for stage in ("reward", "policy"):
            os.environ[ROUTE_STAGE] = stage
            try:
                code = run_training(args, argv, OnlineConfig, trainer)
            finally:
                del os.environ[ROUTE_STAGE]
            if code:
                return code
        return 0
    return run_training(args, argv, OnlineConfig, trainer)
