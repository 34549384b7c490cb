"""Where log-probs become a loss.

Notation: ρ = log π_θ(y|x) − log π_ref(y|x) (summed over completion tokens), implicit reward r = β·ρ,
label s = thumbs-up (True) or thumbs-down (False), σ the logistic sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    losses: torch.Tensor   # [batch] per-example loss, weights applied
    rewards: torch.Tensor  # [batch] implicit reward r = β·ρ, detached


def bco_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, *, beta: float,
             delta: float, weights: torch.Tensor | None = None) -> LossOutput:
    """Binary Classifier Optimization (Jung et al., arXiv 2404.04656).

    A logistic classifier whose logit is the implicit reward shifted by δ::

        r = β·(log π_θ(y|x) − log π_ref(y|x))
        loss(thumbs-up)   = −log σ(r − δ)
        loss(thumbs-down) = −w(x)·log σ(−(r − δ))

    δ (the reward shift) is a constant here: no gradient flows through it (see :class:`RewardShift`).
    w(x) is the underlying-distribution-matching weight; it applies to thumbs-down examples only and is 1
    when ``weights`` is None. Returns per-example losses; the caller averages them over the batch.
    """
    rewards = beta * (policy_logps - ref_logps)
    logits = rewards - delta
    losses = torch.where(labels, -F.logsigmoid(logits), -F.logsigmoid(-logits))
    if weights is not None:
        losses = torch.where(labels, losses, losses * weights)
    return LossOutput(losses=losses, rewards=rewards.detach())


class RewardShift:
    """The reward shift δ of BCO, kept as running means of the rewards seen in training.

    Two modes:

    * ``"running"`` (default, as the reference implementation): δ = mean of every reward seen so far,
      thumbs-up and thumbs-down pooled. With imbalanced data it leans towards the larger class.
    * ``"balanced"``: δ = ½(mean of thumbs-up rewards + mean of thumbs-down rewards), the midpoint that the
      paper's bound motivates; until both classes have been seen it falls back to the pooled mean.

    Means are merged batch by batch with Chan's parallel formula (count-weighted), so the result does not
    depend on how examples were split into batches. The caller passes rewards gathered from every process.
    """

    def __init__(self, mode: str = "running"):
        if mode not in ("running", "balanced"):
            raise ValueError(f"unknown reward-shift mode {mode!r}")
        self.mode = mode
        self.count = {"all": 0.0, "up": 0.0, "down": 0.0}
        self.mean = {"all": 0.0, "up": 0.0, "down": 0.0}

    def _merge(self, key: str, values: torch.Tensor) -> None:
        n = float(values.numel())
        if n == 0:
            return
        total = self.count[key] + n
        self.mean[key] += (float(values.double().mean()) - self.mean[key]) * n / total
        self.count[key] = total

    def update(self, rewards: torch.Tensor, labels: torch.Tensor) -> None:
        rewards = rewards.detach().flatten().cpu()
        labels = labels.flatten().cpu()
        self._merge("all", rewards)
        self._merge("up", rewards[labels])
        self._merge("down", rewards[~labels])

    @property
    def value(self) -> float:
        if self.mode == "balanced" and self.count["up"] > 0 and self.count["down"] > 0:
            return 0.5 * (self.mean["up"] + self.mean["down"])
        return self.mean["all"]

    def state_dict(self) -> dict:
        return {"mode": self.mode, "count": dict(self.count), "mean": dict(self.mean)}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != self.mode:
            raise ValueError(f"checkpoint was trained with delta mode {state['mode']!r}, not {self.mode!r}")
        self.count, self.mean = dict(state["count"]), dict(state["mean"])


# ---------------------------------------------------------------------------------------------- other unpaired methods

def kto_loss(policy_logps, ref_logps, labels, *, beta: float, z_ref: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> LossOutput:
    """Kahneman-Tversky Optimization (Ethayarajh et al., arXiv 2402.01306)::

        ρ = log π_θ(y|x) − log π_ref(y|x)
        loss(thumbs-up)   = w_D · (1 − σ(β(ρ − z_ref)))
        loss(thumbs-down) = w_U · (1 − σ(β(z_ref − ρ)))

    z_ref, the reference point, is a constant here (the caller estimates it from mismatched pairs, detached).
    """
    rho = policy_logps - ref_logps
    up = desirable_weight * (1 - torch.sigmoid(beta * (rho - z_ref)))
    down = undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - rho)))
    return LossOutput(losses=torch.where(labels, up, down), rewards=(beta * rho).detach())


def apo_zero_loss(policy_logps, ref_logps, labels, *, beta: float) -> LossOutput:
    """APO-zero, unpaired (D'Oosterlinck et al., arXiv 2408.06266): no reference point::

        loss(thumbs-up) = 1 − σ(βρ),   loss(thumbs-down) = σ(βρ)
    """
    reward = beta * (policy_logps - ref_logps)
    return LossOutput(losses=torch.where(labels, 1 - torch.sigmoid(reward), torch.sigmoid(reward)),
                      rewards=reward.detach())


def una_loss(policy_logps, ref_logps, labels, *, beta: float) -> LossOutput:
    """UNA with binary feedback (Wang et al., arXiv 2408.15339): regress the implicit reward onto the label::

        loss = (σ(βρ) − s)²,   s = 1 for thumbs-up, 0 for thumbs-down

    The implicit reward is squashed by σ so that it lives on the label's [0, 1] scale; regressing the raw βρ onto
    s = 0 would leave thumbs-down answers at ρ = 0 with no gradient pushing them down.
    """
    reward = beta * (policy_logps - ref_logps)
    return LossOutput(losses=(torch.sigmoid(reward) - labels.float()) ** 2, rewards=reward.detach())


def sft_positive_loss(policy_logps, ref_logps, labels, *, beta: float, n_tokens: torch.Tensor) -> LossOutput:
    """Supervised fine-tuning on thumbs-up answers only (rejection-sampling fine-tuning)::

        loss(thumbs-up) = −log π_θ(y|x) / |y|   (mean negative log-likelihood per completion token)
        loss(thumbs-down) = 0                   (negatives are discarded)

    The implicit reward βρ is still reported, to compare with the other methods.
    """
    nll = -policy_logps / n_tokens.clamp(min=1)
    return LossOutput(losses=torch.where(labels, nll, torch.zeros_like(nll)),
                      rewards=(beta * (policy_logps - ref_logps)).detach())


# ---------------------------------------------------------------------------------------------- paired methods
# Inputs are interleaved pairs: rows 0, 2, 4, ... are chosen (thumbs-up), rows 1, 3, 5, ... their rejected.

def _pair_margin(policy_logps, ref_logps):
    rho = policy_logps - ref_logps
    return rho[0::2] - rho[1::2], rho


def dpo_loss(policy_logps, ref_logps, *, beta: float) -> LossOutput:
    """Direct Preference Optimization (Rafailov et al., arXiv 2305.18290), one loss per pair::

        loss = −log σ(β(ρ_w − ρ_l))

    Returned per row: both rows of a pair carry the pair's loss, so the mean over rows is the mean over pairs.
    """
    margin, rho = _pair_margin(policy_logps, ref_logps)
    per_pair = -F.logsigmoid(beta * margin)
    return LossOutput(losses=per_pair.repeat_interleave(2), rewards=(beta * rho).detach())


def ipo_loss(policy_logps, ref_logps, *, beta: float) -> LossOutput:
    """Identity Preference Optimisation (Azar et al., arXiv 2310.12036)::

        loss = (ρ_w − ρ_l − 1/(2β))²       (log-ratios summed over completion tokens)
    """
    margin, rho = _pair_margin(policy_logps, ref_logps)
    per_pair = (margin - 1 / (2 * beta)) ** 2
    return LossOutput(losses=per_pair.repeat_interleave(2), rewards=(beta * rho).detach())
