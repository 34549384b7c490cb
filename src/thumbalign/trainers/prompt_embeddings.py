"""What prompt embeddings give a trainer: UDM's density-ratio weights on 👎 examples and BCO's prompt clusters for
δ(x)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data.prepare import PreparedData
from ..engine.inference import prompt_embeddings
from ..engine.loop import Engine
from ..engine.models import cache_root
from ..engine.rundir import RunDir
from ..methods.udm import DensityRatio, embed_texts, fit_density_ratio, weigh_examples


@dataclass
class UDMWeights:
    weights: torch.Tensor   # [examples] the density-ratio weight of each training example (used on 👎 only)
    clipped: torch.Tensor   # [examples] bool: the weight sits at a clip bound
    stats: dict             # min / mean / max / share clipped of the 👎 weights, and their histogram


def training_prompt_embeddings(config, engine: Engine, data: PreparedData, model, tokenizer) -> np.ndarray:
    """One embedding per training example's prompt, by --udm-encoder (a sentence encoder, or the policy itself)."""
    if config.udm_encoder == "policy":
        return prompt_embeddings(model, data.train, tokenizer.pad_token_id, config.eval_batch_size, engine.device,
                                 disable_bar=engine.quiet)
    return embed_texts(data.train_prompts, config.udm_encoder, cache_dir=cache_root(config.cache_dir),
                       disable_bar=engine.quiet, say=engine.say)


def prompt_clusters(config, engine: Engine, data: PreparedData, model, tokenizer) -> torch.Tensor:
    """--delta prompt: the k-means cluster of each training example's prompt (seeded, so every process and every
    resume computes the same clusters from the same data)."""
    from sklearn.cluster import KMeans

    embeddings = np.asarray(training_prompt_embeddings(config, engine, data, model, tokenizer), dtype=np.float64)
    distinct = len({tuple(np.round(e, 6)) for e in embeddings})
    k = max(1, min(config.delta_clusters, distinct))
    clusters = KMeans(n_clusters=k, random_state=config.seed, n_init=10).fit_predict(embeddings)
    sizes = np.bincount(clusters, minlength=k)
    engine.say(f"--delta prompt: {k} prompt clusters ({config.udm_encoder} embeddings), sizes {sizes.min()}–"
               f"{sizes.max()}; δ(x) = the cluster's running mean reward, shrunk towards δ by κ = {config.delta_prior}")
    return torch.tensor(clusters, dtype=torch.long)


def fit_udm(config, engine: Engine, run: RunDir, data: PreparedData, model, tokenizer) -> UDMWeights:
    """Fit (or, on resume, reload) the prompt density-ratio classifier and weigh every training example. The main
    process fits and saves the classifier as JSON; the others read its file."""
    embeddings = training_prompt_embeddings(config, engine, data, model, tokenizer)
    labels = np.array([e.label for e in data.train])
    path = run.path / "udm_classifier.json"
    resuming = run.resume_from is not None
    if engine.is_main and not (resuming and path.exists()):
        ratio = fit_density_ratio(embeddings, labels, per_class=config.udm_samples_per_class, seed=config.seed,
                                  clip_min=config.udm_clip_min, clip_max=config.udm_clip_max,
                                  normalize=config.udm_normalize)
        ratio.save(path)
        engine.say(f"UDM: fitted the prompt classifier on up to {config.udm_samples_per_class} prompts per class "
                   f"({config.udm_encoder} embeddings), saved to {path}")
    elif resuming:
        engine.say(f"UDM: reloaded the prompt classifier from {path}")
    engine.wait()
    ratio = DensityRatio.load(path)
    weights, clipped, stats = weigh_examples(ratio, embeddings, labels)
    engine.say(f"UDM weights of the 👎 examples: min {stats['min']:.3f}, mean {stats['mean']:.3f}, max "
               f"{stats['max']:.3f}, {stats['share_clipped']:.1%} clipped to [{ratio.clip_min}, {ratio.clip_max}]")
    return UDMWeights(torch.tensor(weights, dtype=torch.float32), torch.tensor(clipped), stats)


def udm_window_stats(stats: dict[str, torch.Tensor]) -> dict:
    """Weights of the 👎 examples seen since the last log line (from the window's 'udm_weight' and 'udm_clipped')."""
    if "udm_weight" not in stats:
        return {}
    down = ~stats["label"]
    w, clipped = stats["udm_weight"][down], stats["udm_clipped"][down]
    if not len(w):
        return {}
    return {"udm_weight_min": float(w.min()), "udm_weight_mean": float(w.mean()), "udm_weight_max": float(w.max()),
            "udm_share_clipped": float(clipped.float().mean())}

