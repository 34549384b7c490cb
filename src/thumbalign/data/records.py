"""Where a feedback file becomes records.

Every supported layout is normalised to one canonical :class:`Record` (prompt, completion, label):

* unpaired, standard:        {"prompt": "...", "completion": "...", "label": true}
* unpaired, conversational:  {"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}],
                             "label": false}
* messages + label:          {"messages": [..., {"role": "assistant", "content": "..."}], "label": true}
                             (the last assistant turn is the completion, everything before it the prompt)
* paired:                    {"prompt", "chosen", "rejected"}            -> one thumbs-up and one thumbs-down row
* OpenAI preference format:  {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}

Rows come from :mod:`thumbalign.data.readers`. Every error names the file, the line (or row) and the field.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .readers import Source, iter_raw_rows, iter_rows

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
    fields: dict[str, Any] = field(default_factory=dict)  # further row fields a method asked for (rank, comment…)

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


# ---------------------------------------------------------------------------------------------- rows -> records

def text_or_messages(value, path, where, key, allow_empty=False):
    if isinstance(value, str):
        if not value.strip() and not allow_empty:
            raise DataError(path, where, key, "is empty")
        return value
    if isinstance(value, list):
        return parse_messages(value, path, where, key)
    raise DataError(path, where, key, f"expected a string or a list of messages, got {type(value).__name__}")


def parse_messages(value, path, where, key) -> Messages:
    if not isinstance(value, list) or not value:
        raise DataError(path, where, key, "expected a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(path, where, f"{key}[{i}]", f"expected a message object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or role not in ROLES:  # a list or an object is no role (and not hashable)
            raise DataError(path, where, f"{key}[{i}].role", f"unknown role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise DataError(path, where, f"{key}[{i}].content",
                            f"expected text, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def require_field(row, key, path, where):
    if key not in row or row[key] is None:
        raise DataError(path, where, key, f"missing (the row has {sorted(row)})")
    return row[key]


def split_messages(messages: Messages, path, where, key="messages"):
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


# the fields a row's feedback is read from; `keep=OTHER_FIELDS` keeps every other one (a reference answer, a kind)
FEEDBACK_FIELDS = frozenset({"prompt", "completion", "label", "messages", "chosen", "rejected", "input",
                             "preferred_output", "non_preferred_output"})
OTHER_FIELDS = ("*",)


def row_to_records(row, path, where, keep: tuple[str, ...] = ()) -> list[Record]:
    """Turn one input row into one record (unpaired) or two (a pair split into thumbs-up and thumbs-down); the
    row's fields named in `keep` travel with each record in ``record.fields``."""
    made = _row_to_records(row, path, where)
    if keep == OTHER_FIELDS:
        keep = tuple(name for name in row if name not in FEEDBACK_FIELDS)
    kept = {name: row[name] for name in keep if row.get(name) is not None}
    for record in made:
        record.fields = dict(kept)
    return made


def _row_to_records(row, path, where) -> list[Record]:
    if not isinstance(row, dict):
        raise DataError(path, where, None, f"expected an object with fields, got {type(row).__name__}")
    source = f"{path}, {where}"

    if "preferred_output" in row or "non_preferred_output" in row:  # OpenAI preference fine-tuning
        inp = require_field(row, "input", path, where)
        prompt = parse_messages(inp.get("messages") if isinstance(inp, dict) else None, path, where, "input.messages")
        good = parse_messages(require_field(row, "preferred_output", path, where), path, where, "preferred_output")
        bad = parse_messages(require_field(row, "non_preferred_output", path, where), path, where,
                             "non_preferred_output")
        return [Record(prompt, good, True, source), Record(prompt, bad, False, source)]

    if "chosen" in row or "rejected" in row:  # paired preference data
        chosen = text_or_messages(require_field(row, "chosen", path, where), path, where, "chosen")
        rejected = text_or_messages(require_field(row, "rejected", path, where), path, where, "rejected")
        if row.get("prompt") is not None:
            prompt = text_or_messages(row["prompt"], path, where, "prompt")
        elif isinstance(chosen, list) and isinstance(rejected, list):
            # implicit prompt: the shared start of both conversations
            n = _common_prefix(chosen, rejected)
            if n == 0:
                raise DataError(path, where, "prompt", "missing, and chosen/rejected share no leading messages")
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            require_field(row, "prompt", path, where)
        kinds = {isinstance(prompt, list), isinstance(chosen, list), isinstance(rejected, list)}
        if len(kinds) > 1:
            raise DataError(path, where, "prompt", "mixes plain text and message lists")
        return [Record(prompt, chosen, True, source), Record(prompt, rejected, False, source)]

    label = parse_label(require_field(row, "label", path, where), path, where)
    if "messages" in row and "completion" not in row:
        prompt, completion = split_messages(parse_messages(row["messages"], path, where, "messages"), path, where)
        return [Record(prompt, completion, label, source)]

    prompt = text_or_messages(require_field(row, "prompt", path, where), path, where, "prompt")
    completion = text_or_messages(require_field(row, "completion", path, where), path, where, "completion")
    if isinstance(prompt, list) != isinstance(completion, list):
        raise DataError(path, where, "completion",
                        "the prompt and the completion must both be text or both be messages")
    if isinstance(completion, list) and not any(m["content"].strip() for m in completion):
        raise DataError(path, where, "completion", "is empty")
    return [Record(prompt, completion, label, source)]


def skip_reason(err: DataError) -> str:
    """A row error without its specifics, to count skipped rows by kind: "label: cannot read … as a label"."""
    generic = re.sub(r"'[^']*'|\"[^\"]*\"|\d+", "…", err.message)
    return f"{err.field or 'row'}: {generic.split(';')[0]}"


def load_records(source: str | Path | Source, skip_invalid: bool = False,
                 keep: tuple[str, ...] = ()) -> tuple[list[Record], LoadReport]:
    """Read every record of a feedback file (or Hub dataset). A bad row raises :class:`DataError`, or with
    `skip_invalid` is skipped and counted by reason in ``report.skipped``. Row fields named in `keep` are kept in
    ``record.fields``."""
    path = str(source)
    report = LoadReport(path)
    records: list[Record] = []
    for where, row in iter_raw_rows(source):
        report.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            made = row_to_records(row, path, where, keep)
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


def prompt_as_text(prompt: str | Messages) -> str:
    """The text a sentence encoder sees for a prompt: a plain string, or the conversation's turns one per line."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def row_to_unlabelled_record(row, path, where) -> Record:
    """A row to be scored rather than trained on: prompt and completion (or messages); a label is not needed."""
    if not isinstance(row, dict):
        raise DataError(path, where, None, f"expected an object with fields, got {type(row).__name__}")
    if "messages" in row and "completion" not in row:
        prompt, completion = split_messages(parse_messages(row["messages"], path, where, "messages"), path, where)
    else:
        prompt = text_or_messages(require_field(row, "prompt", path, where), path, where, "prompt")
        completion = text_or_messages(require_field(row, "completion", path, where), path, where, "completion")
        if isinstance(prompt, list) and isinstance(completion, str):  # a text answer to a conversation
            completion = [{"role": "assistant", "content": completion}]
        elif isinstance(prompt, str) and isinstance(completion, list):
            raise DataError(path, where, "completion", "a message-list completion to a text prompt")
    return Record(prompt, completion, False, f"{path}, {where}")  # any label is left unread: nothing trains on it


def load_unlabelled(path: str | Path) -> tuple[list[dict], list[Record]]:
    """Every row of a file to be scored, with its record."""
    rows, records = [], []
    for where, row in iter_rows(path):
        records.append(row_to_unlabelled_record(row, path, where))
        rows.append(row)
    return rows, records


def with_principle(record: Record, principle: str) -> Record:
    """The record a principle-following reward model reads (RLBFF): the conversation, the answer, then the question
    whether the answer satisfies `principle`, so that the score, read at the last token, is that yes/no."""
    question = f"Does the response satisfy this principle: {principle}"
    if record.conversational:
        completion = list(record.completion) + [{"role": "user", "content": question}]
    else:
        completion = f"{record.completion}\n\n{question}"
    return Record(record.prompt, completion, record.label, record.source, record.pair, record.fields)


def principle_of(record: Record, field_name: str) -> str:
    """The record's principle (a non-empty string in the row's `field_name`); anything else names the row."""
    value = record.fields.get(field_name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(record.source or "a row", None, field_name,
                        "missing or empty: a principle-following reward model needs each row's principle"
                        if value is None or isinstance(value, str) else f"expected text, got {type(value).__name__}")
    return value.strip()


def with_feedback(record: Record, comment: str) -> Record:
    """The answer followed by the textual feedback it got (LeTI): what a 👎 row trains on when it has a comment."""
    tail = f"\n\nFeedback: {comment.strip()}"
    if record.conversational:
        completion = [dict(m) for m in record.completion]
        completion[-1]["content"] += tail
    else:
        completion = record.completion + tail
    return Record(record.prompt, completion, record.label, record.source, record.pair, record.fields)
