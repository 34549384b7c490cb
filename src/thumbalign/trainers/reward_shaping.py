"""Reward shaping of online rollouts: what a conversation earns beyond the binary outcome.

  * retry turns (UFO, "try again", --retry-turns): after a 👎 answer the user says --retry-message and the model
    answers again; success at turn k earns γ^k (--retry-gamma), repeating itself costs λ·(1 − unique / answers)
    (--retry-repetition-penalty), and every answer of the conversation is trained on as the chat template renders it;
  * the self-aligned reward (SAR, Han et al., arXiv 2509.05489, --sar-weight): clip((ppl(a) − ppl(a|q)) / ppl(a),
    −1, 1), favouring concise, prompt-specific answers.

Shaping changes the reward the objective compares, never the binary outcome.
"""

from __future__ import annotations

from ..data.prompts import PromptRow
from ..errors import ConfigError


def retry_reward(total: float, passed: bool, turn: int, gamma: float) -> float:
    """Success at turn k earns γ^k × the reward; a conversation that never succeeds ends at 0 (the first turn keeps
    its reward, as without retries)."""
    return gamma ** turn * total if passed or turn == 0 else 0.0


def repetition_penalty(answers: list[str], penalty: float) -> float:
    """λ·(1 − unique answers / answers): a conversation that answers the same thing again pays for it."""
    return penalty * (1 - len({a.strip() for a in answers}) / len(answers))


def continue_after_failure(conversation: list | None, row: PromptRow, answer: str, retry_message: str) -> list:
    """The conversation so far, the failed answer, and the user's reply asking for another try."""
    if conversation is None:
        conversation = row.prompt if isinstance(row.prompt, list) else [{"role": "user", "content": row.prompt}]
    return conversation + [{"role": "assistant", "content": answer}, {"role": "user", "content": retry_message}]


def self_aligned_reward(ppl_given_prompt, ppl_alone):
    """SAR of each answer from its perplexity with and without the prompt (tensors)."""
    return ((ppl_alone - ppl_given_prompt) / ppl_alone).clamp(-1, 1)


def conversation_tokens(tokenizer, conversation: list[dict], source: str) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation as the chat template renders it, with every assistant turn's tokens marked."""
    def ids(messages, generation_prompt):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    tokens = ids(conversation, False)
    mask = [False] * len(tokens)
    for k, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        start, end = len(ids(conversation[:k], True)), len(ids(conversation[:k + 1], False))
        if tokens[:end] != ids(conversation[:k + 1], False):
            raise ConfigError(f"{source}: the chat template does not render a conversation's turns as prefixes of "
                              "it, so --retry-turns cannot mark the answers")
        mask[start:end] = [True] * (end - start)
    return tokens, mask
