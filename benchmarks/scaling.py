"""How training cost grows: samples/s and peak memory of `thumbalign train` versus completion length and batch size.

    .venv/bin/python benchmarks/scaling.py [--lengths 64,128,256,512,1024] [--batches 1,4,8] [--steps 4]
                                           [--base-length 128] [--base-batch 8] [--lora]

Each point is a separate `thumbalign train` process on the default model, on synthetic feedback whose completions
have the requested number of tokens (prompt ≈ 30 tokens); samples/s is the median over the steps after the first,
peak RSS comes from wait4. The length scan uses --base-batch, the batch scan --base-length.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

from common import run_measured


def feedback(path: Path, rows: int, completion_tokens: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = "good bad answer model helpful wrong thanks sorry great reply code fix".split()
    with open(path, "w") as handle:
        for i in range(rows):
            # one short word is about one token for SmolLM2's tokenizer; the exact count is printed by the run
            completion = " ".join(rng.choices(words, k=completion_tokens))
            handle.write(json.dumps({"prompt": f"Question {i}: " + " ".join(rng.choices(words, k=24)),
                                     "completion": completion, "label": i % 2 == 0}) + "\n")


def point(tmp: Path, length: int, batch: int, steps: int, lora: bool) -> tuple[float, float]:
    data = tmp / f"f-{length}.jsonl"
    if not data.exists():
        feedback(data, max(2, batch * steps), length)
    run = tmp / f"run-{length}-{batch}"
    _, rss, _ = run_measured([sys.executable, "-m", "thumbalign", "train", "--data", str(data), "--output-dir", str(run),
                              "--overwrite", "--max-steps", str(steps), "--per-device-train-batch-size", str(batch),
                              "--max-length", str(length + 64), "--logging-steps", "1", "--save-steps", "100000",
                              "--no-report", "--bf16", "false", "--cache-dir", str(tmp / "cache"),
                              *(["--use-lora"] if lora else [])])
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(m["samples_per_s"] for m in metrics[1:] or metrics), rss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="64,128,256,512,1024")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--base-length", type=int, default=128)
    parser.add_argument("--base-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lora", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scaling-"))
    print(f"{'completion tokens':>17} {'batch':>5} {'samples/s':>9} {'peak RSS GB':>11}")
    for length in map(int, args.lengths.split(",")):
        s, rss = point(tmp, length, args.base_batch, args.steps, args.lora)
        print(f"{length:>17} {args.base_batch:>5} {s:>9.2f} {rss:>11.2f}", flush=True)
    for batch in map(int, args.batches.split(",")):
        s, rss = point(tmp, args.base_length, batch, args.steps, args.lora)
        print(f"{args.base_length:>17} {batch:>5} {s:>9.2f} {rss:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
