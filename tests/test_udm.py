import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from thumbalign.methods.udm import DensityRatio, fit_density_ratio, prompt_shift_auc, weight_stats


def _gaussians(n_up, n_down, shift, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    mu_up, mu_down = np.zeros(dim), np.zeros(dim)
    mu_up[0], mu_down[0] = shift / 2, -shift / 2
    x = np.concatenate([rng.normal(mu_up, 1.0, (n_up, dim)), rng.normal(mu_down, 1.0, (n_down, dim))])
    labels = np.array([True] * n_up + [False] * n_down)
    return x, labels, mu_up, mu_down


def true_ratio(x, mu_up, mu_down):
    # N(mu_up, I) / N(mu_down, I) = exp((mu_up − mu_down)·x − ½(|mu_up|² − |mu_down|²))
    return np.exp(x @ (mu_up - mu_down) - 0.5 * (mu_up @ mu_up - mu_down @ mu_down))


def test_estimated_ratio_tracks_the_closed_form_one():
    x, labels, mu_up, mu_down = _gaussians(3000, 1000, shift=1.5)  # imbalanced classes on purpose
    ratio = fit_density_ratio(x, labels, per_class=1024, seed=0)
    fresh, _, _, _ = _gaussians(500, 500, shift=1.5, seed=1)
    estimated, truth = ratio.raw_ratio(fresh), true_ratio(fresh, mu_up, mu_down)
    assert spearmanr(estimated, truth).statistic >= 0.9
    # and in size, not only in order: the median log-ratio error is small
    assert np.median(np.abs(np.log(estimated) - np.log(truth))) < 0.3


def test_weights_are_clipped_and_optionally_normalised():
    x, labels, _, _ = _gaussians(500, 500, shift=4.0)
    ratio = fit_density_ratio(x, labels, clip_min=0.5, clip_max=10.0)
    w = ratio.weights(x[~labels])
    assert w.min() >= 0.5 and w.max() <= 10.0 and np.isclose(w, 0.5).any()
    stats = weight_stats(w, ratio)
    assert 0 < stats["share_clipped"] <= 1 and stats["min"] == pytest.approx(0.5)
    normalised = fit_density_ratio(x, labels, normalize=True)
    assert normalised.weights(x[~labels]).mean() == pytest.approx(1.0)


def test_saved_classifier_reloads_to_identical_weights(tmp_path):
    x, labels, _, _ = _gaussians(200, 200, shift=1.0)
    ratio = fit_density_ratio(x, labels, normalize=True)
    ratio.save(tmp_path / "udm.json")
    again = DensityRatio.load(tmp_path / "udm.json")
    assert again == ratio and np.array_equal(again.weights(x), ratio.weights(x))
    json.loads((tmp_path / "udm.json").read_text())  # plain JSON, no pickle


def test_prompt_shift_auc_sees_shift_only_when_there_is_one():
    same, labels, _, _ = _gaussians(300, 300, shift=0.0)
    assert abs(prompt_shift_auc(same, labels) - 0.5) < 0.08
    shifted, labels, _, _ = _gaussians(300, 300, shift=2.5)
    assert prompt_shift_auc(shifted, labels) > 0.8
