"""`thumbalign inspect`: what to know about a feedback file before training on it."""

from __future__ import annotations

import json

from .options import seed_number


def add_parser(commands) -> None:
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
    inspect.add_argument("--seed", type=seed_number, default=0)
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from ..analysis.inspect_data import format_report, inspect_file
    from ..engine.models import cache_root, load_tokenizer, resolve_model

    tokenizer = None if args.model == "none" else load_tokenizer(resolve_model(args.model))
    report = inspect_file(args.file, tokenizer, args.max_length,
                          encoder=None if args.udm_encoder == "none" else args.udm_encoder,
                          sample_per_class=args.sample_per_class, seed=args.seed, cache_dir=cache_root(),
                          progress=not args.json)
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_report(report))
    return 0
