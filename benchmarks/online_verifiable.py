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

With --use-vllm each objective runs twice, same settings and seed: answers written by transformers `generate`, then
by vLLM (`online --use-vllm`); the table adds how fast answers were written (answers / seconds spent sampling,
weight pushes included), each run's peak RSS, and the paired difference of their held-out pass rates. Run it from
the vLLM environment (its own transformers) so that both paths use the same libraries:

    .venv/vllm/bin/python benchmarks/online_verifiable.py --use-vllm --objectives grpo --no-offline \
        --max-new-tokens 40
"""

from __future__ import annotations

import argparse
import json
import os
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


def run(command: list[str], log: Path, peaks: dict | None = None) -> float:
    """Seconds the command took; its peak resident memory (the process and those it waited for) into `peaks`."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"failed ({code}): {' '.join(command)}; see {log}")
    if peaks is not None:
        peaks[str(log)] = usage.ru_maxrss * 1024  # kilobytes on Linux
    return time.perf_counter() - start


def online(args, objective: str, train: Path, held: Path, use_vllm: bool = False) -> dict:
    name = f"online-{objective}" + ("-vllm" if use_vllm else "")
    out = args.work / name
    command = [str(args.thumbalign), "online", "--prompts", str(train), "--eval-prompts", str(held),
               "--reward", "numeric", "--objective", objective, "--output-dir", str(out), "--overwrite",
               "--max-steps", str(args.steps), "--per-device-train-batch-size", str(args.prompts_per_step),
               "--num-generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens),
               "--use-lora", "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
               "--logging-steps", "5", "--save-steps", "1000", "--generation-batch-size", "64",
               "--eval-batch-size", "64", "--bf16", args.bf16] + (["--use-vllm"] if use_vllm else [])
    peaks: dict = {}
    seconds = run(command, args.work / f"{name}.log", peaks)
    summary = json.loads((out / "summary.json").read_text())
    judged = summary["judged"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sampled = [m for m in lines if m.get("sampling_s")]
    answers = args.steps * args.prompts_per_step * args.generations
    return {"run": objective + (" (vLLM)" if use_vllm else " (transformers)" if args.use_vllm else ""),
            "seconds": seconds, "peak_rss": max(peaks.values()),
            "sampling_answers_per_s": answers / sum(m["sampling_s"] for m in sampled) if sampled else None,
            "answers": answers,
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
    parser.add_argument("--bf16", default="false", choices=("auto", "true", "false"),
                        help="the runs' precision (default false: fp32, comparable across CPUs)")
    parser.add_argument("--use-vllm", action="store_true",
                        help="each objective also with vLLM writing the answers (same settings and seed)")
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
        for use_vllm in (False, True) if args.use_vllm else (False,):
            results.append(online(args, objective, train, held, use_vllm))
            print(json.dumps(results[-1]), flush=True)
    if not args.no_offline:
        results.append(offline_bco(args, train, held))
        print(json.dumps(results[-1]), flush=True)
    print("\n| run | answers judged | wall time | held-out pass rate before (control) | after | "
          "difference [95% CI] | wins / ties / losses |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        d = r["difference"]
        print(f"| {r['run']} | {r['answers']} | {r['seconds'] / 60:.1f} min | {fmt(r['before'])} | {fmt(r['after'])} | "
              f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {d['wins']} / {d['ties']} / "
              f"{d['losses']} |")
    if args.use_vllm:
        print_backends(args, results)


def print_backends(args, results: list[dict]) -> None:
    """transformers against vLLM, objective by objective: speed, memory, and the two held-out pass rates paired
    prompt by prompt (both runs answered the same held-out prompts greedily)."""
    print("\n| run | whole run | answers written per s (sampling) | peak RSS | held-out pass rate after |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        if "peak_rss" in r:
            rate = r["sampling_answers_per_s"]
            print(f"| {r['run']} | {r['seconds'] / 60:.1f} min | {rate:.2f} | {r['peak_rss'] / 2**30:.2f} GiB | "
                  f"{fmt(r['after'])} |")
    for objective in args.objectives:
        plain, fast = (next(r for r in results if r["run"] == f"{objective} ({kind})") for kind in
                       ("transformers", "vLLM"))
        print(f"{objective}: vLLM writes answers {fast['sampling_answers_per_s'] / plain['sampling_answers_per_s']:.2f}× "
              f"as fast, the whole run takes {fast['seconds'] / plain['seconds']:.2f}× the time; pass rate after "
              f"{fast['after']['thumbs_up_rate']:.3f} against {plain['after']['thumbs_up_rate']:.3f} "
              f"(intervals {fmt(fast['after'])} and {fmt(plain['after'])}); inside the transformers path's interval: "
              f"{plain['after']['ci95'][0] <= fast['after']['thumbs_up_rate'] <= plain['after']['ci95'][1]}")


if __name__ == "__main__":
    main()
