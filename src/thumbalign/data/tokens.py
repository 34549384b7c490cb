"""Where a record becomes tokens.

* Conversational records go through the model's own chat template: the prompt is rendered with the generation
  prompt, the full conversation without it, and the completion is the text the second adds to the first.
* Standard records are plain concatenation: prompt tokens (with the tokenizer's BOS, if it adds one), then the
  completion tokens and EOS.
* Only completion tokens count in the loss (``prompt_len`` marks where they start).
* ``max_length`` — one rule everywhere (training, KTO's mismatched pairs, reward-model scoring), in
  :func:`fit_to_length`: the completion is kept whole and the prompt is cut from the left; a completion that alone
  does not fit (at least one prompt token must stay to condition on) is dropped. Both are counted in
  :class:`TokenizeReport` and printed, never silent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..errors import DataError
from .records import Record

# a record larger than this (characters of prompt and completion) is dropped before tokenising (--max-record-chars)
MAX_RECORD_CHARS = 1_000_000


@dataclass
class Example:
    """A tokenised record: ``input_ids[prompt_len:]`` are the completion tokens the loss sees."""

    input_ids: list[int]
    prompt_len: int
    label: bool
    record_index: int  # position of its record in the list given to tokenize_records; -1 for a built example

    @property
    def completion_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class TokenizeReport:
    records: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    dropped_completion_too_long: int = 0
    dropped_too_large: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        return (f"{self.kept} of {self.records} records kept; {self.prompt_truncated} prompts cut from the left; "
                f"{self.dropped_completion_too_long} dropped because the completion alone exceeds max_length"
                + (f"; {self.dropped_too_large} dropped unread, larger than max_record_chars"
                   if self.dropped_too_large else ""))


def _render_chat(tokenizer, record: Record) -> tuple[str, str]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(record.source, None, "prompt",
                        "conversational record, but the tokenizer has no chat template")
    prompt_text = tokenizer.apply_chat_template(record.prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(record.prompt + record.completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        # Some templates render the last assistant turn differently; fall back to the conversation without the
        # generation prompt, which every template must be a prefix-consistent rendering of.
        prompt_text = tokenizer.apply_chat_template(record.prompt, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise DataError(record.source, None, "completion",
                            "the chat template does not render the prompt as a prefix of the conversation")
    return prompt_text, full_text[len(prompt_text):]


def encode_record(tokenizer, record: Record) -> tuple[list[int], list[int]]:
    """Return (prompt token ids, completion token ids) for one record."""
    if record.conversational:
        prompt_text, completion_text = _render_chat(tokenizer, record)
        # The template already holds every special token it wants.
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(record.prompt, add_special_tokens=True)["input_ids"]
        # an EOS that a tokenizer appends on its own belongs after the completion, not between the two parts
        if tokenizer.eos_token_id is not None and prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id:
            prompt_ids = prompt_ids[:-1]
        completion_ids = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
    return list(prompt_ids), list(completion_ids)


def encode_prompt(tokenizer, prompt, source: str = "") -> list[int]:
    """Token ids of a prompt ready for the model's answer: a conversation through the chat template with the
    generation prompt, plain text as it is (with the tokenizer's BOS, without an EOS it may append)."""
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(source or "a prompt", None, "prompt",
                            "a conversation, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return ids


def examples_digest(examples: list[Example], labels: bool = True) -> str:
    """sha256 of tokenised examples: token ids, where each completion starts, and (unless `labels` is False, as for
    log-probs, which do not depend on them) each label."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.prompt_len}:{','.join(map(str, e.input_ids))}{':' + str(int(e.label)) if labels else ''};"
                      .encode())
    return digest.hexdigest()


def fit_to_length(prompt_ids: list[int], completion_ids: list[int], max_length: int) -> list[int] | None:
    """The truncation rule: keep the completion whole and cut the prompt from the left to fit ``max_length``.
    Returns the (possibly cut) prompt, or None when the completion alone leaves no room for a prompt token."""
    if len(completion_ids) >= max_length:
        return None
    budget = max_length - len(completion_ids)
    return prompt_ids[-budget:] if len(prompt_ids) > budget else prompt_ids


def record_chars(record: Record) -> int:
    """Characters of a record's prompt and completion (plain text, or messages as their JSON)."""
    return sum(len(part) if isinstance(part, str) else len(json.dumps(part, ensure_ascii=False))
               for part in (record.prompt, record.completion))


def tokenize_records(tokenizer, records: list[Record], max_length: int, condition=None,
                     max_chars: int = MAX_RECORD_CHARS) -> tuple[list[Example], TokenizeReport]:
    """Examples of `records`; `condition(record)`, when given, returns token ids put between the prompt and the
    completion (a reward token): part of the prompt, so conditioned on and never trained. A record of more than
    `max_chars` characters is dropped (counted) before the tokenizer sees it: a tokenizer's memory grows with the
    text (gigabytes for a 50 MB answer), and at most max_length tokens of it would be trained on."""
    report = TokenizeReport(records=len(records))
    examples = []
    for index, record in enumerate(records):
        if record_chars(record) > max_chars:
            report.dropped_too_large += 1
            continue
        prompt_ids, completion_ids = encode_record(tokenizer, record)
        if not completion_ids:
            raise DataError(record.source, None, "completion", "tokenises to nothing")
        if condition is not None:
            prompt_ids = prompt_ids + list(condition(record))
        kept = fit_to_length(prompt_ids, completion_ids, max_length)
        if kept is None:
            report.dropped_completion_too_long += 1
            continue
        report.prompt_truncated += len(kept) < len(prompt_ids)
        examples.append(Example(kept + completion_ids, len(kept), record.label, index))
    report.kept = len(examples)
    return examples, report


def condition_generation_on(tokenizer, token: str) -> None:
    """Make `token` follow the generation prompt of the tokenizer's chat template, so that whoever serves the saved
    folder (transformers, vLLM, TGI: all render the template) generates conditioned on it by default. A
    tokenizer without a chat template is left alone (plain-text prompts must end with the token themselves)."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or token in template:
        return
    tokenizer.chat_template = template + "{% if add_generation_prompt %}" + token + "{% endif %}"
