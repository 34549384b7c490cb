"""Supervised fine-tuning on thumbs-up answers only (rejection-sampling fine-tuning, offline)."""

from __future__ import annotations

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective
from .lazy import torch


def sft_positive_loss(policy_logps, ref_logps, labels, *, beta: float, n_tokens: torch.Tensor) -> LossOutput:
    """Mean negative log-likelihood per completion token of the thumbs-up answers::

        loss(thumbs-up) = −log π_θ(y|x) / |y|
        loss(thumbs-down) = 0                   (negatives are discarded)

    The implicit reward βρ is still reported, to compare with the other methods.
    """
    nll = -policy_logps / n_tokens.clamp(min=1)
    return LossOutput(losses=torch.where(labels, nll, torch.zeros_like(nll)),
                      rewards=(beta * (policy_logps - ref_logps)).detach())


class SFTPositive(Objective):
    name, summary = "sft-positive", "Supervised fine-tuning on the 👍 answers only; 👎 answers are set aside"
    needs = DataNeeds("sft-positive", train_labels=(True,))

    def loss(self, x):
        return sft_positive_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta, n_tokens=x.n_tokens)
