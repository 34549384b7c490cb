"""Held-out feedback scored by a model against its reference: the implicit-reward classifier r − threshold."""

from __future__ import annotations

import torch

from ..data.records import load_records
from ..data.tokens import tokenize_records
from ..engine.inference import batched_logps
from ..engine.models import inference_device, load_causal_lm, load_tokenizer
from .metrics import implicit_classifier_report


def score_feedback(model_dir, ref_dir, data_path: str, *, beta: float, threshold: float, max_length: int,
                   batch_size: int = 8) -> dict:
    """Implicit reward r = β(log π_model − log π_ref) of every held-out record; the classifier r − threshold."""
    tokenizer = load_tokenizer(model_dir)
    records, _ = load_records(data_path)
    examples, report = tokenize_records(tokenizer, records, max_length)
    logps = {}
    for name, folder in (("model", model_dir), ("ref", ref_dir)):
        model = load_causal_lm(folder).to(inference_device())
        logps[name] = batched_logps(model, examples, tokenizer.pad_token_id, batch_size, model.device,
                                    desc=f"log-probs ({name})")
        del model
    rewards = beta * (logps["model"] - logps["ref"])
    labels = torch.tensor([e.label for e in examples])
    metrics = implicit_classifier_report(rewards - threshold, labels)
    metrics["tokenisation"] = report.as_dict()
    return metrics
