"""AFT — Alignment Fine-Tuning's constraint alignment loss (Wang et al., "Making Large Language Models Better
Reasoners with Alignment", arXiv 2309.02144), offline on binary (or ranked) feedback.

AFT learns *within a prompt*: every 👍 answer of a prompt must score above every 👎 answer of the same prompt
(the alignment term), while the 👎 scores are kept inside a boundary below the 👍 ones so that the model does not
learn to lower them without end, which degrades it (the constraint term). A unit of training is therefore one
prompt with all its answers; prompts answered with one label only are set aside (and counted). Rows with a numeric
``rank`` field (1 = best) are ordered by rank instead of by label.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective
from .lazy import torch
from .settings import MethodSettings, require, setting


@dataclass
class AFTSettings(MethodSettings):
    """Settings of `aft`."""

    title = "AFT"
    aft_boundary: float = setting(1.0, "AFT: how far (in length-normalised log-likelihood) a 👎 answer's score may "
                                       "fall below the worst 👍 answer of its prompt before the constraint pulls it "
                                       "back.")
    aft_sft_weight: float = setting(1.0, "AFT: weight λ of the NLL on the 👍 answers trained alongside the ranking "
                                         "loss (AFT trains L_VFT + L_A); 0 for the ranking loss alone.")

    def validate(self) -> None:
        require(self.aft_boundary >= 0 and self.aft_sft_weight >= 0,
                f"aft_boundary and aft_sft_weight must be ≥ 0, got {self.aft_boundary}, {self.aft_sft_weight}")


def aft_scores(policy_logps: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """AFT's score of an answer: its length-normalised log-likelihood s(y) = log π_θ(y|x) / |y|."""
    return policy_logps / n_tokens.clamp(min=1)


def better_than(labels: torch.Tensor, ranks: torch.Tensor | None) -> torch.Tensor:
    """[n, n] bool: answer i should score above answer j. With ranks on both rows, a lower rank is better; otherwise
    a 👍 is better than a 👎."""
    by_label = labels[:, None] & ~labels[None, :]
    if ranks is None:
        return by_label
    ranked = ~torch.isnan(ranks)
    both = ranked[:, None] & ranked[None, :]
    return torch.where(both, ranks[:, None] < ranks[None, :], by_label)


def aft_group_loss(scores: torch.Tensor, labels: torch.Tensor, ranks: torch.Tensor | None, boundary: float,
                   sft_weight: float = 0.0) -> torch.Tensor:
    """AFT's boundary-constrained alignment loss (the paper's L_A^BC) of one prompt's answers, scores s from
    :func:`aft_scores`, b = `boundary` (the paper's β)::

        B     = min_{p 👍} s_p − b                     the boundary: b below the worst 👍 answer
        T_p   = 2·B − s_p                              (= 2·s_p* − 2b − s_p, p* the worst 👍 answer)
        L_BC  = log(1 + Σ_{p better than n} [exp(s_n − s_p) + exp(T_p − s_n)])

    For one pair, exp(s_n − s_p) pushes the worse answer n down and exp(T_p − s_n) pushes it up; the two balance
    exactly at s_n = B, so a 👎 score is lowered below the 👍 ones but not past the boundary (the alignment term
    alone, log(1 + Σ exp(s_n − s_p)), lowers it without end and degrades the model). T_p is a target and carries
    no gradient (the paper does not say; a gradient through it would push the worst 👍 score *down*).

    Pairs: with a rank on both rows (1 = best) the lower rank is better, else a 👍 is better than a 👎. The
    boundary term applies to pairs of a 👍 and a worse answer; with no 👍 answer in the group only the ranking
    term is left. `sft_weight` adds λ · mean over the 👍 answers of −s_p (AFT trains L_VFT + L_A: the usual NLL
    alongside)."""
    pairs = better_than(labels, ranks)
    gaps = (scores[None, :] - scores[:, None])[pairs]                        # s_n − s_p for each pair
    terms = [scores.new_zeros(1), gaps]
    if labels.any():
        floor = scores[labels].min() - boundary                              # B
        targets = (2 * floor - scores).detach()                              # T_p, per better answer p
        bounded = pairs & labels[:, None]
        terms.append((targets[:, None] - scores[None, :])[bounded])         # T_p − s_n
    loss = torch.logsumexp(torch.cat(terms), 0)
    if sft_weight and labels.any():
        loss = loss - sft_weight * scores[labels].mean()
    return loss


def aft_loss(policy_logps, ref_logps, labels, *, groups: torch.Tensor | None, ranks: torch.Tensor | None,
             n_tokens: torch.Tensor, beta: float, boundary: float, sft_weight: float = 0.0) -> LossOutput:
    """Per row: the loss of its prompt's group (:func:`aft_group_loss`), so the mean over rows is the mean over
    prompts weighted by their number of answers. Without `groups` the rows are one group. The implicit reward
    β(log π_θ − log π_ref) is reported as for every method (AFT itself needs no reference)."""
    scores = aft_scores(policy_logps, n_tokens)
    groups = torch.zeros_like(labels, dtype=torch.long) if groups is None else groups
    losses = torch.zeros_like(scores)
    for g in torch.unique(groups):
        rows = groups == g
        group_ranks = None if ranks is None else ranks[rows]
        group_loss = aft_group_loss(scores[rows], labels[rows], group_ranks, boundary, sft_weight)
        losses = torch.where(rows, group_loss, losses)
    return LossOutput(losses=losses, rewards=(beta * (policy_logps - ref_logps)).detach())


class AFT(Objective):
    name = "aft"
    summary = "Alignment Fine-Tuning: rank each prompt's 👍 answers above its 👎 ones, 👎 scores kept in a boundary"
    needs = DataNeeds("aft", grouped=True, row_fields=("rank",))
    settings_class = AFTSettings

    def __init__(self, config, n_up: int, n_down: int, log=print):
        super().__init__(config, n_up, n_down, log)
        self.boundary, self.sft_weight = self.settings.aft_boundary, self.settings.aft_sft_weight

    def loss(self, x):
        ranks = x.ranks if x.ranks is not None and not torch.isnan(x.ranks).all() else None
        return aft_loss(x.policy_logps, x.ref_logps, x.labels, groups=x.groups, ranks=ranks, n_tokens=x.n_tokens,
                        beta=self.beta, boundary=self.boundary, sft_weight=self.sft_weight)
