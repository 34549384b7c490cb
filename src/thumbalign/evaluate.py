"""Measuring the implicit-reward classifier: does r − δ separate thumbs-up from thumbs-down?"""

from __future__ import annotations

import torch


def tie_aware_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of examples where sign(score) matches the label (score > 0 predicts 👍).

    A score of exactly 0 counts as half right, whatever the label: before training the policy equals the reference,
    every reward is 0, and the classifier is honestly at chance (0.5) rather than at the share of one class.
    """
    if scores.numel() == 0:
        return float("nan")
    right = ((scores > 0) & labels) | ((scores < 0) & ~labels)
    return float((right.float() + 0.5 * (scores == 0).float()).mean())


def classifier_metrics(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy overall and per label, and ROC AUC (ties count half; None when only one class is present)."""
    from sklearn.metrics import roc_auc_score

    scores, labels = scores.float().cpu(), labels.bool().cpu()
    both = bool(labels.any()) and bool((~labels).any())
    return {
        "n": int(labels.numel()),
        "accuracy": tie_aware_accuracy(scores, labels),
        "accuracy_up": tie_aware_accuracy(scores[labels], labels[labels]),
        "accuracy_down": tie_aware_accuracy(scores[~labels], labels[~labels]),
        "auc": float(roc_auc_score(labels.numpy(), scores.numpy())) if both else None,
        "mean_score_up": float(scores[labels].mean()) if labels.any() else None,
        "mean_score_down": float(scores[~labels].mean()) if (~labels).any() else None,
    }


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """ECE of P(👍): examples are put in `bins` equal-width bins by predicted probability, and the gaps between each
    bin's mean probability and its share of 👍 are averaged, weighted by bin size::

        ECE = Σ_b (n_b / N) · |mean(p in b) − mean(label in b)|
    """
    probs, labels = probs.float().cpu(), labels.float().cpu()
    if probs.numel() == 0:
        return float("nan")
    which = torch.clamp((probs * bins).long(), max=bins - 1)  # p = 1.0 goes into the last bin
    total = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            total += float(in_bin.float().mean()) * abs(float(probs[in_bin].mean()) - float(labels[in_bin].mean()))
    return total


def implicit_classifier_report(scores: torch.Tensor, labels: torch.Tensor) -> dict:
    """`classifier_metrics` plus calibration of σ(score) as P(👍), overall and per label."""
    metrics = classifier_metrics(scores, labels)
    probs = torch.sigmoid(scores.float())
    metrics["ece"] = expected_calibration_error(probs, labels)
    for name, mask in (("up", labels.bool()), ("down", ~labels.bool())):
        metrics[f"ece_{name}"] = expected_calibration_error(probs[mask], labels[mask]) if mask.any() else None
    return metrics


def bootstrap_interval(values, statistic=None, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
    """Percentile bootstrap: (point estimate, low, high) of `statistic` (default: the mean) over the rows of
    `values` (resampled with replacement, seeded)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    statistic = statistic or (lambda v: v.mean(axis=0))
    point = float(statistic(values))
    if len(values) < 2:
        return point, point, point
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(values[rng.integers(0, len(values), len(values))]) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    return point, float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def score_feedback(model_dir, ref_dir, data_path: str, *, beta: float, threshold: float, max_length: int,
                   batch_size: int = 8) -> dict:
    """Implicit reward r = β(log π_model − log π_ref) of every held-out record; the classifier r − threshold."""
    from contextlib import nullcontext

    from .data import load_records
    from .models import load_causal_lm, load_tokenizer
    from .refcache import compute_logps
    from .tokens import tokenize_records

    tokenizer = load_tokenizer(model_dir)
    records, _ = load_records(data_path)
    examples, report = tokenize_records(tokenizer, records, max_length)
    logps = {}
    for name, folder in (("model", model_dir), ("ref", ref_dir)):
        model = load_causal_lm(folder)
        logps[name] = compute_logps(model, examples, tokenizer.pad_token_id, batch_size, model.device, nullcontext,
                                    chunk_size=2048, desc=f"log-probs ({name})")
        del model
    rewards = beta * (logps["model"] - logps["ref"])
    labels = torch.tensor([e.label for e in examples])
    metrics = implicit_classifier_report(rewards - threshold, labels)
    metrics["tokenisation"] = report.as_dict()
    return metrics
