"""DPO — Direct Preference Optimization (Rafailov et al., arXiv 2305.18290), for paired data."""

from __future__ import annotations

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective, pair_margins
from .lazy import F


def dpo_loss(policy_logps, ref_logps, *, beta: float) -> LossOutput:
    """One loss per (chosen, rejected) pair, rows interleaved::

        loss = −log σ(β(ρ_w − ρ_l))

    Returned per row: both rows of a pair carry the pair's loss, so the mean over rows is the mean over pairs.
    """
    margin, rho = pair_margins(policy_logps, ref_logps)
    per_pair = -F.logsigmoid(beta * margin)
    return LossOutput(losses=per_pair.repeat_interleave(2), rewards=(beta * rho).detach())


class DPO(Objective):
    name, summary = "dpo", "Direct Preference Optimization: −log σ(β(ρ_chosen − ρ_rejected))"
    needs = DataNeeds("dpo", paired=True)

    def loss(self, x):
        return dpo_loss(x.policy_logps, x.ref_logps, beta=self.beta)
