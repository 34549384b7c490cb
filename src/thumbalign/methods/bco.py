"""BCO — Binary Classifier Optimization (Jung et al., arXiv 2404.04656), unpaired and paired.

Notation: ρ = log π_θ(y|x) − log π_ref(y|x) (summed over completion tokens), implicit reward r = β·ρ,
label s = thumbs-up (True) or thumbs-down (False), σ the logistic sigmoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective


def bco_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, *, beta: float,
             delta: float, weights: torch.Tensor | None = None) -> LossOutput:
    """A logistic classifier whose logit is the implicit reward shifted by δ::

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


class BCO(Objective):
    name, summary = "bco", "Binary Classifier Optimization: BCE on the implicit reward minus a running shift δ"
    needs = DataNeeds("bco")
    uses_udm_weights = True

    def __init__(self, config, n_up, n_down, log=print):
        super().__init__(config, n_up, n_down, log)
        self.shift = RewardShift(config.delta)

    def loss(self, x):
        # δ is updated with this micro-batch's rewards from every process before the loss, as in the reference
        rewards = self.beta * (x.policy_logps.detach() - x.ref_logps)
        self.shift.update(x.gather(x.rows(rewards)), x.gather(x.rows(x.labels)))
        return bco_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta, delta=self.shift.value,
                        weights=x.weights)

    @property
    def threshold(self):
        return self.shift.value

    def metrics(self):
        return {"delta": self.shift.value}

    def state_dict(self):
        return {"reward_shift": self.shift.state_dict()}

    def load_state_dict(self, state):
        self.shift.load_state_dict(state["reward_shift"])


class BCOPair(BCO):
    name = "bco-pair"
    summary = "BCO on paired data: the same BCE applied to the chosen and the rejected answer of each pair"
    needs = DataNeeds("bco-pair", paired=True)
