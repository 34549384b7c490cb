"""Where a prompts file becomes prompts: for judged generations, best-of-n and online training.

Each row needs a ``prompt`` (text or a list of messages) or ``messages`` (the conversation to answer); every other
column (a reference answer, test cases) is kept and handed to judges and reward functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .readers import iter_rows
from .records import Messages, text_or_messages


@dataclass
class PromptRow:
    source: str             # "file, line N", for messages that point back at the input
    prompt: str | Messages
    row: dict               # every column of the row


def load_prompts(path: str) -> list[PromptRow]:
    rows = []
    for where, row in iter_rows(path):
        if not isinstance(row, dict):
            raise DataError(path, where, None, f"expected an object with fields, got {type(row).__name__}")
        key = "prompt" if "prompt" in row else "messages"
        if row.get(key) is None:
            raise DataError(path, where, "prompt", "missing (each row needs a prompt)")
        prompt = text_or_messages(row[key], path, where, key)
        rows.append(PromptRow(f"{path}, {where}", prompt, row))
    if not rows:
        raise DataError(path, None, None, "holds no prompts")
    return rows
