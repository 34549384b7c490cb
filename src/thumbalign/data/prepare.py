"""Where records become the training and evaluation sets.

A trainer says what data it needs with :class:`DataNeeds` (paired or not, which labels it trains on); the
records are loaded, split, filtered, tokenised and, for paired methods, ordered as (chosen, rejected) pairs. Every
row that is set aside is counted in the report.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..errors import ConfigError, DataError
from .readers import Source
from .records import (
    Record,
    load_records,
    principle_of,
    prompt_as_text,
    require_both_labels,
    with_feedback,
    with_principle,
)
from .tokens import MAX_RECORD_CHARS, Example, tokenize_records


@dataclass(frozen=True)
class DataNeeds:
    """What a method or trainer needs from the feedback file."""

    name: str                                  # named in messages ("--method kto trains on ...")
    paired: bool = False                       # batches hold interleaved (chosen, rejected) rows
    train_labels: tuple[bool, ...] = (True, False)  # labels trained on; (True,) sets the 👎 rows aside
    grouped: bool = False                      # a unit is one prompt with all its answers, 👍 and 👎 (or ranked)
    row_fields: tuple[str, ...] = ()           # further row fields kept on each record ("rank", "comment")
    reward_tokens: tuple[str, str] | None = None  # (👍, 👎) special tokens put before each answer (LeTI)
    feedback_field: str | None = None          # a 👎 answer trains on itself followed by this field's text
    principle_field: str | None = None         # each record is read against its principle (RLBFF reward models)

    @property
    def needs_both_labels(self) -> bool:
        return self.train_labels == (True, False)


@dataclass
class PreparedData:
    train: list[Example]
    units: list[list[int]]   # sampling units: indices into `train` (one example, a chosen/rejected pair, a prompt)
    eval: list[Example]      # paired methods: interleaved chosen, rejected
    report: dict
    train_prompts: list[str]  # prompt text of each training example, for UDM's sentence encoder
    train_fields: list[dict] = field(default_factory=list)  # the kept row fields of each training example


def split_records(records: list[Record], share: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Seeded hold-out; both rows of a split pair land on the same side, so nothing leaks across."""
    groups: dict = {}
    for i, r in enumerate(records):
        groups.setdefault(("pair", r.pair) if r.pair is not None else ("row", i), []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    n_eval = int(round(len(keys) * share))
    held = {i for k in keys[:n_eval] for i in groups[k]}
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def pair_up(examples: list[Example], records: list[Record], method: str):
    """Order examples as chosen, rejected, chosen, rejected, ...; a pair that lost a side to max_length is dropped."""
    sides: dict[int, dict[bool, Example]] = {}
    for e in examples:
        record = records[e.record_index]
        if record.pair is None:
            raise ConfigError(f"{record.source}: --method {method} needs paired rows (prompt, chosen, rejected), "
                              "and this row is unpaired")
        sides.setdefault(record.pair, {})[record.label] = e
    ordered, broken = [], 0
    for pid in sorted(sides):
        if True in sides[pid] and False in sides[pid]:
            ordered += [sides[pid][True], sides[pid][False]]
        else:
            broken += 1
    return ordered, broken


def data_sources(config) -> tuple[Source, Source | None]:
    """The training rows and the held-out rows named by the settings: --data (a file, a folder or a Hub dataset
    with --data-config and --data-split), and --eval-data or, with --eval-data-split alone, another split of --data;
    columns mapped by --prompt-field, --completion-field and --label-field."""
    fields = tuple((name, getattr(config, f"{name}_field", name)) for name in ("prompt", "completion", "label"))
    dataset_config = getattr(config, "data_config", None)
    train = Source(config.data, dataset_config, getattr(config, "data_split", "train"), fields)
    eval_split = getattr(config, "eval_data_split", None)
    if config.eval_data:
        held = Source(config.eval_data, dataset_config, eval_split or "train", fields)
    elif eval_split:
        held = Source(config.data, dataset_config, eval_split, fields)
    else:
        held = None
    return train, held


def prepare_data(config, tokenizer, needs: DataNeeds, log=print) -> PreparedData:
    """`config` supplies data (and its source settings), eval_data, eval_split, seed, max_length and skip_invalid."""
    train_source, eval_source = data_sources(config)
    keep = needs.row_fields + tuple(f for f in (needs.feedback_field, needs.principle_field) if f)
    records, load_report = load_records(train_source, skip_invalid=config.skip_invalid, keep=keep)
    if load_report.skipped:
        log(f"Skipped {sum(load_report.skipped.values())} invalid rows of {train_source}: "
            + "; ".join(f"{n} × {reason}" for reason, n in load_report.skipped.most_common()))
    log(f"Loaded {train_source}: {load_report.rows} rows -> {load_report.records} records "
        f"({load_report.by_label[True]} 👍, {load_report.by_label[False]} 👎"
        + (f"; {load_report.pairs_split} pairs split into 👍/👎 rows" if load_report.pairs_split and not needs.paired
           else "") + ")")
    if needs.needs_both_labels:
        require_both_labels(load_report)
    report = {"train_file": load_report.as_dict()}
    if eval_source:
        train_records = records
        eval_records, eval_report = load_records(eval_source, skip_invalid=config.skip_invalid, keep=keep)
        report["eval_file"] = eval_report.as_dict()
    elif config.eval_split > 0:
        train_records, eval_records = split_records(records, config.eval_split, config.seed)
        log(f"Held out {len(eval_records)} records ({config.eval_split:.0%}, seed {config.seed}) for evaluation")
    else:
        train_records, eval_records = records, []
    if not needs.needs_both_labels:
        kept = [r for r in train_records if r.label in needs.train_labels]
        log(f"--method {needs.name} trains on {'👍' if True in needs.train_labels else '👎'} "
            f"records only: {len(train_records) - len(kept)} others set aside")
        report["set_aside_by_method"] = len(train_records) - len(kept)
        train_records = kept  # `record_index` of the examples points into this list

    train_records, eval_records = adapt_records(needs, train_records, eval_records, report, log)
    condition, eval_condition = reward_token_conditions(needs, tokenizer, report)
    max_chars = getattr(config, "max_record_chars", MAX_RECORD_CHARS)
    train, train_tok = tokenize_records(tokenizer, train_records, config.max_length, condition, max_chars)
    log(f"Tokenised training data: {train_tok.describe()}")
    report["train_tokens"] = train_tok.as_dict()
    eval_examples = []
    if eval_records:
        eval_examples, eval_tok = tokenize_records(tokenizer, eval_records, config.max_length, eval_condition,
                                                   max_chars)
        log(f"Tokenised evaluation data: {eval_tok.describe()}")
        report["eval_tokens"] = eval_tok.as_dict()
    if needs.paired:
        train, broken = pair_up(train, train_records, needs.name)
        report["pairs_dropped_by_truncation"] = broken
        if broken:
            log(f"{broken} pairs dropped: one side did not fit max_length")
        if eval_examples:
            eval_examples, _ = pair_up(eval_examples, eval_records, needs.name)
        units = [[i, i + 1] for i in range(0, len(train), 2)]
    elif needs.grouped:
        train, units = group_by_prompt(train, train_records, needs.name, report, log)
    else:
        units = [[i] for i in range(len(train))]
    if not train:
        raise ConfigError(f"no training examples left after tokenisation ({train_tok.describe()})")
    labels = [e.label for e in train]
    if needs.needs_both_labels and (all(labels) or not any(labels)):
        raise ConfigError(f"the training split holds only {'👍' if labels[0] else '👎'} examples; "
                          f"{needs.name} needs both")
    report["train_examples"] = {"total": len(train), "thumbs_up": sum(labels), "thumbs_down": len(labels) - sum(labels)}
    report["eval_examples"] = len(eval_examples)
    prompts = [prompt_as_text(train_records[e.record_index].prompt) for e in train]
    fields = [train_records[e.record_index].fields for e in train]
    return PreparedData(train, units, eval_examples, report, prompts, fields)


def adapt_records(needs: DataNeeds, train: list[Record], held: list[Record], report: dict, log):
    """What a method reads instead of the plain record: the answer against its principle (RLBFF), a 👎 answer
    followed by its textual feedback (LeTI)."""
    if needs.principle_field:
        field_name = needs.principle_field
        train_principles = [principle_of(r, field_name) for r in train]  # read (and checked) once per row
        train = [with_principle(r, p) for r, p in zip(train, train_principles)]
        held = [with_principle(r, principle_of(r, field_name)) for r in held]
        principles = sorted(set(train_principles))
        report["principles"] = len(principles)
        log(f"Principles ({field_name!r}): {len(principles)} distinct, e.g. {principles[0]!r}")
    if needs.feedback_field:
        with_text = [not r.label and isinstance(r.fields.get(needs.feedback_field), str)
                     and bool(r.fields[needs.feedback_field].strip()) for r in train]
        train = [with_feedback(r, r.fields[needs.feedback_field]) if w else r for r, w in zip(train, with_text)]
        n_down = sum(not r.label for r in train)
        report["thumbs_down_with_feedback"] = sum(with_text)
        log(f"{sum(with_text)} of {n_down} 👎 answers carry textual feedback ({needs.feedback_field!r}) and train on "
            "it; the others train on the answer alone")
    return train, held


def reward_token_conditions(needs: DataNeeds, tokenizer, report: dict):
    """(training condition, held-out condition) for tokenize_records: each answer follows its label's reward token
    when trained; held-out answers are read after the 👍 token (how likely is this answer from a 👍 model)."""
    if not needs.reward_tokens:
        return None, None
    missing = [t for t in needs.reward_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    report["added_tokens"] = missing  # the model needs rows for these
    up, down = (tokenizer.convert_tokens_to_ids(t) for t in needs.reward_tokens)
    return (lambda record: [up] if record.label else [down]), (lambda record: [up])


def group_by_prompt(train: list[Example], records: list[Record], method: str, report: dict, log):
    """Units of one prompt each, holding every answer to it; a prompt whose answers cannot be ranked (all 👍 or
    all 👎, and no two different ranks) is set aside and counted. Returns (examples, units)."""
    by_prompt: dict[str, list[Example]] = {}
    for e in train:
        by_prompt.setdefault(prompt_as_text(records[e.record_index].prompt), []).append(e)
    kept, units, set_aside = [], [], 0
    for answers in by_prompt.values():
        labels = {e.label for e in answers}
        ranks = {rank_of(records[e.record_index]) for e in answers} - {None}
        if len(labels) < 2 and len(ranks) < 2:
            set_aside += len(answers)
            continue
        units.append(list(range(len(kept), len(kept) + len(answers))))
        kept += answers
    report["set_aside_unranked_prompts"] = set_aside
    log(f"--method {method} learns within a prompt: {len(units)} prompts with answers to rank "
        f"({len(kept)} answers); {set_aside} answers to prompts without both 👍 and 👎 (or two ranks) set aside")
    if not units:
        raise ConfigError(f"--method {method} needs prompts answered more than once with both 👍 and 👎 (or a "
                          "'rank' field); no prompt of the training data has that")
    return kept, units


def rank_of(record: Record) -> float | None:
    """The row's 'rank' (1 = best), or None; anything but a number names the row."""
    value = record.fields.get("rank")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(record.source or "a row", None, "rank", f"expected a number (1 = best), got {value!r}")
    return float(value)
