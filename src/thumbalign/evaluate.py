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
