"""GRPO (Shao et al., arXiv 2402.03300) and Dr. GRPO (Liu et al., arXiv 2503.20783): group-relative advantages."""

from __future__ import annotations

from dataclasses import dataclass

from .lazy import torch
from .online_base import GroupBatch, OnlineObjective, clipped_surrogate
from .settings import MethodSettings, require, setting


@dataclass
class GRPOSettings(MethodSettings):
    """Settings of `grpo` and `dr_grpo`."""

    title = "GRPO"
    epsilon: float = setting(0.2, "PPO clip range of the grpo/dr_grpo ratio (inactive on-policy).")

    def validate(self) -> None:
        require(self.epsilon > 0, f"epsilon must be positive, got {self.epsilon}")


def grpo_token_losses(x: GroupBatch, *, epsilon: float = 0.2, std_epsilon: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantage with PPO's clipped surrogate::

        A_i = (r_i − mean_group r) / (std_group r + ε_std)       (population std over the group's G answers)
        l_it = −min(R_t·A_i, clip(R_t, 1 − ε, 1 + ε)·A_i)

    On-policy (R_t = 1) the clip is inactive and ∇l_it = −A_i·∇log π_θ(a_t).
    """
    advantages = (x.rewards - x.group_mean) / (x.group_std + std_epsilon)
    return clipped_surrogate(x.logps, x.old_logps, advantages, epsilon) * x.mask


def dr_grpo_token_losses(x: GroupBatch, *, epsilon: float = 0.2) -> torch.Tensor:
    """Dr. GRPO: the advantage without the std division (no difficulty bias)::

        A_i = r_i − mean_group r
        l_it = −min(R_t·A_i, clip(R_t, 1 − ε, 1 + ε)·A_i)      summed over tokens / a constant (no length bias)
    """
    advantages = x.rewards - x.group_mean
    return clipped_surrogate(x.logps, x.old_logps, advantages, epsilon) * x.mask


class GRPO(OnlineObjective):
    name, normalization = "grpo", "sequence"
    summary = "GRPO: advantage (r − mean)/std within each prompt's group, clipped ratio, mean per answer"
    settings_class = GRPOSettings
    learns_from = "reward"

    def token_losses(self, x):
        return grpo_token_losses(x, epsilon=self.settings.epsilon)


class DrGRPO(OnlineObjective):
    name, normalization = "dr_grpo", "constant"
    summary = "Dr. GRPO: advantage r − mean (no std division), token sum over a constant (no length bias)"
    settings_class = GRPOSettings
    learns_from = "reward"

    def token_losses(self, x):
        return dr_grpo_token_losses(x, epsilon=self.settings.epsilon)
