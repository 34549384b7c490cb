"""Reward tokens — LeTI-style conditional fine-tuning (Wang et al., "LeTI: Learning to Generate from Textual
Interactions", arXiv 2305.10314): every answer, 👍 or 👎, is learnt with the LM objective *after a binary reward
token*, and a 👎 answer that got textual feedback (the row's ``comment``) is followed by it, so the model learns
what good and bad answers look like and why. Generation is then conditioned on the 👍 token: the saved folder's chat
template puts it after the generation prompt, so a served model answers as a 👍 answer by default.

Where things sit differs from LeTI's code (github.com/xingyaoww/LeTI), which puts the reward token first and the
feedback before the problem, all trained with the LM loss: here the token sits between the prompt and the answer,
where a chat template can put it when the model is served, and the feedback follows the answer it is about; the
LM loss covers the answer and the feedback, never the prompt or the token."""

from __future__ import annotations

from ..data.prepare import DataNeeds
from .base import LossOutput, Objective
from .lazy import torch

UP_TOKEN, DOWN_TOKEN = "<|thumbs_up|>", "<|thumbs_down|>"
# new tokens start as the mean embedding of these words, so that even a LoRA run (embeddings frozen) sees two
# different conditions from the first step
TOKEN_MEANINGS = {UP_TOKEN: "good helpful correct answer", DOWN_TOKEN: "bad unhelpful wrong answer"}


def reward_token_loss(policy_logps, ref_logps, labels, *, beta: float, n_tokens: torch.Tensor) -> LossOutput:
    """Mean negative log-likelihood per completion token, for every answer, each conditioned on its reward token
    (the token sits in the prompt: conditioned on, never predicted)::

        loss = −log π_θ(y | x, t(label)) / |y|       t(👍) = <|thumbs_up|>, t(👎) = <|thumbs_down|>
                                                      y = the answer (+ "Feedback: <comment>" for a 👎 with one)

    The implicit reward β(log π_θ − log π_ref) is reported as for every method.
    """
    return LossOutput(losses=-policy_logps / n_tokens.clamp(min=1),
                      rewards=(beta * (policy_logps - ref_logps)).detach())


class RewardToken(Objective):
    name = "reward-token"
    summary = "LeTI: LM loss on every answer after a 👍/👎 token (+ the 👎's textual feedback); generate after 👍"
    needs = DataNeeds("reward-token", reward_tokens=(UP_TOKEN, DOWN_TOKEN), feedback_field="comment")
    token_meanings = TOKEN_MEANINGS

    def loss(self, x):
        return reward_token_loss(x.policy_logps, x.ref_logps, x.labels, beta=self.beta, n_tokens=x.n_tokens)
