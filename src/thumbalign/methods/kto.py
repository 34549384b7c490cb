"""KTO — Kahneman-Tversky Optimization (Ethayarajh et al., arXiv 2402.01306).

The reference point z_ref is estimated from *mismatched* pairs: each prompt of a micro-batch with the next
example's completion. Their log-probs are this method's extra forward pass, declared in
:meth:`KTO.extra_examples`; the trainer computes their reference log-probs once before training (cached) and their
policy log-probs, without gradient, at each micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.prepare import DataNeeds
from ..data.tokens import Example, fit_to_length
from .base import LossOutput, Objective
from .lazy import torch
from .settings import MethodSettings, require, setting


@dataclass
class KTOSettings(MethodSettings):
    """Settings of `kto`."""

    title = "KTO"
    desirable_weight: float = setting(1.0, "KTO: weight of thumbs-up losses (w_D).")
    undesirable_weight: float = setting(1.0, "KTO: weight of thumbs-down losses (w_U).")
    auto_weights: bool = setting(False, "KTO: choose w_D, w_U from the class counts so that (w_D·n_D)/(w_U·n_U) = 1, "
                                        "inside the paper's [1, 4/3].")

    def validate(self) -> None:
        require(self.desirable_weight > 0 and self.undesirable_weight > 0,
                f"desirable_weight and undesirable_weight must be positive, got {self.desirable_weight}, "
                f"{self.undesirable_weight}")


def kto_loss(policy_logps, ref_logps, labels, *, beta: float, z_ref: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> LossOutput:
    """KTO's value-function loss::

        ρ = log π_θ(y|x) − log π_ref(y|x)
        loss(thumbs-up)   = w_D · (1 − σ(β(ρ − z_ref)))
        loss(thumbs-down) = w_U · (1 − σ(β(z_ref − ρ)))

    z_ref, the reference point, is a constant here (estimated from mismatched pairs, detached).
    """
    rho = policy_logps - ref_logps
    up = desirable_weight * (1 - torch.sigmoid(beta * (rho - z_ref)))
    down = undesirable_weight * (1 - torch.sigmoid(beta * (z_ref - rho)))
    return LossOutput(losses=torch.where(labels, up, down), rewards=(beta * rho).detach())


def kto_auto_weights(n_up: int, n_down: int) -> tuple[float, float]:
    """Class weights with (w_D·n_D)/(w_U·n_U) = 1, inside the KTO paper's recommended [1, 4/3]."""
    if n_up >= n_down:
        return 1.0, n_up / n_down
    return n_down / n_up, 1.0


def mismatched_pairs(indices: list[int]) -> list[tuple[int, int]]:
    """KTO's mismatched (prompt, completion) pairs within a micro-batch: each prompt with the NEXT example's
    completion (rotation by one). Unlike reversing the batch, this never pairs an example with itself for any
    batch size ≥ 2; a micro-batch of one has no mismatched pair."""
    if len(indices) < 2:
        return []
    return [(indices[k], indices[(k + 1) % len(indices)]) for k in range(len(indices))]


def mismatched_example(prompt_of: Example, completion_of: Example, max_length: int) -> Example:
    """One example's prompt followed by another's completion, cut by the usual truncation rule (the completion
    fitted once already, so a prompt token always stays)."""
    completion = completion_of.input_ids[completion_of.prompt_len:]
    prompt = fit_to_length(prompt_of.input_ids[:prompt_of.prompt_len], completion, max_length)
    return Example(prompt + completion, len(prompt), completion_of.label, -1)


class KTO(Objective):
    name, summary = "kto", "Kahneman-Tversky Optimization: reference point z_ref from mismatched pairs"
    needs = DataNeeds("kto")
    settings_class = KTOSettings

    def __init__(self, config, n_up, n_down, log=print):
        super().__init__(config, n_up, n_down, log)
        if self.settings.auto_weights:
            self.w_up, self.w_down = kto_auto_weights(n_up, n_down)
            log(f"KTO auto weights: desirable {self.w_up:.4g}, undesirable {self.w_down:.4g} "
                f"({n_up} 👍, {n_down} 👎: (w_D·n_D)/(w_U·n_U) = {self.w_up * n_up / (self.w_down * n_down):.3f})")
        else:
            self.w_up, self.w_down = self.settings.desirable_weight, self.settings.undesirable_weight
            ratio = self.w_up * n_up / (self.w_down * n_down)
            if not 1.0 <= ratio <= 4 / 3:
                log(f"Note: KTO (w_D·n_D)/(w_U·n_U) = {ratio:.3f}, outside the paper's [1, 4/3]; "
                    "--auto-weights picks weights inside it")
        self.z_ref = 0.0

    def extra_examples(self, indices, group, examples, max_length):
        # pairs rotate over the micro-batch of every process together, so that z_ref does not depend on how many
        # processes share it; each process computes the pairs whose prompt it holds
        mine = set(indices)
        return [((i, j), mismatched_example(examples[i], examples[j], max_length))
                for i, j in mismatched_pairs(group) if i in mine]

    def loss(self, x):
        # z_ref = max(0, mean ρ over the mismatched pairs of every process), detached
        if x.extra_policy_logps is not None and x.extra_policy_logps.numel():
            local = torch.stack([(x.extra_policy_logps - x.extra_ref_logps).sum(), torch.tensor(
                float(x.extra_policy_logps.numel()), device=x.extra_policy_logps.device)]).float().detach()
        else:
            local = torch.zeros(2, device=x.policy_logps.device)
        total = x.gather(local.unsqueeze(0)).sum(0)
        self.z_ref = max(0.0, float(total[0] / total[1])) if total[1] > 0 else 0.0
        return kto_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta, z_ref=self.z_ref,
                        desirable_weight=self.w_up, undesirable_weight=self.w_down)

    @property
    def threshold(self):
        return self.beta * self.z_ref

    def metrics(self):
        return {"z_ref": self.z_ref}
