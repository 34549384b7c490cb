"""Peak memory of `thumbalign import --from generic` on a large generated export (default 1,000,000 rows).

    .venv/bin/python benchmarks/import_memory.py [--rows 1000000]

Writes a JSONL export with custom column names to a temporary folder, imports it in a child process with a column
mapping and a label map, and prints the child's wall time and peak resident memory (ru_maxrss).
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
    args = parser.parse_args()
    rng = random.Random(0)
    words = "the a model answer good bad helpful wrong thanks sorry question reply code bug fix great".split()
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "export.jsonl", Path(tmp) / "feedback.jsonl"
        with open(source, "w") as handle:
            for i in range(args.rows):
                handle.write(json.dumps({"question": " ".join(rng.choices(words, k=12)) + f" #{i}",
                                         "answer": " ".join(rng.choices(words, k=30)),
                                         "thumb": rng.choice(["up", "down"])}) + "\n")
        size_mb = source.stat().st_size / 2**20
        seconds, peak_mb, stdout = run_measured([sys.executable, "-m", "thumbalign", "import", str(source), "--from", "generic",
                                 "-o", str(out), "--prompt-field", "question", "--completion-field", "answer",
                                 "--label-field", "thumb", "--label-map", "up=1,down=0", "--json"])
        summary = json.loads(stdout)
    print(f"rows {args.rows:,}  export {size_mb:.0f} MiB  written {summary['written_up'] + summary['written_down']:,}"
          f"  skipped {sum(summary['skipped'].values()):,}")
    print(f"import: {seconds:.0f} s, peak RSS {peak_mb:.0f} MiB")


if __name__ == "__main__":
    main()
