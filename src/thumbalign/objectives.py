"""Training objectives: every method runs on the same trainer and only supplies its loss (and its statistics).

An objective turns a micro-batch's log-probs into per-example losses (losses.py holds the pure formulas) and keeps
whatever state the method needs across steps: BCO's reward shift δ, KTO's reference point z_ref.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import losses as L
from .evaluate import tie_aware_accuracy
from .losses import LossOutput, RewardShift


@dataclass
class StepInputs:
    policy_logps: torch.Tensor          # [n] log π_θ(y|x), with gradient
    ref_logps: torch.Tensor             # [n] log π_ref(y|x)
    labels: torch.Tensor                # [n] bool, thumbs-up
    weights: torch.Tensor | None        # [n] UDM weights (applied to thumbs-down by the methods that use them)
    n_tokens: torch.Tensor              # [n] completion tokens per row
    gather: Callable[[torch.Tensor], torch.Tensor]  # all-gather across processes (identity with one)
    kl_policy_logps: torch.Tensor | None = None     # KTO: log-probs of mismatched (prompt, completion) pairs
    kl_ref_logps: torch.Tensor | None = None


class Objective:
    name = ""
    data_kind = "unpaired"   # or "paired": batches hold interleaved (chosen, rejected) rows
    summary = ""
    uses_kl = False          # needs log-probs of mismatched pairs (KTO)
    needs_both_labels = True
    train_labels = (True, False)  # which labels are trained on (SFT on positives keeps only True)

    def __init__(self, config, n_up: int, n_down: int, log=print):
        self.beta = config.beta

    def loss(self, x: StepInputs) -> LossOutput:
        raise NotImplementedError

    @property
    def threshold(self) -> float:
        """The implicit reward above which this method's classifier says thumbs-up."""
        return 0.0

    def accuracy(self, rewards: torch.Tensor, labels: torch.Tensor) -> float:
        if self.data_kind == "paired":
            return pair_accuracy(rewards)
        return tie_aware_accuracy(rewards - self.threshold, labels)

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def pair_accuracy(rewards: torch.Tensor) -> float:
    """Share of interleaved (chosen, rejected) pairs whose chosen reward is higher (ties count half)."""
    margin = rewards[0::2] - rewards[1::2]
    return tie_aware_accuracy(margin, torch.ones_like(margin, dtype=torch.bool))


class BCO(Objective):
    name, summary = "bco", "Binary Classifier Optimization: BCE on the implicit reward minus a running shift δ"

    def __init__(self, config, n_up, n_down, log=print):
        super().__init__(config, n_up, n_down, log)
        self.shift = RewardShift(config.delta)

    def loss(self, x):
        # δ is updated with this micro-batch's rewards from every process before the loss, as in the reference
        rewards = self.beta * (x.policy_logps.detach() - x.ref_logps)
        self.shift.update(x.gather(rewards), x.gather(x.labels))
        return L.bco_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta, delta=self.shift.value,
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
    name, data_kind = "bco-pair", "paired"
    summary = "BCO on paired data: the same BCE applied to the chosen and the rejected answer of each pair"


def kto_auto_weights(n_up: int, n_down: int) -> tuple[float, float]:
    """Class weights with (w_D·n_D)/(w_U·n_U) = 1, inside the KTO paper's recommended [1, 4/3]."""
    if n_up >= n_down:
        return 1.0, n_up / n_down
    return n_down / n_up, 1.0


class KTO(Objective):
    name, summary = "kto", "Kahneman-Tversky Optimization: reference point z_ref from mismatched pairs"
    uses_kl = True

    def __init__(self, config, n_up, n_down, log=print):
        super().__init__(config, n_up, n_down, log)
        if config.auto_weights:
            self.w_up, self.w_down = kto_auto_weights(n_up, n_down)
            log(f"KTO auto weights: desirable {self.w_up:.4g}, undesirable {self.w_down:.4g} "
                f"({n_up} 👍, {n_down} 👎: (w_D·n_D)/(w_U·n_U) = {self.w_up * n_up / (self.w_down * n_down):.3f})")
        else:
            self.w_up, self.w_down = config.desirable_weight, config.undesirable_weight
            ratio = self.w_up * n_up / (self.w_down * n_down)
            if not 1.0 <= ratio <= 4 / 3:
                log(f"Note: KTO (w_D·n_D)/(w_U·n_U) = {ratio:.3f}, outside the paper's [1, 4/3]; "
                    "--auto-weights picks weights inside it")
        self.z_ref = 0.0

    def loss(self, x):
        # z_ref = max(0, mean ρ over the mismatched pairs of every process), detached
        if x.kl_policy_logps is not None and x.kl_policy_logps.numel():
            local = torch.stack([(x.kl_policy_logps - x.kl_ref_logps).sum(), torch.tensor(
                float(x.kl_policy_logps.numel()), device=x.kl_policy_logps.device)]).float().detach()
        else:
            local = torch.zeros(2, device=x.policy_logps.device)
        total = x.gather(local.unsqueeze(0)).sum(0)
        self.z_ref = max(0.0, float(total[0] / total[1])) if total[1] > 0 else 0.0
        return L.kto_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta, z_ref=self.z_ref,
                          desirable_weight=self.w_up, undesirable_weight=self.w_down)

    @property
    def threshold(self):
        return self.beta * self.z_ref

    def metrics(self):
        return {"z_ref": self.z_ref}


class APOZero(Objective):
    name, summary = "apo-zero", "Anchored Preference Optimization, unpaired: push 👍 rewards up, 👎 down, no anchor"

    def loss(self, x):
        return L.apo_zero_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta)


class UNA(Objective):
    name, summary = "una", "UNA: regress σ(implicit reward) onto the label (1 for 👍, 0 for 👎)"

    def loss(self, x):
        return L.una_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta)


class SFTPositive(Objective):
    name, summary = "sft-positive", "Supervised fine-tuning on the 👍 answers only; 👎 answers are set aside"
    needs_both_labels = False
    train_labels = (True,)

    def loss(self, x):
        return L.sft_positive_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta, n_tokens=x.n_tokens)


class DPO(Objective):
    name, data_kind = "dpo", "paired"
    summary = "Direct Preference Optimization: −log σ(β(ρ_chosen − ρ_rejected))"

    def loss(self, x):
        return L.dpo_loss(x.policy_logps, x.ref_logps, beta=self.beta)


class IPO(Objective):
    name, data_kind = "ipo", "paired"
    summary = "Identity Preference Optimisation: (ρ_chosen − ρ_rejected − 1/(2β))²"

    def loss(self, x):
        return L.ipo_loss(x.policy_logps, x.ref_logps, beta=self.beta)


METHODS: dict[str, type[Objective]] = {cls.name: cls for cls in (BCO, KTO, APOZero, UNA, SFTPositive, DPO, IPO,
                                                                   BCOPair)}


def mismatched_pairs(indices: list[int]) -> list[tuple[int, int]]:
    """KTO's mismatched (prompt, completion) pairs within a micro-batch: each prompt with the NEXT example's
    completion (rotation by one). Unlike reversing the batch, this never pairs an example with itself for any
    batch size ≥ 2; a micro-batch of one has no mismatched pair."""
    if len(indices) < 2:
        return []
    return [(indices[k], indices[(k + 1) % len(indices)]) for k in range(len(indices))]
