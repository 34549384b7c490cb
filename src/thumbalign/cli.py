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

    ev = commands.add_parser(
        "eval", help="did the model get better? held-out feedback and/or judged generations",
        description="Two evaluations, either or both: (1) with --ref and --data, score held-out binary feedback with "
                    "the implicit reward of --model against --ref and report accuracy, ROC AUC and calibration (ECE) "
                    "of the implicit classifier, per label and overall; (2) with --baseline, --prompts and --judge, "
                    "generate answers from --model and --baseline, judge each, and report each model's thumbs-up rate "
                    "and the paired difference with 95%% bootstrap intervals.")
    ev.add_argument("--model", required=True, help="the model to evaluate (folder, .gguf or 'default')")
    ev.add_argument("--ref", help="reference model for the implicit reward (usually the model training started from)")
    ev.add_argument("--data", help="held-out feedback file (same formats as train --data)")
    ev.add_argument("--beta", type=float, default=None, help="β of the implicit reward (default: the run's, or 0.1)")
    ev.add_argument("--threshold", type=float, default=None,
                    help="reward above which the classifier says 👍 (default: the run's δ from summary.json, or 0)")
    ev.add_argument("--max-length", type=int, default=1024)
    ev.add_argument("--baseline", help="model to compare against by generation")
    ev.add_argument("--prompts", help="prompts file for the generation comparison")
    ev.add_argument("--judge", default="vader", help="vader, exact, numeric or module:function (default: vader)")
    ev.add_argument("--reference-field", default="answer", help="reference field for exact/numeric judges")
    ev.add_argument("--judge-threshold", type=float, default=0.5, help="a numeric judge score ≥ this is 👍")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: seeded sampling")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--output-dir", default="eval", help="where eval.json and generations.jsonl go (default: eval)")

    rep = commands.add_parser("report", help="write report.html for a run folder",
                              description="Write one self-contained HTML page for a run: training curves, UDM "
                                          "weights, held-out tables and sampled answers.")
    rep.add_argument("run_dir", help="a thumbalign train --output-dir")
    rep.add_argument("--out", help="HTML file to write (default: RUN_DIR/report.html)")

    reward = commands.add_parser("reward", help="a binary reward model P(👍 | prompt, answer): train, score",
                                 description="Train and use a binary reward model.")
    reward_commands = reward.add_subparsers(dest="reward_command", metavar="COMMAND", required=True)
    rtrain = reward_commands.add_parser(
        "train", help="train a reward model on thumbs (BCE, one logit on a causal-LM backbone)",
        description="Train a sequence-classification head on a causal-LM backbone with binary cross-entropy on the "
                    "thumbs, hold out a split, calibrate by temperature scaling, and save a standard transformers "
                    "sequence-classification folder into --output-dir/model.")
    from .reward import RewardConfig

    add_arguments(rtrain, RewardConfig)
    rscore = reward_commands.add_parser("score", help="write P(👍) for every row of a file",
                                        description="Score (prompt, completion) rows with a reward model; writes the "
                                                    "rows with a p_up field.")
    rscore.add_argument("--model", required=True, help="reward model folder (reward train's --output-dir/model)")
    rscore.add_argument("--data", required=True, help="rows with prompt and completion (label optional)")
    rscore.add_argument("-o", "--output", required=True, help="JSONL file to write")
    rscore.add_argument("--max-length", type=int, default=512)
    rscore.add_argument("--batch-size", type=int, default=16)

    bon = commands.add_parser("best-of-n", help="sample N answers per prompt, keep the reward model's favourite",
                              description="Generate --n answers per prompt with --model, score them with the reward "
                                          "model --rm, and write the best of each as a thumbs-up training row.")
    bon.add_argument("--model", default="default", help="the policy that answers (default: the embedded model)")
    bon.add_argument("--rm", required=True, help="reward model folder")
    bon.add_argument("--prompts", required=True, help="prompts file (a 'prompt' per row)")
    bon.add_argument("-o", "--output", required=True, help="JSONL file to write")
    bon.add_argument("--n", type=int, default=4, help="answers per prompt (default: 4)")
    bon.add_argument("--max-new-tokens", type=int, default=64)
    bon.add_argument("--temperature", type=float, default=1.0)
    bon.add_argument("--seed", type=int, default=0)

    imp = commands.add_parser(
        "import", help="turn a feedback export (Open WebUI, Langfuse, LangSmith, OpenAI, CSV/JSONL) into a training file",
        description="Read feedback exports (streamed) and write the canonical unpaired file (prompt, completion, label) "
                    "that train, inspect and eval take. Prints rows read, rows written per label, rows skipped by "
                    "reason, duplicates and conflicting labels.")
    imp.add_argument("sources", nargs="+", metavar="SOURCE_FILE",
                     help="export files; for Langfuse/LangSmith give the scores/feedback and the traces/runs files")
    imp.add_argument("--from", dest="source", required=True, choices=("openwebui", "langfuse", "langsmith", "openai",
                                                                      "generic"))
    imp.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    imp.add_argument("--score-name", help="Langfuse: the score to use (needed when the export holds several)")
    imp.add_argument("--key", help="LangSmith: the feedback key to use (needed when the export holds several)")
    imp.add_argument("--threshold", type=float, help="numeric scores: a score ≥ this is a thumbs-up")
    imp.add_argument("--label-map", help="raw label values to thumbs, e.g. 'good=1,bad=0' or 'up=1,down=0'")
    imp.add_argument("--prompt-field", default="prompt", help="generic: the prompt column (default: prompt)")
    imp.add_argument("--completion-field", default="completion", help="generic: the completion column")
    imp.add_argument("--label-field", default="label", help="generic: the label column")
    imp.add_argument("--keep-comments", action="store_true", help="carry free-text feedback along as 'comment'")
    imp.add_argument("--json", action="store_true", help="print the summary as JSON")

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


SHIPPED_ACCELERATE_CONFIGS = ("ddp", "zero2", "zero3", "fsdp")


def launch_processes(argv: list[str], config) -> int:
    """Re-run this same command in `num_processes` linked processes.

    GPUs: `accelerate launch` (with a shipped DDP / DeepSpeed ZeRO / FSDP2 config, or the user's). CPUs:
    `torch.distributed.run`, which starts N processes that find each other and train on the gloo backend. (Plain
    `accelerate launch --cpu --num_processes N` starts one process; without --cpu, N unlinked copies.)
    """
    import subprocess
    import sys
    from importlib import resources

    import torch

    rest, skip = [], False
    for i, arg in enumerate(argv):  # drop the launcher's own flags; every process reads the same config
        if skip:
            skip = False
            continue
        if arg in ("--num-processes", "--accelerate-config"):
            skip = True
            continue
        if arg.startswith(("--num-processes=", "--accelerate-config=")):
            continue
        rest.append(arg)
    n = config.num_processes
    if torch.cuda.is_available() or config.accelerate_config:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
        if config.accelerate_config in SHIPPED_ACCELERATE_CONFIGS:
            path = resources.files("thumbalign") / "accelerate_configs" / f"{config.accelerate_config}.yaml"
            command += ["--config_file", str(path)]
        elif config.accelerate_config:
            command += ["--config_file", config.accelerate_config]
        else:
            command += ["--multi_gpu"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    command += ["-m", "thumbalign", *rest, "--num-processes", "1"]
    print(f"Launching {n} processes: {' '.join(command)}", flush=True)
    return subprocess.call(command)


def run_eval(args) -> None:
    import json
    from pathlib import Path

    from .errors import ConfigError
    from .models import resolve_model

    if not (args.ref and args.data) and not (args.baseline and args.prompts):
        raise ConfigError("eval needs --ref with --data (held-out feedback), --baseline with --prompts "
                          "(judged generations), or both")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    run_summary = model_dir.parent / "summary.json"
    run = json.loads(run_summary.read_text()) if run_summary.exists() else {}
    result = {"model": args.model}
    if args.ref and args.data:
        from .evaluate import score_feedback

        beta = args.beta if args.beta is not None else run.get("settings", {}).get("beta", 0.1)
        threshold = args.threshold if args.threshold is not None else run.get("threshold", 0.0)
        result["feedback"] = score_feedback(model_dir, resolve_model(args.ref), args.data, beta=beta,
                                            threshold=threshold, max_length=args.max_length,
                                            batch_size=args.batch_size)
        m = result["feedback"]
        print(f"held-out feedback ({m['n']} records, β {beta}, threshold {threshold:.4f}): accuracy "
              f"{m['accuracy']:.3f} (👍 {m['accuracy_up']:.3f}, 👎 {m['accuracy_down']:.3f}), ROC AUC "
              f"{_f(m['auc'])}, ECE {m['ece']:.3f} (👍 {_f(m['ece_up'])}, 👎 {_f(m['ece_down'])})")
    if args.baseline and args.prompts:
        from .generate import format_comparison, judged_generations
        from .judges import load_judge

        judge = load_judge(args.judge, args.reference_field, args.judge_threshold)
        result["judged"] = judged_generations({"model": model_dir, "baseline": resolve_model(args.baseline)},
                                              args.prompts, judge, out / "generations.jsonl",
                                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                              seed=args.seed, batch_size=args.batch_size)
        print(format_comparison(result["judged"]))
    (out / "eval.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"wrote {out / 'eval.json'}")


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_import_command(args) -> None:
    import json

    from .data import parse_label
    from .errors import ConfigError, DataError
    from .importers import Options, run_import

    label_map = {}
    for item in filter(None, (args.label_map or "").split(",")):
        raw, _, thumb = item.partition("=")
        try:
            label_map[raw.strip()] = parse_label(thumb.strip(), "--label-map", None)
        except DataError:
            raise ConfigError(f"--label-map: cannot read {item!r}; write raw=1 or raw=0 (or up/down)") from None
    options = Options(score_name=args.score_name, key=args.key, threshold=args.threshold, label_map=label_map,
                      prompt_field=args.prompt_field, completion_field=args.completion_field,
                      label_field=args.label_field, keep_comments=args.keep_comments)
    report = run_import(args.source, args.sources, args.output, options)
    print(json.dumps(report.as_dict(), indent=1, ensure_ascii=False) if args.json
          else f"{args.output}: {report.describe()}")


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

            config = build_config(args)
            if config.num_processes > 1 and "WORLD_SIZE" not in os.environ:
                return launch_processes(sys.argv[1:] if argv is None else argv, config)
            train(config)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "report":
            from .report import write_report

            print(f"wrote {write_report(args.run_dir, args.out)}")
        elif args.command == "reward" and args.reward_command == "train":
            from .config import build_config
            from .reward import RewardConfig, train_reward_model

            train_reward_model(build_config(args, RewardConfig))
        elif args.command == "reward":
            from .reward import score_file

            n = score_file(args.model, args.data, args.output, args.max_length, args.batch_size)
            print(f"wrote P(👍) of {n} rows to {args.output}")
        elif args.command == "best-of-n":
            from .reward import best_of_n

            n = best_of_n(args.model, args.rm, args.prompts, args.output, args.n, args.max_new_tokens,
                          args.temperature, args.seed)
            print(f"wrote the best of {args.n} answers for {n} prompts to {args.output}")
        elif args.command == "import":
            run_import_command(args)
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
