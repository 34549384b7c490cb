"""Where training sets become batches: which units an optimizer step holds, and how examples become tensors.

The sampler works on *units*: one example for unpaired methods, an interleaved (chosen, rejected) pair for paired
ones, one prompt (and its group of answers) for online training. Each epoch is a fresh seeded permutation of the
units, so which units a step holds is a pure function of the step number: resuming at step k replays exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import math

import torch

from .tokens import Example


@functools.lru_cache(maxsize=4)
def _epoch_permutation(n_units: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n_units, generator=torch.Generator().manual_seed(seed + epoch)).tolist())


def step_units(n_units: int, units_per_step: int, seed: int, step: int) -> list[int]:
    """Units of optimizer step `step` (0-based): a slice of that epoch's seeded permutation."""
    steps_per_epoch = math.ceil(n_units / units_per_step)
    epoch, position = divmod(step, steps_per_epoch)
    perm = _epoch_permutation(n_units, seed, epoch)
    return list(perm[position * units_per_step:(position + 1) * units_per_step])


def micro_batches(units: list[list[int]], step: int, micro: int, accumulation: int, world: int, rank: int,
                  seed: int) -> tuple[list[list[int]], int]:
    """This process's micro-batches (indices of the items the units hold) for a step, and the number of items in
    the whole step (all processes), which normalises the loss.

    Process r takes every world-th unit from the r-th, so micro-batch k of all processes together is the k-th
    slice of micro × world units: what one process with micro × world per micro-batch would see. When the data
    does not fill the last step of an epoch, nothing is repeated: with several processes, a process that runs out
    gets empty micro-batches (the trainer runs them with zero weight, so that every process still takes part in
    each gradient exchange)."""
    per_step = micro * accumulation * world
    chosen = step_units(len(units), per_step, seed, step)
    mine = chosen[rank::world]
    batches = [[i for u in mine[k:k + micro] for i in units[u]] for k in range(0, len(mine), micro)]
    if world > 1:
        batches += [[] for _ in range(accumulation - len(batches))]
    return batches, sum(len(units[u]) for u in chosen)


def step_groups(units: list[list[int]], step: int, micro: int, accumulation: int, world: int,
                seed: int) -> list[list[int]]:
    """Micro-batch k of every process together (item indices, in the order one process would hold them)."""
    chosen = step_units(len(units), micro * accumulation * world, seed, step)
    size = micro * world
    return [[i for u in chosen[k:k + size] for i in units[u]] for k in range(0, len(chosen), size)]


# ------------------------------------------------------------------------------------------------- collation

def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors; ``completion_mask`` marks the tokens the loss sees."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        completion_mask[row, e.prompt_len:n] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        **_per_example(examples),
    }


def _per_example(examples: list[Example]) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.tensor([e.label for e in examples], dtype=torch.bool),
        "completion_lengths": torch.tensor([e.completion_len for e in examples], dtype=torch.long),
        "n_tokens": torch.tensor(sum(len(e.input_ids) for e in examples)),
    }


def collate_packed(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Padding-free: every example of the micro-batch in one row, back to back. Positions restart at each example
    and a block-diagonal causal mask ([1, 1, T, T], True = may attend) keeps each example's attention to itself, so
    every log-prob equals the unpacked one. `sequence_ids` says which example each token belongs to."""
    input_ids = torch.tensor([t for e in examples for t in e.input_ids]).unsqueeze(0)
    sequence = torch.cat([torch.full((len(e.input_ids),), k) for k, e in enumerate(examples)])
    positions = torch.cat([torch.arange(len(e.input_ids)) for e in examples]).unsqueeze(0)
    completion = torch.cat([torch.arange(len(e.input_ids)) >= e.prompt_len for e in examples]).unsqueeze(0)
    length = input_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (causal & (sequence[:, None] == sequence[None, :]))[None, None]
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "completion_mask": completion,
            "sequence_ids": sequence.unsqueeze(0), **_per_example(examples)}


def collate_masked(sequences: list[list[int]], masks: list[list[bool]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token sequences whose trained tokens are marked one by one (several answer spans of a
    conversation, say): ``completion_mask`` is the given mask."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, (ids, mask) in enumerate(zip(sequences, masks)):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        completion_mask[row, :len(ids)] = torch.tensor(mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
