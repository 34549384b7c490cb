"""Where records become the training and evaluation sets, and the sets become batches.

The sampler works on *units*: one example for unpaired methods, an interleaved (chosen, rejected) pair for paired
ones. Each epoch is a fresh seeded permutation of the units, so which units a step holds is a pure function of the
step number: resuming at step k replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import torch

from .data import Record, load_records
from .errors import ConfigError
from .tokens import Example, tokenize_records
from .udm import prompt_text


@dataclass
class PreparedData:
    train: list[Example]
    units: list[list[int]]   # sampling units: indices into `train` (one example, or a chosen/rejected pair)
    eval: list[Example]      # paired methods: interleaved chosen, rejected
    report: dict
    train_prompts: list[str]  # prompt text of each training example, for UDM's sentence encoder


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


def pair_up(examples: list[Example], records: list[Record], path: str, method: str):
    """Order examples as chosen, rejected, chosen, rejected, ...; a pair that lost a side to max_length is dropped."""
    sides: dict[int, dict[bool, Example]] = {}
    for e in examples:
        record = records[e.index]
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


def prepare_data(config, tokenizer, objective_cls, log=print) -> PreparedData:
    paired = objective_cls.data_kind == "paired"
    records, load_report = load_records(config.data, skip_invalid=config.skip_invalid)
    if load_report.skipped:
        log(f"Skipped {sum(load_report.skipped.values())} invalid rows of {config.data}: "
            + "; ".join(f"{n} × {reason}" for reason, n in load_report.skipped.most_common()))
    log(f"Loaded {config.data}: {load_report.rows} rows -> {load_report.records} records "
        f"({load_report.by_label[True]} 👍, {load_report.by_label[False]} 👎"
        + (f"; {load_report.pairs_split} pairs split into 👍/👎 rows" if load_report.pairs_split and not paired
           else "") + ")")
    if objective_cls.needs_both_labels:
        from .data import require_both_labels

        require_both_labels(load_report)
    report = {"train_file": load_report.as_dict()}
    if config.eval_data:
        train_records = records
        eval_records, eval_report = load_records(config.eval_data, skip_invalid=config.skip_invalid)
        report["eval_file"] = eval_report.as_dict()
    elif config.eval_split > 0:
        train_records, eval_records = split_records(records, config.eval_split, config.seed)
        log(f"Held out {len(eval_records)} records ({config.eval_split:.0%}, seed {config.seed}) for evaluation")
    else:
        train_records, eval_records = records, []
    if objective_cls.train_labels != (True, False):
        kept = [r for r in train_records if r.label in objective_cls.train_labels]
        log(f"--method {objective_cls.name} trains on {'👍' if True in objective_cls.train_labels else '👎'} "
            f"records only: {len(train_records) - len(kept)} others set aside")
        report["set_aside_by_method"] = len(train_records) - len(kept)
        # keep `index` pointing into the list the examples come from
        train_records = kept

    train, train_tok = tokenize_records(tokenizer, train_records, config.max_length)
    log(f"Tokenised training data: {train_tok.describe()}")
    report["train_tokens"] = train_tok.as_dict()
    eval_examples = []
    if eval_records:
        eval_examples, eval_tok = tokenize_records(tokenizer, eval_records, config.max_length)
        log(f"Tokenised evaluation data: {eval_tok.describe()}")
        report["eval_tokens"] = eval_tok.as_dict()
    if paired:
        train, broken = pair_up(train, train_records, config.data, objective_cls.name)
        report["pairs_dropped_by_truncation"] = broken
        if broken:
            log(f"{broken} pairs dropped: one side did not fit max_length")
        if eval_examples:
            eval_examples, _ = pair_up(eval_examples, eval_records, config.eval_data or config.data,
                                       objective_cls.name)
        units = [[i, i + 1] for i in range(0, len(train), 2)]
    else:
        units = [[i] for i in range(len(train))]
    if not train:
        raise ConfigError(f"no training examples left after tokenisation ({train_tok.describe()})")
    labels = [e.label for e in train]
    if objective_cls.needs_both_labels and (all(labels) or not any(labels)):
        raise ConfigError(f"the training split holds only {'👍' if labels[0] else '👎'} examples; "
                          f"{objective_cls.name} needs both")
    report["train_examples"] = {"total": len(train), "thumbs_up": sum(labels), "thumbs_down": len(labels) - sum(labels)}
    report["eval_examples"] = len(eval_examples)
    prompts = [prompt_text(train_records[e.index].prompt) for e in train]
    return PreparedData(train, units, eval_examples, report, prompts)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n_units: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n_units, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def step_units(n_units: int, units_per_step: int, seed: int, step: int) -> list[int]:
    """Units of optimizer step `step` (0-based): a slice of that epoch's seeded permutation."""
    steps_per_epoch = math.ceil(n_units / units_per_step)
    epoch, position = divmod(step, steps_per_epoch)
    perm = _epoch_permutation(n_units, seed, epoch)
    return list(perm[position * units_per_step:(position + 1) * units_per_step])


def micro_batches(data: PreparedData, step: int, micro: int, accumulation: int, world: int, rank: int,
                  seed: int) -> tuple[list[list[int]], int]:
    """This process's micro-batches (example indices) for a step, and the number of examples in the whole step
    (all processes), which normalises the loss."""
    per_step = micro * accumulation * world
    chosen = step_units(len(data.units), per_step, seed, step)
    if world > 1 and len(chosen) < per_step:  # the last step of an epoch: wrap around so no process idles
        chosen = (chosen * math.ceil(per_step / len(chosen)))[:per_step]
    mine = chosen[rank::world]
    batches = [[i for u in mine[k:k + micro] for i in data.units[u]] for k in range(0, len(mine), micro)]
    return batches, sum(len(data.units[u]) for u in chosen)


def mismatched_example(prompt_of: Example, completion_of: Example, max_length: int) -> Example:
    """One example's prompt followed by another's completion (KTO's reference-point estimate)."""
    completion = completion_of.input_ids[completion_of.prompt_len:]
    prompt = prompt_of.input_ids[:prompt_of.prompt_len][-(max_length - len(completion)):]
    return Example(prompt + completion, len(prompt), completion_of.label, -1)
