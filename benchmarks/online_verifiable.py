"""Online learning from a verifier, on the CPU: does `thumbalign online` raise the held-out pass rate, by how much,
in how long — and is it better than spending the same judged answers offline with BCO?

The task: one-digit arithmetic (+, −, ×) asked in four phrasings, answered by the default model within a budget of
--max-new-tokens tokens and checked exactly by the `numeric` judge (the last number of the answer equals the result).
Every (phrasing, operation, a, b) is either a training prompt or a held-out one, never both.

For each objective (grpo, dr_grpo, nft, rft) one `thumbalign online` run with the same seed, steps, prompts per step
and answers per prompt (so the same number of generated answers); its summary holds the greedy pass rate of the
held-out prompts before (the no-training control: the base model) and after, with bootstrap intervals and the
paired difference. Then the offline alternative: the base model answers the training prompts as many times as the
online runs generated answers, the judge labels each, and `thumbalign train --method bco` learns from the logged
👍/👎; `thumbalign eval` measures it on the same held-out prompts.

    .venv/bin/python benchmarks/online_verifiable.py                    # all of it (about an hour on 2 cores)
    .venv/bin/python benchmarks/online_verifiable.py --objectives nft --no-offline
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

PHRASINGS = ["What is {a} {op} {b}?", "What is {a} {op} {b}? Reply with only the number.", "Compute {a} {op} {b}.",
             "Calculate {a} {op} {b}."]
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def task_prompts(n_held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    rows = []
    for phrasing in PHRASINGS:
        for op, f in OPERATIONS.items():
            for a in range(10):
                for b in range(10):
                    if op == "-" and b > a:
                        continue  # no negative results
                    content = phrasing.format(a=a, op=op, b=b)
                    rows.append({"prompt": [{"role": "user", "content": content}], "answer": str(f(a, b))})
    random.Random(seed).shuffle(rows)
    return rows[n_held_out:], rows[:n_held_out]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"failed ({code}): {' '.join(command)}; see {log}")
    return time.perf_counter() - start


def online(args, objective: str, train: Path, held: Path) -> dict:
    out = args.work / f"online-{objective}"
    command = [str(args.thumbalign), "online", "--prompts", str(train), "--eval-prompts", str(held),
               "--reward", "numeric", "--objective", objective, "--output-dir", str(out), "--overwrite",
               "--max-steps", str(args.steps), "--per-device-train-batch-size", str(args.prompts_per_step),
               "--num-generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens),
               "--use-lora", "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
               "--logging-steps", "5", "--save-steps", "1000", "--generation-batch-size", "64",
               "--eval-batch-size", "64"]
    seconds = run(command, args.work / f"online-{objective}.log")
    summary = json.loads((out / "summary.json").read_text())
    judged = summary["judged"]
    return {"run": objective, "seconds": seconds, "answers": args.steps * args.prompts_per_step * args.generations,
            "before": judged["models"]["base"], "after": judged["models"]["trained"], "difference": judged["difference"],
            "train_pass_rate_last": summary["final_metrics"].get("pass_rate")}


def offline_bco(args, train: Path, held: Path) -> dict:
    """The same number of judged answers, sampled once from the base model, then BCO on the logged thumbs."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from thumbalign.analysis.judges import load_judge
    from thumbalign.data.prompts import load_prompts
    from thumbalign.data.tokens import encode_prompt
    from thumbalign.engine.inference import sample_answers
    from thumbalign.engine.models import load_causal_lm, load_tokenizer, resolve_model

    start = time.perf_counter()
    model_dir = resolve_model("default")
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    judge = load_judge("numeric")
    prompts = load_prompts(str(train))
    budget = args.steps * args.prompts_per_step * args.generations
    rng = np.random.default_rng(args.seed)
    chosen = [prompts[i] for i in rng.choice(len(prompts), size=budget // args.generations, replace=False)]
    rows = []
    for k in range(0, len(chosen), 8):
        batch = chosen[k:k + 8]
        ids = [encode_prompt(tokenizer, p.prompt) for p in batch for _ in range(args.generations)]
        seeds = [args.seed * 100_000 + k * args.generations + j for j in range(len(ids))]
        answers = sample_answers(model, ids, seeds, args.max_new_tokens, 1.0, tokenizer.pad_token_id,
                                 tokenizer.eos_token_id)
        for j, answer in enumerate(answers):
            row = batch[j // args.generations]
            text = tokenizer.decode(answer, skip_special_tokens=True).strip()
            if text:
                rows.append({"prompt": row.prompt, "completion": [{"role": "assistant", "content": text}],
                             "label": bool(judge(text, row.row))})
    feedback = write_jsonl(args.work / "offline-feedback.jsonl", rows)
    sampling = time.perf_counter() - start
    out = args.work / "offline-bco"
    seconds = run([str(args.thumbalign), "train", "--data", str(feedback), "--method", "bco", "--use-lora",
                   "--learning-rate", str(args.learning_rate), "--output-dir", str(out), "--overwrite",
                   "--per-device-train-batch-size", "8", "--num-train-epochs", "1", "--seed", str(args.seed),
                   "--max-length", "256", "--no-report"], args.work / "offline-bco.log")
    ev = args.work / "offline-eval"
    seconds += run([str(args.thumbalign), "eval", "--model", str(out / "model"), "--baseline", "default", "--prompts",
                    str(held), "--judge", "numeric", "--max-new-tokens", str(args.max_new_tokens), "--batch-size",
                    "64", "--output-dir", str(ev)], args.work / "offline-eval.log")
    judged = json.loads((ev / "eval.json").read_text())["judged"]
    return {"run": "offline bco", "seconds": sampling + seconds, "answers": len(rows),
            "before": judged["models"]["baseline"], "after": judged["models"]["model"],
            "difference": judged["difference"], "train_pass_rate_last": sum(r["label"] for r in rows) / len(rows)}


def fmt(m: dict) -> str:
    return f"{m['thumbs_up_rate']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objectives", nargs="+", default=["grpo", "dr_grpo", "nft", "rft"])
    parser.add_argument("--no-offline", action="store_true", help="skip the offline BCO comparison")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--held-out", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=root / "runs" / "online_verifiable")
    parser.add_argument("--thumbalign", type=Path, default=Path(sys.executable).parent / "thumbalign")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train_rows, held_rows = task_prompts(args.held_out, args.seed)
    train, held = write_jsonl(args.work / "train.jsonl", train_rows), write_jsonl(args.work / "held_out.jsonl", held_rows)
    print(f"{len(train_rows)} training prompts, {len(held_rows)} held-out prompts (disjoint); "
          f"{args.steps} steps × {args.prompts_per_step} prompts × {args.generations} answers per run", flush=True)
    results = []
    for objective in args.objectives:
        results.append(online(args, objective, train, held))
        print(json.dumps(results[-1]), flush=True)
    if not args.no_offline:
        results.append(offline_bco(args, train, held))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n| run | answers judged | wall time | held-out pass rate before (control) | after | "
          f"difference [95% CI] | wins / ties / losses |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        d = r["difference"]
        print(f"| {r['run']} | {r['answers']} | {r['seconds'] / 60:.1f} min | {fmt(r['before'])} | {fmt(r['after'])} | "
              f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['wins']} / {d['ties']} / "
              f"{d['losses']} |")


if __name__ == "__main__":
    main()
