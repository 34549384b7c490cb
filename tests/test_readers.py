"""Files as users have them: byte-order marks, UTF-16/32, one record or an API page in a JSON file, and memory that
stays bounded however large the file (measured in a child process)."""

import codecs
import json
import subprocess
import sys

import pytest

from thumbalign.data.readers import iter_rows
from thumbalign.data.records import load_records
from thumbalign.errors import DataError

ROWS = [{"prompt": "Café?", "completion": "Très bon — 👍", "label": True},
        {"prompt": "Zwei\nZeilen", "completion": "nein", "label": False}]


def _csv_text(rows) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["prompt", "completion", "label"], lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


ENCODINGS = [("utf-8-sig", codecs.BOM_UTF8, "utf-8"), ("utf-16-le", codecs.BOM_UTF16_LE, "utf-16-le"),
             ("utf-16-be", codecs.BOM_UTF16_BE, "utf-16-be"), ("utf-32-le", codecs.BOM_UTF32_LE, "utf-32-le")]


@pytest.mark.parametrize("name,bom,codec", ENCODINGS)
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_byte_order_marks_and_wide_encodings_read_as_utf8(tmp_path, name, bom, codec, suffix):
    text = {".jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS),
            ".json": json.dumps(ROWS, ensure_ascii=False), ".csv": _csv_text(ROWS)}[suffix]
    path = tmp_path / f"f{suffix}"
    path.write_bytes(bom + text.encode(codec))
    records, _ = load_records(path)
    assert [(r.prompt, r.completion, r.label) for r in records] == [(r["prompt"], r["completion"], r["label"])
                                                                     for r in ROWS]


def test_undecodable_bytes_name_the_file_and_the_byte_offset(tmp_path):
    good = json.dumps(ROWS[0]).encode() + b"\n"
    path = tmp_path / "f.jsonl"
    path.write_bytes(good + b'{"prompt": "\xff\xfe bad", "completion": "c", "label": true}\n')
    with pytest.raises(DataError, match=rf"f\.jsonl, line 2: not valid UTF-8 \(invalid start byte at byte "
                                        rf"{len(good) + 12}\)"):
        load_records(path)
    records, report = load_records(path, skip_invalid=True)  # a bad line can be skipped, and is counted
    assert len(records) == 1 and sum(report.skipped.values()) == 1
    csv_path = tmp_path / "f.csv"
    header = b"prompt,completion,label\r\n"
    csv_path.write_bytes(header + b"ok,fine,1\r\n" + b"caf\xe9,x,0\r\n")
    with pytest.raises(DataError, match=rf"f\.csv: not valid UTF-8 \(invalid continuation byte at byte "
                                        rf"{len(header) + 11 + 3}\)"):
        load_records(csv_path)
    wide = tmp_path / "w.jsonl"
    wide.write_bytes(codecs.BOM_UTF16_LE + "{}\n".encode("utf-16-le") + b"\x00\xd8\x41\x00")  # a lone surrogate
    with pytest.raises(DataError, match=r"w\.jsonl: not valid UTF-16 \(.*at byte 8\)"):
        list(iter_rows(wide))


def test_a_json_file_holding_one_record_is_one_record(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
              "label": True}
    (tmp_path / "one.json").write_text(json.dumps(record))
    records, _ = load_records(tmp_path / "one.json")
    assert len(records) == 1 and records[0].completion == [{"role": "assistant", "content": "yo"}]
    (tmp_path / "page.json").write_text(json.dumps({"meta": {"page": 1}, "data": ROWS, "next": None}))
    assert [row["prompt"] for _, row in iter_rows(tmp_path / "page.json")] == ["Café?", "Zwei\nZeilen"]
    (tmp_path / "two.json").write_text(json.dumps({"a": ROWS, "b": ROWS}))
    with pytest.raises(DataError, match="holds 2 lists"):
        load_records(tmp_path / "two.json")
    (tmp_path / "broken.json").write_text('[{"prompt": "a", "completion": "b", "label": true}, {"prompt": ')
    with pytest.raises(DataError, match=r"broken\.json: invalid JSON"):
        load_records(tmp_path / "broken.json")


# VmHWM is this process's own peak resident memory (ru_maxrss would carry the forking parent's over the exec)
MEASURE = """
import sys
from thumbalign.data.readers import iter_rows
n = sum(1 for _ in iter_rows(sys.argv[1]))
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(n, peak.split()[1])
"""


def _peak_rss_kib(path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows, kib = out.stdout.split()
    return int(rows), int(kib)


def _big_rows(n):
    import random

    rng = random.Random(0)  # text that does not compress, so that Parquet files are as large as the JSON ones
    for i in range(n):
        yield {"prompt": f"question {i} {rng.randbytes(1000).hex()}", "completion": f"answer {i} "
               f"{rng.randbytes(1000).hex()}", "label": i % 2 == 0}


def _write(path, kind, n):
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("prompt", pa.string()), ("completion", pa.string()), ("label", pa.bool_())])
        with pq.ParquetWriter(path, schema) as writer:
            batch = []
            for row in _big_rows(n):
                batch.append(row)
                if len(batch) == 2000:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        return path
    with open(path, "w") as handle:
        handle.write('{"data": [' if kind == "json-page" else "[")
        for i, row in enumerate(_big_rows(n)):
            handle.write(("," if i else "") + json.dumps(row))
        handle.write("]}" if kind == "json-page" else "]")
    return path


@pytest.mark.parametrize("kind", ["json-list", "json-page", "parquet"])
def test_large_files_stream_in_bounded_memory(tmp_path, kind):
    """120 MB of JSON, 360 MB of Parquet; reading every row must not cost anywhere near the file's size (measured
    in a child process against the same reader on a 10-row file of the same kind, so that library imports are not
    counted). Parquet is read row group by row group: its bound is a row group, not the file."""
    suffix = ".parquet" if kind == "parquet" else ".json"
    n = 90_000 if kind == "parquet" else 30_000
    big = _write(tmp_path / f"big{suffix}", kind, n)
    small = _write(tmp_path / f"small{suffix}", kind, 10)
    size_kib = big.stat().st_size // 1024
    rows, peak = _peak_rss_kib(big)
    growth = peak - _peak_rss_kib(small)[1]
    assert rows == n and size_kib > 100_000
    assert growth < size_kib / 3, f"reading {size_kib} KiB grew the process by {growth} KiB"
