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


def _sentence_folder(tmp_path, modes: dict, normalize: bool):
    """A tiny BERT laid out as a sentence-transformers folder, with the given pooling settings."""
    import shutil

    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from thumbalign.methods.udm import encoder_path

    folder = tmp_path / "encoder"
    minilm = encoder_path("minilm")
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **modes}))
    shutil.copy(minilm / "sentence_bert_config.json", folder)
    return folder


def test_a_sentence_transformers_folder_pools_as_its_settings_say(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    from thumbalign.methods.udm import embed_texts

    texts = ["a short one", "a somewhat longer sentence, with more words in it"]
    cls_folder = _sentence_folder(tmp_path / "a", {"pooling_mode_cls_token": True}, normalize=False)
    model, tokenizer = AutoModel.from_pretrained(cls_folder).eval(), AutoTokenizer.from_pretrained(cls_folder)
    with torch.no_grad():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
    got = embed_texts(texts, str(cls_folder))
    assert np.allclose(got, hidden[:, 0].numpy(), atol=1e-5)  # the CLS vector, not normalised
    both = _sentence_folder(tmp_path / "b", {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
                            normalize=True)
    got = embed_texts(texts, str(both))
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    top = hidden.masked_fill(mask == 0, float("-inf")).max(1).values
    expected = torch.nn.functional.normalize(torch.cat([mean, top], -1), dim=-1).numpy()
    assert got.shape == (2, 32) and np.allclose(got, expected, atol=1e-5)
