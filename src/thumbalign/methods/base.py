"""What every method shares: the inputs of a micro-batch's loss, the objective interface, the classifier metrics.

A method is one file in this folder holding its pure loss formula (maths in the docstring) and an
:class:`Objective` subclass that turns a micro-batch's log-probs into per-example losses and keeps whatever state
the method needs across steps (BCO's reward shift δ, KTO's reference point z_ref). The registry finds it by itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Hashable

from ..data.prepare import DataNeeds
from ..data.tokens import Example
from .lazy import torch
from .settings import MethodSettings


@dataclass
class LossOutput:
    losses: torch.Tensor   # [batch] per-example loss, weights applied
    rewards: torch.Tensor  # [batch] implicit reward r = β·ρ, detached


@dataclass
class StepInputs:
    policy_logps: torch.Tensor          # [n] log π_θ(y|x), with gradient
    ref_logps: torch.Tensor             # [n] log π_ref(y|x)
    labels: torch.Tensor                # [n] bool, thumbs-up
    weights: torch.Tensor | None        # [n] UDM weights (applied to thumbs-down by the methods that use them)
    n_tokens: torch.Tensor              # [n] completion tokens per row
    gather: Callable[[torch.Tensor], torch.Tensor]  # all-gather across processes (identity with one)
    extra_policy_logps: torch.Tensor | None = None  # log-probs of the method's extra examples (no gradient)
    extra_ref_logps: torch.Tensor | None = None
    valid: torch.Tensor | None = None   # [n] bool: False for a placeholder row (a process with no data left)
    groups: torch.Tensor | None = None  # [n] prompt of each row, for methods that learn within a prompt (grouped)
    ranks: torch.Tensor | None = None   # [n] the row's 'rank' (1 = best), NaN where the row has none
    clusters: torch.Tensor | None = None  # [n] the prompt's cluster, for a prompt-conditional reward shift δ(x)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """The real rows of a per-row tensor, to gather into statistics (δ, z_ref) that placeholders must not
        touch."""
        return t if self.valid is None else t[self.valid]


class Objective:
    """One training method. Subclasses set `name`, `summary` and `needs`, and implement `loss`."""

    name = ""
    summary = ""
    needs = DataNeeds("")
    uses_udm_weights = False  # takes --udm weights on its thumbs-down losses
    token_meanings: ClassVar[dict[str, str]] = {}  # special tokens the method adds -> words their embeddings start from
    settings_class: ClassVar[type[MethodSettings] | None] = None  # the method's own settings (settings.py), if any

    def __init__(self, config, n_up: int, n_down: int, log=print):
        self.beta = config.beta
        self.settings = self.settings_class.from_config(config) if self.settings_class else None

    @property
    def paired(self) -> bool:
        return self.needs.paired

    def loss(self, x: StepInputs) -> LossOutput:
        raise NotImplementedError

    def extra_examples(self, indices: list[int], group: list[int], examples: list[Example],
                       max_length: int) -> list[tuple[Hashable, Example]]:
        """Examples beyond the micro-batch whose log-probs the loss needs (policy without gradient, reference
        precomputed and cached): (key, example) for this process's micro-batch `indices`, part of `group` (the
        micro-batch of every process together, as one process would hold it), over `examples`."""
        return []

    @property
    def threshold(self) -> float:
        """The implicit reward above which this method's classifier says thumbs-up."""
        return 0.0

    def accuracy(self, rewards: torch.Tensor, labels: torch.Tensor) -> float:
        if self.paired:
            return pair_accuracy(rewards)
        return tie_aware_accuracy(rewards - self.threshold, labels)

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def tie_aware_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of examples where sign(score) matches the label (score > 0 predicts 👍).

    A score of exactly 0 counts as half right, whatever the label: before training the policy equals the reference,
    every reward is 0, and the classifier is honestly at chance (0.5) rather than at the share of one class.
    """
    if scores.numel() == 0:
        return float("nan")
    right = ((scores > 0) & labels) | ((scores < 0) & ~labels)
    return float((right.float() + 0.5 * (scores == 0).float()).mean())


def pair_accuracy(rewards: torch.Tensor) -> float:
    """Share of interleaved (chosen, rejected) pairs whose chosen reward is higher (ties count half)."""
    margin = rewards[0::2] - rewards[1::2]
    return tie_aware_accuracy(margin, torch.ones_like(margin, dtype=torch.bool))


def pair_margins(policy_logps: torch.Tensor, ref_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For interleaved pairs (rows 0, 2, 4, ... chosen; 1, 3, 5, ... their rejected): ρ_w − ρ_l per pair, and ρ."""
    rho = policy_logps - ref_logps
    return rho[0::2] - rho[1::2], rho
