"""A rollout: one conversation of the policy with one prompt, its reward and its group; and the seed of each answer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from ..analysis.rewards import Answer, RewardSet
from ..data.prompts import PromptRow


def answer_seed(seed: int, step: int, prompt_index: int, k: int, turn: int = 0) -> int:
    """The seed of one answer: a function of the run's seed, the step, the prompt and the answer's number only."""
    digest = hashlib.sha256(f"{seed}/{step}/{prompt_index}/{k}/{turn}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


@dataclass
class Rollout:
    """One conversation with the model for one prompt: its tokens, which of them are the model's, its reward."""

    prompt_index: int
    group: int                    # the prompt's position in this process's step: answers of a group compare
    sample: int                   # which of the group's answers (seeds the sampling)
    tokens: list[int]
    mask: list[bool]              # the model's answer tokens (trained on)
    answers: list[str]            # the answer of each turn
    truncated: bool               # the last answer hit max_new_tokens without ending
    reward: float | None = None   # shaped total; None: a reward left it out
    outcome: float = 0.0          # binary outcome, 1.0 = 👍
    stats: dict = field(default_factory=dict)

    @property
    def answer_tokens(self) -> int:
        return sum(self.mask)


def score_group(rewards: RewardSet, row: PromptRow, rollouts: list[Rollout], answer_ids: list[list[int]]):
    """Rewards of one prompt's answers (the last answer of each conversation): (totals, the reward model's own
    values, None each without one)."""
    answers = [Answer(row.prompt, r.answers[-1], row.row, ids, row.source) for r, ids in zip(rollouts, answer_ids)]
    return rewards.score_parts(answers)
