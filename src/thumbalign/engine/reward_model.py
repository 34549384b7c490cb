"""A binary reward model as a module: one logit P(👍 | prompt, answer) from a sequence-classification head on a
causal-LM backbone. The score is read at the last non-padding token (the rule transformers' *ForSequenceClassification
models use, so the saved folder scores the same elsewhere); a fitted temperature T (kept in the model's config) makes
σ(logit / T) a calibrated probability."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.batching import collate
from ..data.records import Record, with_principle
from ..data.tokens import Example, encode_record, fit_to_length
from ..errors import ConfigError, DataError
from ..files import refuse_pickled_weights, safetensors_only
from .models import load_tokenizer


def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id) -> torch.Tensor:
    """Position of the last real, non-pad token of each row (as transformers' sequence classifiers pick it)."""
    keep = attention_mask.bool()
    if pad_token_id is not None:
        keep = keep & (input_ids != pad_token_id)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (positions * keep).argmax(-1)


class RewardScores(torch.nn.Module):
    """forward(batch) = one logit per sequence; the module the training engine wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = last_token_index(input_ids, attention_mask, self.model.config.pad_token_id)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.model.score(pooled).squeeze(-1).float()


def load_reward_model(path, trust_remote_code: bool = False, trained: bool = False):
    """A sequence classifier with one logit. `trained`: the folder must hold its classification head (a reward model
    thumbalign saved); a plain language model would get a randomly initialised head and score noise."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    if trained:  # what is missing is said below, in one line, instead of transformers' loading report
        hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code, output_loading_info=True,
            **safetensors_only())
    finally:
        hf_logging.set_verbosity(verbosity)
    prefix = f"{model.base_model_prefix}."
    head = sorted(name for name in info["missing_keys"] if not name.startswith(prefix))
    if trained and head:
        raise ConfigError(f"{path} is not a trained reward model: its checkpoint has no classification head "
                          f"({', '.join(head)} would be random); train one with `thumbalign reward train`")
    return model


@torch.no_grad()
def score_examples(model, examples: list[Example], pad_token_id: int, batch_size: int = 16,
                   progress: bool = False, device=None) -> torch.Tensor:
    """Raw logits, in input order (batches sorted by length for little padding). `model` is a sequence classifier,
    or a training engine's :class:`RewardScores` (a sharded model is only whole inside its forward; every process
    must then score the same batches); `device` is where the inputs go (by default the model's)."""
    model.eval()
    scorer = model if isinstance(model, RewardScores) else RewardScores(model)
    device = device or model.device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = torch.zeros(len(examples))
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        batch = collate([examples[i] for i in idx], pad_token_id)
        out[idx] = scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
    return out


def temperature_of(model) -> float:
    return float(getattr(model.config, "thumbalign_temperature", 1.0) or 1.0)


class RewardModel:
    """A trained reward model folder, ready to score (prompt, completion) pairs as calibrated P(👍)."""

    def __init__(self, path, max_length: int = 512, batch_size: int = 16):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"{path} is not a reward model folder (it has no config.json); give the model folder "
                              "that `thumbalign reward train` wrote (its --output-dir/model)")
        refuse_pickled_weights(Path(path))
        self.tokenizer = load_tokenizer(Path(path))
        self.model = load_reward_model(path, trained=True).eval()
        self.model.config.pad_token_id = self.model.config.pad_token_id or self.tokenizer.pad_token_id
        self.temperature, self.max_length, self.batch_size = temperature_of(self.model), max_length, batch_size

    def encode(self, record: Record) -> Example:
        """Tokens as in training, cut by the same rule; an answer that alone exceeds max_length cannot be scored."""
        prompt, completion = encode_record(self.tokenizer, record)
        kept = fit_to_length(prompt, completion, self.max_length)
        if kept is None:
            raise DataError(record.source or "a record", None, "completion",
                            f"{len(completion)} tokens: longer than the reward model's max_length {self.max_length}")
        return Example(kept + completion, len(kept), bool(record.label), -1)

    @property
    def held_out(self) -> dict | None:
        """Mean calibrated P(👍) of its held-out 👍 and 👎 answers, and its AUC, as measured after training (None
        for a model trained without a held-out split)."""
        return getattr(self.model.config, "thumbalign_held_out", None)

    @property
    def principled(self) -> bool:
        """Trained with --principle-field: it judges an answer against a principle given at scoring time."""
        return bool(getattr(self.model.config, "thumbalign_principled", False))

    def probabilities(self, records: list[Record], progress: bool = False, principle: str | None = None) -> np.ndarray:
        """Calibrated P(👍) of each record; for a principle-following model, P(the answer satisfies `principle`)."""
        if self.principled and not (principle and principle.strip()):
            raise ConfigError("this reward model was trained with principles (--principle-field): say which one "
                              "to judge by (reward score --principle \"...\", or --judge rm:PATH@\"...\")")
        if principle and not self.principled:
            raise ConfigError("this reward model was trained without principles; it cannot take --principle")
        if principle:
            records = [with_principle(r, principle.strip()) for r in records]
        examples = [self.encode(r) for r in records]
        logits = score_examples(self.model, examples, self.tokenizer.pad_token_id, self.batch_size, progress)
        return torch.sigmoid(logits / self.temperature).numpy()
