"""IPO — Identity Preference Optimisation (Azar et al., arXiv 2310.12036), for paired data."""

from __future__ import annotations

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective, pair_margins


def ipo_loss(policy_logps, ref_logps, *, beta: float) -> LossOutput:
    """One loss per (chosen, rejected) pair, rows interleaved::

        loss = (ρ_w − ρ_l − 1/(2β))²       (log-ratios summed over completion tokens)
    """
    margin, rho = pair_margins(policy_logps, ref_logps)
    per_pair = (margin - 1 / (2 * beta)) ** 2
    return LossOutput(losses=per_pair.repeat_interleave(2), rewards=(beta * rho).detach())


class IPO(Objective):
    name, summary = "ipo", "Identity Preference Optimisation: (ρ_chosen − ρ_rejected − 1/(2β))²"
    needs = DataNeeds("ipo", paired=True)

    def loss(self, x):
        return ipo_loss(x.policy_logps, x.ref_logps, beta=self.beta)
