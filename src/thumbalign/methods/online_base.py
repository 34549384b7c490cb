"""What the online objectives share: a micro-batch of sampled answers with their groups' statistics, and how
per-token loss terms become a step's loss.

Notation: a prompt q gets a group of G answers; answer i has reward r_i (shaped: the binary outcome plus any
shaping), binary outcome o_i ∈ {0, 1} (👍 = 1), and the group's pass rate r̂ = mean o. R_t = π_θ(a_t|·)/π_old(a_t|·)
per answer token, where π_old is the policy that sampled the answer (on-policy: R_t = 1 in value, ∇R_t = ∇log π_θ).
"""

from __future__ import annotations

from dataclasses import dataclass

from .lazy import torch
from .settings import MethodSettings


NORMALIZATIONS = ("sequence", "token", "constant")


@dataclass
class GroupBatch:
    logps: torch.Tensor        # [B, T] log π_θ of each answer token (with gradient); 0 off the mask
    old_logps: torch.Tensor    # [B, T] log π_old, the sampling policy's (no gradient)
    mask: torch.Tensor         # [B, T] bool: answer tokens
    rewards: torch.Tensor      # [B] shaped reward r_i
    outcomes: torch.Tensor     # [B] binary outcome o_i (1.0 = 👍)
    group_mean: torch.Tensor   # [B] mean reward of the answer's group
    group_std: torch.Tensor    # [B] population standard deviation of the group's rewards
    pass_rate: torch.Tensor    # [B] r̂, the group's share of 👍


class OnlineObjective:
    """One online method: per-token loss terms from a micro-batch of sampled answers. Subclasses set `name`,
    `summary` and `normalization` (how the terms are summed into the step's loss, see :func:`reduce_token_losses`)."""

    name = ""
    summary = ""
    normalization = "sequence"
    settings_class: type[MethodSettings] | None = None  # the objective's own settings (settings.py), if any
    # what the loss compares within a group: "outcome" (the binary 👍/👎: a group of one outcome carries no signal)
    # or "reward" (the shaped reward, e.g. a reward model's P(👍): a group carries signal when its rewards differ)
    learns_from = "outcome"

    def __init__(self, config):
        self.config = config
        self.settings = self.settings_class.from_config(config) if self.settings_class else None

    def token_losses(self, x: GroupBatch) -> torch.Tensor:
        """[B, T] loss terms, 0 off the mask."""
        raise NotImplementedError


def group_statistics(rewards: torch.Tensor, outcomes: torch.Tensor, groups: torch.Tensor):
    """Per answer: its group's mean reward, population std of rewards, and pass rate (share of outcome 1)."""
    mean, std, rate = torch.zeros_like(rewards), torch.zeros_like(rewards), torch.zeros_like(rewards)
    for g in groups.unique():
        members = groups == g
        mean[members] = rewards[members].mean()
        std[members] = rewards[members].std(unbiased=False)
        rate[members] = outcomes[members].float().mean()
    return mean, std, rate


def ratio(logps: torch.Tensor, old_logps: torch.Tensor, max_log: float = 10.0) -> torch.Tensor:
    """R_t = exp(min(log π_θ − log π_old, max_log)): the clamp keeps an off-policy token from overflowing."""
    return torch.exp((logps - old_logps).clamp(max=max_log))


def clipped_surrogate(logps, old_logps, advantages: torch.Tensor, epsilon: float) -> torch.Tensor:
    """PPO's token loss −min(R_t·A, clip(R_t, 1 − ε, 1 + ε)·A) with A broadcast over the answer's tokens."""
    r = ratio(logps, old_logps)
    a = advantages[:, None]
    return -torch.minimum(r * a, r.clamp(1 - epsilon, 1 + epsilon) * a)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(π_θ ‖ π_ref) estimate k3 = exp(ref − logp) − (ref − logp) − 1 (≥ 0, unbiased on-policy)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float):
    """The KL term of the online loss: (β·k3 per answer token, 0 off the mask; each answer's mean k3, detached, for
    the log)."""
    kl = k3_kl(logps, ref_logps) * mask
    return beta * kl, (kl.sum(1) / mask.sum(1).clamp(min=1)).detach()


def truncated_importance_weights(logps: torch.Tensor, sampler_logps: torch.Tensor, known: torch.Tensor,
                                 cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The answers were sampled by another engine (vLLM) whose log-probs differ a little from the trainer's: each
    answer token's loss is weighted by the truncated importance ratio (Ionides 2008; TRL's vLLM correction)

        w_t = min(π_θ(y_t | ·) / π_sampler(y_t | ·), C) = min(exp(log π_θ − log π_sampler), C),   detached,

    and 1 where the sampler's log-prob is not `known` (a retry conversation re-tokenised) or when C is 0 (the
    difference is only logged). Returns (w [B, T], |log π_θ − log π_sampler| [B, T], 0 where not known)."""
    difference = (logps.detach() - sampler_logps) * known
    weights = torch.exp(difference).clamp(max=cap) if cap > 0 else torch.ones_like(difference)
    return torch.where(known, weights, torch.ones_like(weights)), difference.abs()


def reduce_token_losses(token_losses: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, how: str, *,
                        sequences: float, tokens: float, constant: float) -> torch.Tensor:
    """This micro-batch's share of the step's loss, so that the shares of every micro-batch of every process sum to
    the step's loss. `weights` ([B], 1 or 0) drops placeholder rows; the totals are over the whole step:

        sequence:  Σ_i (Σ_t l_it / |a_i|) / sequences      (a mean over answers of each answer's token mean;
                                                            TRL's "grpo" loss type)
        token:     Σ_i Σ_t l_it / tokens                   (a mean over every answer token of the step; "dapo")
        constant:  Σ_i Σ_t l_it / constant                 (no length or batch bias; Dr. GRPO, NFT)
    """
    masked = token_losses * mask * weights[:, None]
    if how == "sequence":
        return (masked.sum(1) / mask.sum(1).clamp(min=1)).sum() / max(sequences, 1.0)
    if how == "token":
        return masked.sum() / max(tokens, 1.0)
    if how == "constant":
        return masked.sum() / constant
    raise ValueError(f"unknown normalization {how!r}; one of {NORMALIZATIONS}")
