"""Where answers are sampled: a generation backend turns prompts into answers (token ids), each answer a function
of its own seed, so that it does not depend on the batch or the process it was generated in.

One backend: transformers `generate` on the model being trained, in batches, under the run's autocast. The online
trainer talks to it only through `prompt_ids`, `answers`, `text` and `set_model`: the seam where another generation
engine plugs in.
"""

from __future__ import annotations

from ..data.prompts import PromptRow
from ..data.tokens import encode_prompt
from .inference import sample_answers
from .loop import Engine


def sample_in_step(engine: Engine, model, prompt_ids: list[list[int]], seeds: list[int], batch_size: int,
                   max_new_tokens: int, temperature: float, pad_token_id: int, eos_token_id: int | None,
                   stand_in_token: int) -> list[list[int]]:
    """Answers (token ids) to `prompt_ids` in batches, under the run's autocast. With sharded weights every process
    must call this as often as the others, and each runs as many batches as the busiest one, with a one-token
    stand-in prompt where it has none of its own (its answer is dropped). `eos_token_id` None: the model's own."""
    synced = engine.sharded
    windows = [slice(start, start + batch_size) for start in range(0, len(prompt_ids), batch_size)]
    out: list[list[int]] = []
    with engine.autocast():
        for window, own in engine.in_lockstep(windows):
            prompts, prompt_seeds = (prompt_ids[window], seeds[window]) if own else ([[stand_in_token]], [0])
            answers = sample_answers(model, prompts, prompt_seeds, max_new_tokens, temperature, pad_token_id,
                                     eos_token_id, synced)
            out += answers if own else []
    return out


class Sampler:
    """The policy answering prompts: token ids in, answers out, in batches, in eval mode, under the run's autocast."""

    def __init__(self, model, tokenizer, config, engine: Engine):
        self.model, self.tokenizer, self.config, self.engine = model, tokenizer, config, engine
        self.eos = tokenizer.eos_token_id

    def set_model(self, model) -> None:
        self.model = model

    def prompt_ids(self, row: PromptRow, conversation: list | None = None) -> list[int]:
        return encode_prompt(self.tokenizer, conversation if conversation is not None else row.prompt, row.source)

    def answers(self, prompt_ids: list[list[int]], seeds: list[int], temperature: float) -> list[list[int]]:
        """Sharded weights: every process calls this as often as the others (see :func:`sample_in_step`)."""
        was_training = self.model.training
        self.model.eval()
        out = sample_in_step(self.engine, self.model, prompt_ids, seeds, self.config.generation_batch_size,
                             self.config.max_new_tokens, temperature, self.tokenizer.pad_token_id, self.eos, self.eos)
        self.model.train(was_training)
        return out

    def text(self, answer_ids: list[int]) -> str:
        return self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
