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
        "train", help="train a model on binary feedback (BCO by default)", epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train a causal language model on thumbs-up / thumbs-down feedback with Binary Classifier "
                    "Optimization. Writes checkpoints, metrics.jsonl, summary.json and a final model folder "
                    "(loadable with transformers) into --output-dir.")
    add_arguments(train)

    commands.add_parser("methods", help="list the training methods and the data each takes",
                        description="List the training methods (--method) with one line each.")

    inspect = commands.add_parser(
        "inspect", help="report on a feedback file before training: labels, lengths, duplicates, prompt shift",
        description="Read a feedback file (streamed, bounded memory) and report rows per label, prompt and completion "
                    "lengths per label in tokens, duplicate and conflicting records, how many records --max-length "
                    "would truncate, and the prompt-shift AUC: how well a classifier tells 👍 prompts from 👎 "
                    "prompts (0.5 = no shift; high values call for --udm).")
    inspect.add_argument("file", help="feedback file (same formats as train --data)")
    inspect.add_argument("--model", default="default",
                         help="tokenizer for token lengths: a model folder, .gguf, 'default', or 'none' to skip")
    inspect.add_argument("--max-length", type=int, default=1024, help="as train --max-length (default: 1024)")
    inspect.add_argument("--udm-encoder", default="minilm",
                         help="sentence encoder for the prompt-shift AUC: 'minilm', a local folder, or 'none'")
    inspect.add_argument("--sample-per-class", type=int, default=1024,
                         help="prompts per label sampled for the prompt-shift AUC (default: 1024)")
    inspect.add_argument("--seed", type=int, default=0)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def run_inspect(args) -> None:
    import json

    from .inspect_data import format_report, inspect_file
    from .models import cache_root, load_tokenizer, resolve_model

    tokenizer = None if args.model == "none" else load_tokenizer(resolve_model(args.model))
    report = inspect_file(args.file, tokenizer, args.max_length,
                          encoder=None if args.udm_encoder == "none" else args.udm_encoder,
                          sample_per_class=args.sample_per_class, seed=args.seed, cache_dir=cache_root(),
                          progress=not args.json)
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_report(report))


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
        elif args.command == "methods":
            from .objectives import METHODS

            for name, cls in METHODS.items():
                kind = "paired (prompt, chosen, rejected)" if cls.data_kind == "paired" else "unpaired 👍/👎"
                print(f"{name:<13} {kind:<36} {cls.summary}")
        elif args.command == "inspect":
            run_inspect(args)
    except ThumbalignError as err:
        print(f"thumbalign: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("thumbalign: interrupted; continue with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
