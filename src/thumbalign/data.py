"""Where a feedback file becomes records.

Every supported layout is normalised to one canonical :class:`Record` (prompt, completion, label):

* unpaired, standard:        {"prompt": "...", "completion": "...", "label": true}
* unpaired, conversational:  {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}], "label": false}
* messages + label:          {"messages": [..., {"role": "assistant", "content": "..."}], "label": true}
                             (the last assistant turn is the completion, everything before it the prompt)
* paired:                    {"prompt", "chosen", "rejected"}            -> one thumbs-up and one thumbs-down row
* OpenAI preference format:  {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}

Files: JSONL, JSON (a list of objects), CSV, Parquet, or a folder written by ``datasets.save_to_disk``.
In CSV, a cell that holds a JSON list of messages is read as a conversation.
Every error names the file, the line (or row) and the field.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import DataError

Messages = list[dict[str, str]]
ROLES = {"system", "user", "assistant", "tool", "developer"}

_TRUE = {"true", "1", "+1", "up", "👍", "yes", "good", "positive"}
_FALSE = {"false", "0", "-1", "down", "👎", "no", "bad", "negative"}
LABEL_HELP = "expected true/false, 1/0, 1/-1, \"up\"/\"down\" or \"👍\"/\"👎\""


@dataclass
class Record:
    """One piece of binary feedback: a completion to a prompt, and whether it got a thumbs-up."""

    prompt: str | Messages
    completion: str | Messages
    label: bool
    source: str = ""  # "file, line N", for messages that point back at the input
    pair: int | None = None  # rows split from one preference pair share this id (chosen first)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class LoadReport:
    """What loading a file did: rows read, records made, pairs split."""

    path: str
    rows: int = 0
    records: int = 0
    pairs_split: int = 0
    by_label: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason -> rows (only with skip_invalid)

    def as_dict(self) -> dict:
        return {"path": self.path, "rows": self.rows, "records": self.records, "pairs_split": self.pairs_split,
                "thumbs_up": self.by_label[True], "thumbs_down": self.by_label[False],
                "skipped": dict(self.skipped)}


# ---------------------------------------------------------------------------------------------- labels

def parse_label(value: Any, path, where: str, key: str = "label") -> bool:
    """Read a thumbs-up/down label in any of the spellings people use; anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value == 1:
            return True
        if value in (0, -1):
            return False
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    raise DataError(path, where, key, f"cannot read {value!r} as a label; {LABEL_HELP}")


# ---------------------------------------------------------------------------------------------- readers

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


# ---------------------------------------------------------------------------------------------- rows -> records

def _text_or_messages(value, path, where, key, allow_empty=False):
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise DataError(path, where, key, "is empty")
        return value
    if isinstance(value, list):
        return _messages(value, path, where, key)
    raise DataError(path, where, key, f"expected a string or a list of messages, got {type(value).__name__}")


def _messages(value, path, where, key) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(path, where, key, "expected a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(path, where, f"{key}[{i}]", f"expected a message object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(path, where, f"{key}[{i}].role", f"unknown role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise DataError(path, where, f"{key}[{i}].content",
                            f"expected text, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _require(row, key, path, where):
    if key not in row or row[key] is None:
        raise DataError(path, where, key, f"missing (the row has {sorted(row)})")
    return row[key]


def _split_messages(messages: Messages, path, where, key="messages"):
    """Last assistant turn = completion; everything before it = prompt."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(path, where, key, "has no assistant message to use as the completion")
    if last == 0:
        raise DataError(path, where, key, "the assistant message has no prompt before it")
    if not messages[last]["content"].strip():
        raise DataError(path, where, f"{key}[{last}].content", "the completion is empty")
    return messages[:last], [messages[last]]


def _common_prefix(a: Messages, b: Messages) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def row_to_records(row, path, where) -> list[Record]:
    """Turn one input row into one record (unpaired) or two (a pair split into thumbs-up and thumbs-down)."""
    if not isinstance(row, dict):
        raise DataError(path, where, None, f"expected an object with fields, got {type(row).__name__}")
    source = f"{path}, {where}"

    if "preferred_output" in row or "non_preferred_output" in row:  # OpenAI preference fine-tuning
        inp = _require(row, "input", path, where)
        prompt = _messages(inp.get("messages") if isinstance(inp, dict) else None, path, where, "input.messages")
        good = _messages(_require(row, "preferred_output", path, where), path, where, "preferred_output")
        bad = _messages(_require(row, "non_preferred_output", path, where), path, where, "non_preferred_output")
        return [Record(prompt, good, True, source), Record(prompt, bad, False, source)]

    if "chosen" in row or "rejected" in row:  # paired preference data
        chosen = _text_or_messages(_require(row, "chosen", path, where), path, where, "chosen")
        rejected = _text_or_messages(_require(row, "rejected", path, where), path, where, "rejected")
        if row.get("prompt") is not None:
            prompt = _text_or_messages(row["prompt"], path, where, "prompt")
        elif isinstance(chosen, list) and isinstance(rejected, list):
            # implicit prompt: the shared start of both conversations
            n = _common_prefix(chosen, rejected)
            if n == 0:
                raise DataError(path, where, "prompt", "missing, and chosen/rejected share no leading messages")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            _require(row, "prompt", path, where)
        if isinstance(prompt, list) != isinstance(chosen, list) or isinstance(chosen, list) != isinstance(rejected, list):
            raise DataError(path, where, "prompt", "mixes plain text and message lists")
        return [Record(prompt, chosen, True, source), Record(prompt, rejected, False, source)]

    label = parse_label(_require(row, "label", path, where), path, where)
    if "messages" in row and "completion" not in row:
        prompt, completion = _split_messages(_messages(row["messages"], path, where, "messages"), path, where)
        return [Record(prompt, completion, label, source)]

    prompt = _text_or_messages(_require(row, "prompt", path, where), path, where, "prompt")
    completion = _text_or_messages(_require(row, "completion", path, where), path, where, "completion")
    if isinstance(prompt, list) != isinstance(completion, list):
        raise DataError(path, where, "completion", "the prompt and the completion must both be text or both be messages")
    if isinstance(completion, list) and not any(m["content"].strip() for m in completion):
        raise DataError(path, where, "completion", "is empty")
    return [Record(prompt, completion, label, source)]


def skip_reason(err: DataError) -> str:
    """A row error without its specifics, to count skipped rows by kind: "label: cannot read … as a label"."""
    generic = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "…", err.message)
    return f"{err.field or 'row'}: {generic.split(';')[0]}"


def load_records(path: str | Path, skip_invalid: bool = False) -> tuple[list[Record], LoadReport]:
    """Read every record of a feedback file. A bad row raises :class:`DataError`, or with `skip_invalid` is
    skipped and counted by reason in ``report.skipped``."""
    report = LoadReport(str(path))
    records: list[Record] = []
    for where, row in iter_raw_rows(path):
        report.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            made = row_to_records(row, path, where)
        except DataError as err:
            if not skip_invalid or err.where is None:  # a file-level problem is never skippable
                raise
            report.skipped[skip_reason(err)] += 1
            continue
        if len(made) == 2:
            for record in made:
                record.pair = report.pairs_split
            report.pairs_split += 1
        for record in made:
            report.by_label[record.label] += 1
        records.extend(made)
    report.records = len(records)
    if not records:
        raise DataError(path, None, None, "holds no records")
    return records, report


def require_both_labels(report: LoadReport) -> None:
    """Binary-classifier methods need both classes; say how many of each there are."""
    up, down = report.by_label[True], report.by_label[False]
    if up == 0 or down == 0:
        raise DataError(report.path, None, "label",
                        f"needs both thumbs-up and thumbs-down examples, found {up} up and {down} down")
