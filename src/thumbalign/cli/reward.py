"""`thumbalign reward train|score`: a binary reward model P(👍 | prompt, answer)."""

from __future__ import annotations

from ..trainers.config import RewardConfig
from .launch import run_training
from .options import add_arguments


def add_parser(commands) -> None:
    reward = commands.add_parser("reward", help="a binary reward model P(👍 | prompt, answer): train, score",
                                 description="Train and use a binary reward model.")
    reward_commands = reward.add_subparsers(dest="reward_command", metavar="COMMAND", required=True)
    rtrain = reward_commands.add_parser(
        "train", help="train a reward model on thumbs (BCE, one logit on a causal-LM backbone)",
        description="Train a sequence-classification head on a causal-LM backbone with binary cross-entropy on the "
                    "thumbs, hold out a split, calibrate by temperature scaling, and save a standard transformers "
                    "sequence-classification folder into --output-dir/model.")
    add_arguments(rtrain, RewardConfig)
    rtrain.set_defaults(run=run_train)
    rscore = reward_commands.add_parser("score", help="write P(👍) for every row of a file",
                                        description="Score (prompt, completion) rows with a reward model; writes the "
                                                    "rows with a p_up field.")
    rscore.add_argument("--model", required=True, help="reward model folder (reward train's --output-dir/model)")
    rscore.add_argument("--data", required=True, help="rows with prompt and completion (label optional)")
    rscore.add_argument("-o", "--output", required=True, help="JSONL file to write")
    rscore.add_argument("--max-length", type=int, default=512)
    rscore.add_argument("--batch-size", type=int, default=16)
    rscore.add_argument("--principle", help="for a model trained with --principle-field: the principle to judge "
                                            "each answer by (p_up is then P(the answer satisfies it))")
    rscore.set_defaults(run=run_score)


def run_train(args, argv: list[str]) -> int:
    def trainer():
        from ..trainers.reward import train_reward_model

        return train_reward_model

    return run_training(args, argv, RewardConfig, trainer)


def run_score(args, argv: list[str]) -> int:
    from ..analysis.scoring import score_file

    n = score_file(args.model, args.data, args.output, args.max_length, args.batch_size, args.principle)
    print(f"wrote P(👍) of {n} rows to {args.output}")
    return 0
