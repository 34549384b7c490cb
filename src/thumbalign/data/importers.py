"""`thumbalign import`: feedback exports of observability tools and chat UIs -> the canonical training file.

Every source is streamed. Sources that keep the rated conversation apart from the rating (Langfuse scores and
traces, LangSmith feedback and runs) are joined through an on-disk SQLite index of the conversations, so memory
stays bounded whatever the export's size. Output rows are {"prompt", "completion", "label"} (plus "comment" with
--keep-comments); conversations stay message lists, system prompts included. Nothing is dropped silently: every
skipped row is counted under its reason, identical rows are written once, and conflicting labels are reported.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .readers import iter_rows
from .records import parse_label, row_to_records
from ..errors import ConfigError, DataError
from ..files import write_atomically

SOURCES = ("openwebui", "langfuse", "langsmith", "openai", "generic")


class Skip(Exception):
    """A source row that becomes no training row, for a reason that is counted."""


# --------------------------------------------------------------------------------------------- streaming readers

# --------------------------------------------------------------------------------------------- conversions

def _text(value) -> str | None:
    return value if isinstance(value, str) else None


LC_ROLES = {"HumanMessage": "user", "AIMessage": "assistant", "SystemMessage": "system", "ToolMessage": "tool",
            "ChatMessage": None, "HumanMessageChunk": "user", "AIMessageChunk": "assistant"}


def _message(value) -> dict:
    """One chat message from the shapes tools store: {role, content}, LangChain's serialised form, content parts."""
    if not isinstance(value, dict):
        raise Skip("message is not an object")
    if value.get("lc") == 1 and "kwargs" in value:  # LangChain dumpd()
        kwargs = value["kwargs"]
        role = LC_ROLES.get(str(value.get("id", [""])[-1])) or kwargs.get("role")
        value = {"role": role, "content": kwargs.get("content"), "tool_calls": kwargs.get("tool_calls")}
    role = value.get("role") or {"human": "user", "ai": "assistant"}.get(str(value.get("type")))
    if value.get("tool_calls") or value.get("function_call") or role in ("tool", "function"):
        raise Skip("tool calls")
    content = value.get("content")
    if isinstance(content, list):  # content parts: keep text, refuse images and the like
        if any(not (isinstance(c, dict) and c.get("type") == "text") for c in content):
            raise Skip("non-text content")
        content = "".join(c.get("text", "") for c in content)
    if role not in ("system", "user", "assistant", "developer") or not isinstance(content, str):
        raise Skip("unreadable message")
    return {"role": role, "content": content}


def as_prompt(value) -> str | list[dict]:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "messages" in value:
        value = value["messages"]
    if isinstance(value, list) and value and isinstance(value[0], list):  # LangChain batches: [[messages]]
        value = value[0]
    if isinstance(value, list) and value:
        return [_message(m) for m in value]
    if isinstance(value, dict):
        texts = [v for v in value.values() if isinstance(v, str)]
        if len(value) == 1 and texts:  # {"question": "..."}
            return texts[0]
    raise Skip("cannot tell the prompt")


def as_completion(value) -> str | dict:
    """The answer as text, or as one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if "generations" in value:  # LangChain LLMResult
            gen = value["generations"][0][0] if value["generations"] and value["generations"][0] else {}
            return _message(gen["message"]) if gen.get("message") else as_completion(gen.get("text"))
        if "choices" in value:  # OpenAI ChatCompletion
            return as_completion(value["choices"][0].get("message") if value["choices"] else None)
        if "role" in value or value.get("lc") == 1:
            return _message(value)
        texts = [v for v in value.values() if isinstance(v, str)]
        if len(value) == 1 and texts:  # {"output": "..."}
            return texts[0]
    if isinstance(value, list) and len(value) == 1:
        return as_completion(value[0])
    raise Skip("cannot tell the completion")


def make_row(prompt, completion, label: bool, comment=None) -> dict:
    """Canonical row: both sides text, or both messages (a text answer to a conversation becomes a message)."""
    if isinstance(prompt, list):
        completion = [completion if isinstance(completion, dict) else {"role": "assistant", "content": completion}]
        if completion[0]["role"] != "assistant":
            raise Skip("the rated message is not an assistant message")
        text = completion[0]["content"]
    else:
        if isinstance(completion, dict):
            completion = completion["content"]
        text = completion
    if not text or not text.strip():
        raise Skip("empty completion")
    if isinstance(prompt, str) and not prompt.strip():
        raise Skip("empty prompt")
    row = {"prompt": prompt, "completion": completion, "label": label}
    if comment:
        row["comment"] = comment
    return row


# --------------------------------------------------------------------------------------------- sources

@dataclass
class Options:
    score_name: str | None = None       # Langfuse: which score
    key: str | None = None              # LangSmith: which feedback key
    threshold: float | None = None      # numeric scores: >= threshold is 👍
    label_map: dict[str, bool] = field(default_factory=dict)
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    label_field: str = "label"
    keep_comments: bool = False


def _rating(value, options: Options, where: str, path: str) -> bool:
    if options.label_map:
        if str(value) not in options.label_map:
            raise Skip("label not in --label-map")
        return options.label_map[str(value)]
    if options.threshold is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        return value >= options.threshold
    try:
        return parse_label(value, path, where)
    except DataError:
        raise Skip("unrated" if value in (None, 0, "0", "") else "unreadable rating") from None


def _openwebui_row(item, options, where, path):
    if not isinstance(item, dict):
        raise Skip("not a feedback object")
    data, meta = item.get("data") or {}, item.get("meta") or {}
    rating = data.get("rating")
    if rating in (None, 0, "0", ""):
        raise Skip("unrated")
    label = _rating(rating, Options(label_map=options.label_map), where, path)
    chat = ((item.get("snapshot") or {}).get("chat") or {}).get("chat") or {}
    history = (chat.get("history") or {}).get("messages") or {}
    message_id = meta.get("message_id")
    if not chat:
        raise Skip("no conversation snapshot")
    if message_id in history:
        branch, node, visited = [], history[message_id], set()
        while node is not None:  # walk up the tree: the rated branch of the conversation
            if id(node) in visited:  # a parentId chain that loops: no root to reach
                raise Skip("conversation tree with a cycle (parentId)")
            visited.add(id(node))
            branch.append(node)
            node = history.get(node.get("parentId")) if node.get("parentId") else None
        branch.reverse()
    else:
        flat = chat.get("messages") or []
        ids = [m.get("id") for m in flat]
        if message_id not in ids:
            raise Skip("rated message not found")
        branch = flat[:ids.index(message_id) + 1]
    system = chat.get("params", {}).get("system") if isinstance(chat.get("params"), dict) else None
    messages = ([{"role": "system", "content": system}] if system else []) + [_message(m) for m in branch]
    if len(messages) < 2:
        raise Skip("no prompt before the rated message")
    comment = " | ".join(str(x) for x in (data.get("reason"), data.get("comment")) if x) if options.keep_comments \
        else None
    return [make_row(messages[:-1], messages[-1], label, comment)]


class _Index:
    """On-disk id -> JSON index (SQLite in a temporary file), so joins do not hold an export in memory."""

    def __init__(self):
        fd, self.path = tempfile.mkstemp(suffix=".sqlite", prefix="thumbalign-import-")
        os.close(fd)
        self.db = sqlite3.connect(self.path)
        self.db.execute("CREATE TABLE items (id TEXT PRIMARY KEY, body TEXT)")

    def put(self, key, value) -> None:
        self.db.execute("INSERT OR REPLACE INTO items VALUES (?, ?)", (str(key), json.dumps(value)))

    def get(self, key):
        row = self.db.execute("SELECT body FROM items WHERE id = ?", (str(key),)).fetchone()
        return json.loads(row[0]) if row else None

    def close(self):
        self.db.close()
        os.unlink(self.path)


def _pick(name, wanted, seen: set, flag: str, what: str) -> None:
    """Ratings under another name than the one asked for are skipped; with none asked for, the export must hold
    ratings of one name only (mixing "helpful" with "latency" would make nonsense labels)."""
    if wanted is not None:
        if name != wanted:
            raise Skip(f"other {what}")
        return
    seen.add(name)
    if len(seen) > 1:
        raise ConfigError(f"the export holds several {what}s ({', '.join(sorted(map(str, seen)))}): pick one with "
                          f"{flag}")


def _joined(paths, is_rating, index_item, rate, options):
    """Index the conversations of every file, then stream the ratings and join each to its conversation."""
    index = _Index()
    try:
        ratings = []
        for path in paths:
            kinds = Counter()
            for where, item in iter_rows(path):
                if isinstance(item, dict) and is_rating(item):
                    kinds["ratings"] += 1
                elif isinstance(item, dict) and index_item(index, item):
                    kinds["conversations"] += 1
            if kinds["ratings"]:
                ratings.append(path)
        index.db.commit()
        seen: set = set()
        for path in ratings:
            for where, item in iter_rows(path):
                if isinstance(item, dict) and is_rating(item):
                    yield where, path, lambda item=item, where=where, path=path: rate(item, index, seen, where, path)
    finally:
        index.close()


def langfuse(paths, options: Options):
    def is_score(item):
        return "dataType" in item or ("traceId" in item and "value" in item and "name" in item)

    def index_item(index, item):
        if "id" in item and ("input" in item or "output" in item):
            index.put(("obs:" if "traceId" in item else "trace:") + str(item["id"]), [item.get("input"),
                                                                                     item.get("output")])
            return True
        return False

    def rate(score, index, seen, where, path):
        _pick(score.get("name"), options.score_name, seen, "--score-name", "score name")
        kind = score.get("dataType", "NUMERIC")
        if kind == "BOOLEAN":
            value = score.get("value") if score.get("value") is not None else score.get("stringValue")
            label = _rating(value, Options(label_map=options.label_map), where, path)
        elif kind == "NUMERIC":
            if options.threshold is None and not options.label_map:
                raise ConfigError("numeric Langfuse scores need --threshold (a score >= it is a thumbs-up)")
            label = _rating(score.get("value"), options, where, path)
        elif kind == "CATEGORICAL" and options.label_map:
            label = _rating(score.get("stringValue"), options, where, path)
        else:
            raise Skip(f"{kind.lower()} score")
        pair = index.get(f"obs:{score['observationId']}") if score.get("observationId") else None
        pair = pair or index.get(f"trace:{score.get('traceId')}")
        if pair is None:
            raise Skip("no matching trace")
        comment = score.get("comment") if options.keep_comments else None
        return [make_row(as_prompt(pair[0]), as_completion(pair[1]), label, comment)]

    return _joined(paths, is_score, index_item, rate, options)


def langsmith(paths, options: Options):
    def is_feedback(item):
        return "run_id" in item and "key" in item

    def index_item(index, item):
        if "id" in item and "inputs" in item:
            index.put(item["id"], [item.get("inputs"), item.get("outputs")])
            return True
        return False

    def rate(feedback, index, seen, where, path):
        _pick(feedback.get("key"), options.key, seen, "--key", "feedback key")
        value = feedback.get("score") if feedback.get("score") is not None else feedback.get("value")
        threshold = options.threshold if options.threshold is not None else 0.5
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not options.label_map:
            label = value >= threshold
        else:
            label = _rating(value, options, where, path)
        pair = index.get(feedback["run_id"])
        if pair is None:
            raise Skip("no matching run")
        comment = feedback.get("comment") if options.keep_comments else None
        return [make_row(as_prompt(pair[0]), as_completion(pair[1]), label, comment)]

    return _joined(paths, is_feedback, index_item, rate, options)


def _via_loader(item, options, where, path):
    """OpenAI preference fine-tuning rows (one 👍 and one 👎 each) and chat rows with a label field."""
    try:
        records = row_to_records(item, path, where)
    except DataError as err:
        raise Skip(f"{err.field or 'row'}: invalid") from None
    return [make_row(r.prompt, r.completion[0] if isinstance(r.completion, list) else r.completion, r.label)
            for r in records]


def _generic_row(item, options, where, path):
    if not isinstance(item, dict):
        raise Skip("not an object")
    for name in (options.prompt_field, options.completion_field, options.label_field):
        if item.get(name) in (None, ""):
            raise Skip(f"missing {name}")
    label = _rating(item[options.label_field], options, where, path)
    prompt = as_prompt(item[options.prompt_field])
    completion = item[options.completion_field]
    completion = as_completion(completion if not isinstance(completion, list) else completion[-1])
    comment = item.get("comment") if options.keep_comments else None
    return [make_row(prompt, completion, label, comment)]


def _row_by_row(convert):
    """A source whose rows convert one by one, with no join: stream the files, defer each conversion."""
    def reader(paths, options: Options):
        for path in paths:
            for where, item in iter_rows(path):
                yield where, path, lambda item=item, where=where, path=path: convert(item, options, where, path)

    return reader


READERS = {"openwebui": _row_by_row(_openwebui_row), "langfuse": langfuse, "langsmith": langsmith,
           "openai": _row_by_row(_via_loader), "generic": _row_by_row(_generic_row)}


# --------------------------------------------------------------------------------------------- the import

@dataclass
class ImportReport:
    rows_read: int = 0
    written: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    conflicts: int = 0
    conflict_examples: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"rows_read": self.rows_read, "written_up": self.written[True], "written_down": self.written[False],
                "skipped": dict(self.skipped), "conflicting_pairs": self.conflicts,
                "conflict_examples": self.conflict_examples}

    def describe_inline(self) -> str:
        skipped = ", ".join(f"{n} skipped: {reason}" for reason, n in self.skipped.most_common())
        return f"read {self.rows_read} rows" + (f"; {skipped}" if skipped else "")

    def describe(self) -> str:
        lines = [f"read {self.rows_read} rows; wrote {self.written[True] + self.written[False]} "
                 f"({self.written[True]} 👍, {self.written[False]} 👎)"]
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped {n}: {reason}")
        if self.conflicts:
            lines.append(f"  {self.conflicts} (prompt, completion) pairs carry both labels (both rows kept), e.g. "
                         + "; ".join(self.conflict_examples))
        return "\n".join(lines)


def _digest(*parts) -> bytes:
    return hashlib.blake2b(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode(), digest_size=8).digest()


def run_import(source: str, paths: list[str], out: str, options: Options, progress: bool = False) -> ImportReport:
    if source not in READERS:
        raise ConfigError(f"unknown source {source!r}; one of {', '.join(SOURCES)}")
    report = ImportReport()
    seen_rows: set[bytes] = set()
    labels_of: dict[bytes, int] = {}  # (prompt, completion) -> bit 1 👍 | bit 2 👎

    def write(tmp):
        rows_read = tqdm(READERS[source](paths, options), desc=f"importing ({source})", unit=" rows",
                         disable=not progress)
        with open(tmp, "w", encoding="utf-8") as handle:
            for where, path, convert in rows_read:
                report.rows_read += 1
                try:
                    rows = convert()
                except Skip as reason:
                    report.skipped[str(reason)] += 1
                    continue
                except (TypeError, AttributeError, KeyError, IndexError) as err:  # a shape the format does not have
                    report.skipped[f"malformed row ({type(err).__name__})"] += 1
                    continue
                for row in rows:
                    key = _digest(row["prompt"], row["completion"], row["label"])
                    if key in seen_rows:
                        report.skipped["duplicate"] += 1
                        continue
                    seen_rows.add(key)
                    pair = _digest(row["prompt"], row["completion"])
                    bits = labels_of.get(pair, 0) | (1 if row["label"] else 2)
                    if bits == 3 and labels_of.get(pair) != 3:
                        report.conflicts += 1
                        if len(report.conflict_examples) < 3:
                            report.conflict_examples.append(f"{path}, {where}")
                    labels_of[pair] = bits
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                    report.written[row["label"]] += 1
        if not sum(report.written.values()):  # before the rename: an earlier file of that name stays as it was
            raise DataError(", ".join(paths), None, None, f"no usable feedback row ({report.describe_inline()}); "
                                                          f"{out} was not written")

    _refuse_writing_over_an_input(paths, out)
    # written aside and renamed when complete: a failure (bad input, full disk, no usable row) leaves no partial file
    # behind and the earlier output untouched
    write_atomically(Path(out), write, "the imported feedback")
    return report


def _refuse_writing_over_an_input(paths: list[str], out: str) -> None:
    target = Path(out)
    for path in paths:
        if target.exists() and Path(path).exists() and Path(path).resolve() == target.resolve():
            raise ConfigError(f"-o {out} is also an input: the import would replace the export it reads; write to "
                              "another file")
