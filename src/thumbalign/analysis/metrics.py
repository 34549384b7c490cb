"""Pure metrics: does a score separate thumbs-up from thumbs-down, how well calibrated is it, how sure are we.

Accuracy (ties count half), ROC AUC, expected calibration error, temperature scaling, reliability bins and
bootstrap intervals; no models are loaded here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..methods.base import tie_aware_accuracy


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


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the held-out log-loss of σ(logit / T) (Guo et al., 2017); one parameter, so it cannot
    change the ranking (accuracy and AUC stay as they are)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
    target = labels.float()

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> dict:
    """Per equal-width probability bin: mean predicted probability, observed share of 👍, count."""
    which = torch.clamp((probs * bins).long(), max=bins - 1)
    out = {"confidence": [], "frequency": [], "count": []}
    for b in range(bins):
        mask = which == b
        out["count"].append(int(mask.sum()))
        out["confidence"].append(float(probs[mask].mean()) if mask.any() else None)
        out["frequency"].append(float(labels[mask].float().mean()) if mask.any() else None)
    return out
