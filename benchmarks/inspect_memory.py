"""Peak memory of `thumbalign inspect` on a large generated JSONL file (default 1,000,000 rows).

    .venv/bin/python benchmarks/inspect_memory.py [--rows 1000000] [--model default|none]

Writes the file to a temporary folder, runs `thumbalign inspect --json` on it in a child process and prints the
child's wall time and peak resident memory (ru_maxrss), with the file's size for scale.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

from common import run_measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--model", default="default", help="tokenizer for token lengths, or 'none'")
    args = parser.parse_args()
    rng = random.Random(0)
    words = "the a model answer good bad helpful wrong thanks sorry question reply code bug fix great".split()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        with open(path, "w") as handle:
            for i in range(args.rows):
                prompt = " ".join(rng.choices(words, k=12)) + f" #{i}"
                completion = " ".join(rng.choices(words, k=24))
                handle.write(json.dumps({"prompt": prompt, "completion": completion, "label": rng.random() < 0.4}) + "\n")
        size_mb = path.stat().st_size / 2**20
        seconds, peak_mb, stdout = run_measured([sys.executable, "-m", "thumbalign", "inspect", str(path), "--json",
                                 "--model", args.model])
        report = json.loads(stdout)
    print(f"rows {args.rows:,}  file {size_mb:.0f} MiB  records {report['records']:,}  "
          f"prompt-shift AUC {report.get('prompt_shift_auc', float('nan')):.3f}")
    print(f"inspect: {seconds:.0f} s, peak RSS {peak_mb:.0f} MiB")


if __name__ == "__main__":
    main()
