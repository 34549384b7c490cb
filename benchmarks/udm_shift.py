"""Does UDM help when 👍 and 👎 prompts come from different distributions? Train BCO with and without --udm on a
shifted feedback set, evaluate both on unshifted held-out feedback, print the numbers.

    .venv/bin/python benchmarks/udm_shift.py [--steps 40] [--keep-minor 0.15]

The feedback is examples/feedback.jsonl (the default model's answers, labelled by VADER sentiment; rebuilt by
examples/make_feedback.py if missing). Its 30 prompt topics are split in two halves A and B. The held-out set is a
random quarter of the rows, untouched. From the rest, the training set keeps every 👍 of topics A and every 👎 of
topics B, but only a share --keep-minor of the 👍 of B and the 👎 of A: a model can then lower its error by
learning "topic A is good" instead of "upbeat answers are good". Both runs use the same seed, steps and settings.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def topics() -> list[str]:
    spec = importlib.util.spec_from_file_location("make_feedback", EXAMPLES / "make_feedback.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TOPICS


def build_sets(out: Path, keep_minor: float, seed: int) -> tuple[Path, Path]:
    source = EXAMPLES / "feedback.jsonl"
    if not source.exists():
        subprocess.run([sys.executable, str(EXAMPLES / "make_feedback.py")], check=True)
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    held, rest = rows[: len(rows) // 4], rows[len(rows) // 4:]
    all_topics = topics()
    group_a = set(all_topics[::2])

    def in_a(row):
        text = row["prompt"][0]["content"]
        return any(t in text for t in group_a)

    train = [r for r in rest
             if (r["label"] == in_a(r)) or rng.random() < keep_minor]  # 👍 of A, 👎 of B, and a few of the others
    out.mkdir(parents=True, exist_ok=True)
    train_path, held_path = out / "shifted_train.jsonl", out / "heldout.jsonl"
    for path, subset in ((train_path, train), (held_path, held)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in subset))
    return train_path, held_path


def thumbalign(*args) -> None:
    subprocess.run([sys.executable, "-m", "thumbalign", *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--keep-minor", type=float, default=0.15)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "runs" / "udm_shift"))
    args = parser.parse_args()
    out = Path(args.out)
    train_path, held_path = build_sets(out, args.keep_minor, args.seed)
    inspect = subprocess.run([sys.executable, "-m", "thumbalign", "inspect", str(train_path), "--json"],
                             check=True, capture_output=True, text=True)
    report = json.loads(inspect.stdout)
    results = {}
    for name, extra in (("bco", []), ("bco --udm", ["--udm"])):
        run_dir = out / name.replace(" --", "-")
        start = time.perf_counter()
        thumbalign("train", "--data", str(train_path), "--eval-data", str(held_path), "--output-dir", str(run_dir),
                   "--overwrite", "--max-steps", str(args.steps), "--learning-rate", str(args.learning_rate),
                   "--max-length", "256", "--logging-steps", "10", "--save-steps", "1000", "--seed", str(args.seed),
                   *extra)
        summary = json.loads((run_dir / "summary.json").read_text())
        results[name] = (summary["eval_after"], time.perf_counter() - start, summary.get("udm"))
    print()
    print(f"training set: {report['records']} records ({report['thumbs_up']} 👍, {report['thumbs_down']} 👎), "
          f"prompt-shift AUC {report['prompt_shift_auc']:.3f}; held-out: unshifted, "
          f"{results['bco'][0]['n']} records; {args.steps} steps, lr {args.learning_rate}")
    print(f"{'method':<12} {'held-out acc':>12} {'ROC AUC':>8} {'acc 👍':>7} {'acc 👎':>7} {'seconds':>8}")
    for name, (m, seconds, _) in results.items():
        print(f"{name:<12} {m['accuracy']:>12.3f} {m['auc']:>8.3f} {m['accuracy_up']:>7.3f} "
              f"{m['accuracy_down']:>7.3f} {seconds:>8.0f}")
    udm = results["bco --udm"][2]
    print(f"UDM weights of 👎 examples: min {udm['min']:.2f}, mean {udm['mean']:.2f}, max {udm['max']:.2f}, "
          f"{udm['share_clipped']:.0%} clipped")


if __name__ == "__main__":
    main()
