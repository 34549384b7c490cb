"""NFT — Negative-aware Fine-Tuning (Chen et al., arXiv 2505.18116, §3), as in the authors' code (NVlabs/NFT)."""

from __future__ import annotations

from dataclasses import dataclass

from .lazy import torch
from .online_base import GroupBatch, OnlineObjective, ratio
from .settings import MethodSettings, require, setting

PASS_RATE_RANGE = (0.02, 0.98)
WEIGHTINGS = ("dr_grpo", "grpo", "constant")


@dataclass
class NFTSettings(MethodSettings):
    """Settings of `nft`."""

    title = "NFT"
    nft_weighting: str = setting("dr_grpo", "NFT's prompt weight ω: dr_grpo = 1 − r̂ (the authors' default), grpo "
                                            "= √((1 − r̂)/r̂), constant = 1.", choices=WEIGHTINGS)
    nft_negative_floor: float = setting(1.0, "NFT: floor ε of the implicit negative ratio, straight-through "
                                             "(value clamped, gradient kept).")

    def validate(self) -> None:
        require(self.nft_negative_floor > 0, f"nft_negative_floor must be positive, got {self.nft_negative_floor}")


def straight_through_floor(x: torch.Tensor, floor: float) -> torch.Tensor:
    """max(x, floor) in value, x in gradient: the loss stays finite while its gradient keeps flowing."""
    return x + (x.clamp(min=floor) - x).detach()


def prompt_weight(pass_rate: torch.Tensor, weighting: str) -> torch.Tensor:
    """ω(q): 'dr_grpo' 1 − r̂ (the authors' default), 'grpo' √((1 − r̂)/r̂), 'constant' 1."""
    if weighting == "dr_grpo":
        return 1 - pass_rate
    if weighting == "grpo":
        return ((1 - pass_rate) / pass_rate).sqrt()
    if weighting == "constant":
        return torch.ones_like(pass_rate)
    raise ValueError(f"unknown NFT weighting {weighting!r}; one of {WEIGHTINGS}")


def nft_token_losses(x: GroupBatch, *, weighting: str = "dr_grpo", negative_floor: float = 1.0,
                     negative_weight: float = 1.0) -> torch.Tensor:
    """Positives raise the policy's likelihood; negatives lower the likelihood of an *implicit negative policy*
    π⁻ = (π_old − r̂·π_θ)/(1 − r̂), which shares the policy's parameters::

        r̂ = clamp(pass rate of the group, 0.02, 0.98)
        l_it = ω(q) · [ −o_i·log R_t − (1 − o_i)·log max((1 − r̂·R_t)/(1 − r̂), ε) ]

    with R_t = exp(min(log π_θ − log π_old, 10)) and the max taken straight-through (value clamped, gradient kept).
    At R_t = 1 the gradient is −ω∇log π on positives and +ω·r̂/(1 − r̂)·∇log π on negatives: with ω = 1 − r̂ that
    is Dr. GRPO's advantage o − r̂, with ω = √((1 − r̂)/r̂) GRPO's (o − r̂)/std. `negative_weight` 0 leaves
    rejection-sampling fine-tuning (RFT).
    """
    r = ratio(x.logps, x.old_logps)
    rate = x.pass_rate.clamp(*PASS_RATE_RANGE)[:, None]
    positive = -torch.log(r)
    implicit_negative = (1 - rate * r) / (1 - rate)
    negative = -torch.log(straight_through_floor(implicit_negative, negative_floor))
    o = x.outcomes[:, None]
    terms = o * positive + (1 - o) * negative * negative_weight
    return prompt_weight(x.pass_rate.clamp(*PASS_RATE_RANGE), weighting)[:, None] * terms * x.mask


class NFT(OnlineObjective):
    name, normalization = "nft", "constant"
    summary = "NFT: likelihood on 👍 answers, an implicit negative policy on 👎 ones (= GRPO on-policy)"
    settings_class = NFTSettings

    def token_losses(self, x):
        return nft_token_losses(x, weighting=self.settings.nft_weighting,
                                negative_floor=self.settings.nft_negative_floor)
