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


def bootstrap_interval(values, n_boot: int = 9999, level: float = 0.95, seed: int = 0):
    """(mean, low, high): the mean of `values` with its bias-corrected and accelerated (BCa) bootstrap interval,
    scipy.stats.bootstrap, seeded. A paired difference is passed as one sample of differences. When every value is
    the same there is no spread to resample (and BCa is undefined): the interval is the value itself."""
    import numpy as np
    from scipy.stats import bootstrap

    values = np.asarray(values, dtype=float)
    point = float(values.mean())
    if len(values) < 2 or np.all(values == values[0]):
        return point, point, point
    result = bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=level, method="BCa",
                       rng=np.random.default_rng(seed))
    low, high = result.confidence_interval
    return point, float(low), float(high)


MAX_TEMPERATURE = 20.0


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [1/20, 20] minimising the held-out log-loss of σ(logit / T) (Guo et al., 2017); one parameter, so it
    cannot change the ranking (accuracy and AUC stay as they are).

    Bounded because held-out scores that rank no better than chance (a small or shifted held-out split) drive the
    unbounded optimum towards T → ∞, where every score becomes 0.5 ± 1e-6: as a reward for online learning that
    carries nothing (group advantages vanish under their 1e-4 guard). The held-out AUC says what is wrong instead."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
    target = labels.float()

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(1 / MAX_TEMPERATURE, MAX_TEMPERATURE))


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
