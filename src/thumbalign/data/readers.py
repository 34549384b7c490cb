"""Where a file becomes rows: JSONL, JSON, CSV/TSV, Parquet, or a folder written by ``datasets.save_to_disk``.

Each row comes with where it was found ("line N", "item N", "row N"), so that every later error can name the file,
the place and the field. In CSV, a cell that holds a JSON list of messages is read as a conversation.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) from a data file; `where` is "line N" or "row N" for error messages. Stops with a
    :class:`DataError` at the first unreadable row."""
    for where, row in iter_raw_rows(path):
        if isinstance(row, DataError):
            raise row
        yield where, row


def iter_raw_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Like :func:`iter_rows`, but a row that cannot be read (broken JSON, bad UTF-8) comes back as its
    :class:`DataError` instead of ending the file, so that callers may count and skip it."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, None, "no such file or folder")
    if path.is_dir():
        yield from _iter_saved_dataset(path)
        return
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from _iter_jsonl(path)
    elif suffix == ".json":
        yield from _iter_json(path)
    elif suffix in (".csv", ".tsv"):
        yield from _iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
    elif suffix in (".parquet", ".pq"):
        yield from _iter_parquet(path)
    else:
        raise DataError(path, None, None,
                        f"unknown file type {suffix!r}; use .jsonl, .json, .csv, .parquet or a datasets folder")


def _iter_jsonl(path: Path):
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield where, DataError(path, where, None, f"not valid UTF-8 ({err.reason} at byte {err.start})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as err:
                detail = f"{err.msg} (column {err.colno})" if isinstance(err, json.JSONDecodeError) else "nested too deep"
                yield where, DataError(path, where, None, f"invalid JSON: {detail}")
                continue
            yield where, row


def _iter_json(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DataError(path, None, None, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise DataError(path, f"line {err.lineno}", None, f"invalid JSON: {err.msg} (column {err.colno})") from None
    except RecursionError:
        raise DataError(path, None, None, "invalid JSON: nested too deep") from None
    if isinstance(data, dict):  # {"data": [...]} or similar: one list-valued key
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(path, None, None, "expected a JSON list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(path, None, None, "expected a JSON list of records")
    for index, row in enumerate(data):
        yield f"item {index}", row


def _iter_csv(path: Path, delimiter: str):
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            for row in reader:
                # reader.line_num is the physical line where this row ended (the header is line 1)
                where = f"line {reader.line_num}"
                if None in row:
                    yield where, DataError(path, where, None, "more cells than the header has columns")
                    continue
                yield where, {k: _maybe_json_cell(v) for k, v in row.items()}
    except UnicodeDecodeError as err:
        raise DataError(path, None, None, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(path, None, None, f"invalid CSV: {err}") from None


def _maybe_json_cell(value):
    """A CSV cell that holds a JSON list (a conversation) is parsed; everything else stays text."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _iter_parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for broken files
        raise DataError(path, None, None, f"cannot read Parquet: {err}") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"row {index}", row


def _iter_saved_dataset(path: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(path, None, None, f"not a folder written by datasets.save_to_disk: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(path, None, None, f"a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    for index, row in enumerate(ds):
        yield f"row {index}", row


