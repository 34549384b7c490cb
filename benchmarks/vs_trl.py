"""thumbalign vs TRL 1.13's BCOTrainer on the same machine, model, data and settings, alternating A/B.

    .venv/bin/python benchmarks/vs_trl.py [--steps 23] [--warmup 3] [--rounds 1] [--modes full,lora]

First run creates benchmarks/.venv-trl with trl==1.13.0 (the last TRL release with BCO) and torch==2.13.0; later
runs reuse it. Both tools train the default SmolLM2-135M-Instruct on the first 256 rows of examples/feedback.jsonl,
batch 8, max length 256, float32 (emulated bf16 is >10x slower on CPUs without bf16 units), no gradient
checkpointing, learning rate 5e-6, β 0.1, linear decay without warm-up. Each run is a separate process; its peak RSS
comes from wait4. Throughput is measured over the steps after --warmup (median step time); tokens/s = samples/s ×
the mean tokens of a row (the same rows for both). MFU = 6·params·tokens/s ÷ the float32 matmul peak this script
measures. thumbalign's one-off reference log-prob pass (cached for later runs) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import run_measured

ROOT = Path(__file__).resolve().parents[1]
TRL_ENV = ROOT / "benchmarks" / ".venv-trl"


def ensure_trl_env() -> Path:
    python = TRL_ENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_ENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "trl==1.13.0", "peft"],
                       check=True)
    return python


def matmul_peak_gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048 ** 3 / min(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=23)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--lr", type=float, default=5e-6)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from thumbalign.engine.models import load_tokenizer, resolve_model
    from thumbalign.data.records import load_records
    from thumbalign.data.tokens import tokenize_records

    trl_python = ensure_trl_env()
    model_dir = resolve_model("default")
    tmp = Path(tempfile.mkdtemp(prefix="vs-trl-"))
    rows = (ROOT / "examples" / "feedback.jsonl").read_text().splitlines()[:256]
    data = tmp / "feedback256.jsonl"
    data.write_text("\n".join(rows) + "\n")
    examples, _ = tokenize_records(load_tokenizer(model_dir), load_records(data)[0], 256)
    mean_tokens = statistics.mean(len(e.input_ids) for e in examples)
    params = 134_515_008
    peak = matmul_peak_gflops()
    batch = 8
    results: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for mode in args.modes.split(","):
            lora = ["--lora"] if mode == "lora" else []
            out = tmp / f"trl-{mode}-{round_}.json"
            wall, rss, stdout = run_measured([str(trl_python), str(ROOT / "benchmarks" / "trl_bco_runner.py"),
                                              "--model", str(model_dir), "--data", str(data), "--steps",
                                              str(args.steps), "--lr", str(args.lr), "--out", str(out), *lora])
            trl = json.loads(stdout.strip().splitlines()[-1])
            ends = trl["step_end_times"]
            step_s = statistics.median(b - a for a, b in zip(ends[args.warmup:], ends[args.warmup + 1:]))
            losses = [l for l in trl["logs"] if "loss" in l]
            results.setdefault(f"trl {mode}", []).append({
                "samples_s": batch / step_s, "rss": rss, "wall": wall, "loss1": losses[0]["loss"],
                "loss_last": losses[-1]["loss"], "delta1": losses[0].get("delta")})

            run_dir = tmp / f"ta-{mode}-{round_}"
            lora = ["--use-lora"] if mode == "lora" else []
            wall, rss, _ = run_measured(
                [sys.executable, "-m", "thumbalign", "train", "--data", str(data), "--model", str(model_dir),
                 "--output-dir", str(run_dir), "--max-steps", str(args.steps), "--per-device-train-batch-size",
                 str(batch), "--learning-rate", str(args.lr), "--max-length", "256", "--bf16", "false",
                 "--warmup-ratio", "0", "--logging-steps", "1", "--save-steps", "100000", "--no-report", "--seed", "0",
                 "--cache-dir", str(tmp / f"cache-{mode}-{round_}"), *lora])
            metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
            step_s = statistics.median(m["samples_per_s"] for m in metrics[args.warmup:])
            results.setdefault(f"thumbalign {mode}", []).append({
                "samples_s": step_s, "rss": rss, "wall": wall, "loss1": metrics[0]["loss"],
                "loss_last": metrics[-1]["loss"], "delta1": metrics[0]["delta"]})

    print(f"\nmachine: {os.cpu_count()} cores; float32 matmul peak {peak:.0f} GFLOP/s; model SmolLM2-135M; "
          f"256 rows, mean {mean_tokens:.0f} tokens/row; batch {batch}; {args.steps} steps, median over the last "
          f"{args.steps - args.warmup}; {args.rounds} round(s), A/B alternating")
    header = f"{'run':<16} {'samples/s':>9} {'tokens/s':>9} {'MFU':>6} {'peak RSS GB':>11} {'wall s':>7} " \
             f"{'loss@1':>7} {'δ@1':>7} {'loss@last':>9}"
    print(header)
    summary = {}
    for name, runs in results.items():
        s = statistics.median(r["samples_s"] for r in runs)
        rss = statistics.median(r["rss"] for r in runs) / 1024
        tok = s * mean_tokens
        mfu = 6 * params * tok / (peak * 1e9)
        summary[name] = (s, rss)
        delta = runs[0]["delta1"]
        print(f"{name:<16} {s:>9.2f} {tok:>9.0f} {mfu:>6.1%} {rss:>11.2f} {statistics.median(r['wall'] for r in runs):>7.0f} "
              f"{runs[0]['loss1']:>7.4f} {'n/a' if delta is None else format(delta, '.4f'):>7} "
              f"{runs[-1]['loss_last']:>9.4f}")
    for mode in args.modes.split(","):
        (ts, tr), (rs, rr) = summary[f"thumbalign {mode}"], summary[f"trl {mode}"]
        print(f"{mode}: thumbalign/TRL samples/s ×{ts / rs:.2f}, peak RSS ×{tr / rr:.2f}")


if __name__ == "__main__":
    main()
