"""UNA with binary feedback (Wang et al., arXiv 2408.15339)."""

from __future__ import annotations

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective
from .lazy import torch


def una_loss(policy_logps, ref_logps, labels, *, beta: float) -> LossOutput:
    """Regress the implicit reward onto the label::

        loss = (σ(βρ) − s)²,   s = 1 for thumbs-up, 0 for thumbs-down

    The implicit reward is squashed by σ so that it lives on the label's [0, 1] scale; regressing the raw βρ onto
    s = 0 would leave thumbs-down answers at ρ = 0 with no gradient pushing them down.
    """
    reward = beta * (policy_logps - ref_logps)
    return LossOutput(losses=(torch.sigmoid(reward) - labels.float()) ** 2, rewards=reward.detach())


class UNA(Objective):
    name, summary = "una", "UNA: regress σ(implicit reward) onto the label (1 for 👍, 0 for 👎)"
    needs = DataNeeds("una")

    def loss(self, x):
        return una_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta)
