"""BCO — Binary Classifier Optimization (Jung et al., arXiv 2404.04656), unpaired and paired.

Notation: ρ = log π_θ(y|x) − log π_ref(y|x) (summed over completion tokens), implicit reward r = β·ρ,
label s = thumbs-up (True) or thumbs-down (False), σ the logistic sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective
from .lazy import F, torch
from .settings import MethodSettings, require, setting


@dataclass
class BCOSettings(MethodSettings):
    """Settings of `bco` and `bco-pair`."""

    title = "BCO"
    delta: str = setting("running", "BCO reward shift δ: 'running' = running mean of all rewards (the reference "
                                    "implementation), 'balanced' = midpoint of the thumbs-up and thumbs-down means, "
                                    "'prompt' = δ(x), the running mean reward of the prompt's cluster (k-means on "
                                    "--udm-encoder embeddings) shrunk towards the running mean, so that what the "
                                    "prompt alone explains is absorbed and the classifier must separate answers.",
                         choices=("running", "balanced", "prompt"))
    delta_clusters: int = setting(16, "--delta prompt: number of prompt clusters (fewer when there are fewer "
                                      "prompts).")
    delta_prior: float = setting(8.0, "--delta prompt: weight κ, in rewards, of the global δ in each cluster's δ(x).")
    sft_weight: float | None = setting(None, "BCO: add this weight × the mean token NLL of each 👍 answer to its "
                                             "loss, an anchor that keeps raising the likelihood of good answers. "
                                             "Default: 1 for --method bco (the best setting on "
                                             "benchmarks/shift_quality.py), 0 for bco-pair; 0 gives the paper's BCO.")
    label_smoothing: float = setting(0.0, "BCO: the chance ε that a thumb is wrong (a misclick, a lenient rater): "
                                          "each row's loss is (1 − ε)·BCE(its label) + ε·BCE(the other label), "
                                          "so the classifier stops at σ(r − δ) = 1 − ε instead of pushing rewards "
                                          "without end (conservative DPO's smoothing). 0 = the paper's BCO.")

    def validate(self) -> None:
        require((self.sft_weight or 0) >= 0 and self.delta_prior > 0 and self.delta_clusters >= 1,
                "sft_weight must be ≥ 0, delta_prior > 0 and delta_clusters ≥ 1")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing must be in [0, 0.5): at 0.5 every label is a "
                                                 "coin flip and nothing is learned")


def bco_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, *, beta: float,
             delta: float | torch.Tensor, weights: torch.Tensor | None = None,
             label_smoothing: float = 0.0) -> LossOutput:
    """A logistic classifier whose logit is the implicit reward shifted by δ::

        r = β·(log π_θ(y|x) − log π_ref(y|x))
        loss(thumbs-up)   = −(1 − ε)·log σ(r − δ) − ε·log σ(−(r − δ))
        loss(thumbs-down) = −w(x)·[(1 − ε)·log σ(−(r − δ)) + ε·log σ(r − δ)]

    ε (label smoothing, 0 in the paper) is the chance that a thumb is flipped: the loss of a thumbs-up row is then
    smallest at σ(r − δ) = 1 − ε, a finite reward, rather than at r → ∞.

    δ (the reward shift) is a constant here, one number or one per example (δ(x), see
    :class:`PromptRewardShift`): no gradient flows through it (see :class:`RewardShift`).
    w(x) is the underlying-distribution-matching weight; it applies to thumbs-down examples only and is 1
    when ``weights`` is None. Returns per-example losses; the caller averages them over the batch.
    """
    rewards = beta * (policy_logps - ref_logps)
    logits = rewards - delta
    as_up, as_down = -F.logsigmoid(logits), -F.logsigmoid(-logits)
    own, other = torch.where(labels, as_up, as_down), torch.where(labels, as_down, as_up)
    losses = (1 - label_smoothing) * own + label_smoothing * other if label_smoothing else own
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


class PromptRewardShift(RewardShift):
    """A prompt-conditional reward shift δ(x): the running mean reward of the prompt's cluster, shrunk towards the
    global running mean δ by a prior of κ rewards::

        δ(x) = (n_c · m_c + κ · δ) / (n_c + κ)        c = cluster of x's prompt embedding

    What the prompt alone explains (users liked topic A, disliked topic B) is then absorbed by δ(x): moving every
    answer of a cluster up or down together no longer lowers the loss, and the classifier must separate the answers
    *within* a kind of prompt. Clusters are fixed before training (k-means on prompt embeddings); their running
    means merge batch by batch like the global one, so the result does not depend on the batching."""

    def __init__(self, prior: float):
        super().__init__("running")
        self.prior = prior
        self.cluster_count: list[float] = []  # per cluster id, grown as clusters are seen
        self.cluster_mean: list[float] = []

    def update(self, rewards: torch.Tensor, labels: torch.Tensor, clusters: torch.Tensor) -> None:
        super().update(rewards, labels)
        rewards, clusters = rewards.detach().flatten().double().cpu(), clusters.flatten().cpu()
        grow = max(int(clusters.max()) + 1 - len(self.cluster_count), 0) if clusters.numel() else 0
        self.cluster_count += [0.0] * grow
        self.cluster_mean += [0.0] * grow
        for c in torch.unique(clusters).tolist():
            values = rewards[clusters == c]
            total = self.cluster_count[c] + values.numel()
            self.cluster_mean[c] += (float(values.mean()) - self.cluster_mean[c]) * values.numel() / total
            self.cluster_count[c] = total

    def per_prompt(self, clusters: torch.Tensor) -> torch.Tensor:
        """δ(x) of each row, given its prompt's cluster (a cluster not seen yet has the global δ)."""
        known = len(self.cluster_count)
        padded = clusters.cpu().clamp(max=known)  # index `known` = an unseen cluster: count 0
        count = torch.tensor(self.cluster_count + [0.0], dtype=torch.float64)[padded]
        mean = torch.tensor(self.cluster_mean + [0.0], dtype=torch.float64)[padded]
        return ((count * mean + self.prior * self.value) / (count + self.prior)).float().to(clusters.device)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mode": "prompt", "cluster_count": list(self.cluster_count),
                "cluster_mean": list(self.cluster_mean), "prior": self.prior}

    def load_state_dict(self, state: dict) -> None:
        if state["mode"] != "prompt":
            raise ValueError(f"checkpoint was trained with delta mode {state['mode']!r}, not 'prompt'")
        self.count, self.mean = dict(state["count"]), dict(state["mean"])
        self.cluster_count, self.cluster_mean = list(state["cluster_count"]), list(state["cluster_mean"])


def positive_nll(policy_logps: torch.Tensor, labels: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
    """The anchor of ``--sft-weight``: mean token NLL −log π_θ(y|x)/|y| on 👍 rows, 0 on 👎 rows."""
    nll = -policy_logps / n_tokens.clamp(min=1)
    return torch.where(labels, nll, torch.zeros_like(nll))


class BCO(Objective):
    name = "bco"
    summary = "Binary Classifier Optimization: BCE on the implicit reward minus a running shift δ, + NLL of 👍"
    needs = DataNeeds("bco")
    uses_udm_weights = True
    settings_class = BCOSettings
    # the SFT anchor on 👍 answers is on by default: +0.03 and +0.10 judged 👍 rate over the paper's BCO on the two
    # shifted settings of benchmarks/shift_quality.py (README), the best setting found there
    default_sft_weight = 1.0

    def __init__(self, config, n_up, n_down, log=print):
        super().__init__(config, n_up, n_down, log)
        s = self.settings
        self.prompt_conditional = s.delta == "prompt"
        self.shift = PromptRewardShift(s.delta_prior) if self.prompt_conditional else RewardShift(s.delta)
        self.sft_weight = self.default_sft_weight if s.sft_weight is None else s.sft_weight
        if self.sft_weight:
            log(f"{self.name}: with an SFT anchor on the 👍 answers, weight {self.sft_weight} "
                "(--sft-weight 0 trains the paper's BCO alone)")

    def loss(self, x):
        # δ is updated with this micro-batch's rewards from every process before the loss, as in the reference
        rewards = self.beta * (x.policy_logps.detach() - x.ref_logps)
        if self.prompt_conditional:
            self.shift.update(x.gather(x.rows(rewards)), x.gather(x.rows(x.labels)), x.gather(x.rows(x.clusters)))
            delta = self.shift.per_prompt(x.clusters)
        else:
            self.shift.update(x.gather(x.rows(rewards)), x.gather(x.rows(x.labels)))
            delta = self.shift.value
        out = bco_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta, delta=delta, weights=x.weights,
                       label_smoothing=self.settings.label_smoothing)
        if self.sft_weight:
            out.losses = out.losses + self.sft_weight * positive_nll(x.policy_logps, x.labels, x.n_tokens)
        return out

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
    default_sft_weight = 0.0  # not measured on paired data: the paper's loss
