"""Peak memory of reading every row of a 1 GB file: a JSON list, a JSON page ({"data": [...]}) and Parquet.

Each file is read by `thumbalign.data.readers.iter_rows` in a child process, whose own peak resident memory (VmHWM;
ru_maxrss would carry the parent's over the exec) is compared with the same reader on a 10-row file of the same kind.

    .venv/bin/python benchmarks/reader_memory.py [--gigabytes 1.0] [--work /tmp/reader-memory]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import sys
from thumbalign.data.readers import iter_rows
n = sum(1 for _ in iter_rows(sys.argv[1]))
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(n, int(peak.split()[1]) // 1024)
"""
ROW_BYTES = 4096


def rows(n: int):
    rng = random.Random(0)  # text that does not compress: the Parquet file is as large as the JSON ones
    for i in range(n):
        yield {"prompt": f"question {i} {rng.randbytes(ROW_BYTES // 4).hex()}",
               "completion": f"answer {i} {rng.randbytes(ROW_BYTES // 4).hex()}", "label": i % 2 == 0}


def write(path: Path, kind: str, n: int) -> Path:
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("label", pa.bool_())])
        with pq.ParquetWriter(path, schema) as writer:
            batch = []
            for row in rows(n):
                batch.append(row)
                if len(batch) == 4096:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        return path
    with open(path, "w") as handle:
        handle.write('{"meta": {"page": 1}, "data": [' if kind == "json-page" else "[")
        for i, row in enumerate(rows(n)):
            handle.write(("," if i else "") + json.dumps(row))
        handle.write("]}" if kind == "json-page" else "]")
    return path


def measure(path: Path) -> tuple[int, int, float]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    count, peak_mib = out.stdout.split()
    return int(count), int(peak_mib), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/reader-memory"))
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    n = int(args.gigabytes * 1e9 / ROW_BYTES)
    print("| file | size | rows | read in | peak RSS | of which beyond a 10-row file |")
    print("| --- | --- | --- | --- | --- | --- |")
    try:
        for kind in ("json-list", "json-page", "parquet"):
            suffix = ".parquet" if kind == "parquet" else ".json"
            big = write(args.work / f"big{suffix}", kind, n)
            small = write(args.work / f"small{suffix}", kind, 10)
            count, peak, seconds = measure(big)
            _, baseline, _ = measure(small)
            print(f"| {kind} | {big.stat().st_size / 1e9:.2f} GB | {count:,} | {seconds:.0f} s | {peak} MiB | "
                  f"{peak - baseline} MiB |", flush=True)
            big.unlink()
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
