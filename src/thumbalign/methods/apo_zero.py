"""APO-zero, unpaired (D'Oosterlinck et al., arXiv 2408.06266)."""

from __future__ import annotations

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective
from .lazy import torch


def apo_zero_loss(policy_logps, ref_logps, labels, *, beta: float) -> LossOutput:
    """Push thumbs-up rewards up and thumbs-down rewards down, with no reference point::

        r = β·(log π_θ(y|x) − log π_ref(y|x))
        loss(thumbs-up) = 1 − σ(r),   loss(thumbs-down) = σ(r)
    """
    reward = beta * (policy_logps - ref_logps)
    return LossOutput(losses=torch.where(labels, 1 - torch.sigmoid(reward), torch.sigmoid(reward)),
                      rewards=reward.detach())


class APOZero(Objective):
    name, summary = "apo-zero", "Anchored Preference Optimization, unpaired: push 👍 rewards up, 👎 down, no anchor"
    needs = DataNeeds("apo-zero")

    def loss(self, x):
        return apo_zero_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta)
