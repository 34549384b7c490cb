"""Reference log-probs, computed once per (model weights, tokenised data, precision) and cached on disk.

The reference model is frozen, so log π_ref(y|x) of each example never changes during training. Computing it
once before training removes the reference forward from every step and means no second copy of the model is ever
held in memory: at step 0 the policy *is* the reference, so the policy itself computes them. With several
processes, each computes a shard; the main process writes the cache once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..data.tokens import Example, examples_digest
from ..files import read_cached_tensor, write_cached_tensor
from .inference import batched_logps

CACHE_VERSION = "2"  # bump when the log-prob computation changes


def model_fingerprint(model_dir: Path) -> str:
    """Identify a model folder by the names, sizes and modification times of its files (cheap, no hashing of
    hundreds of megabytes); a changed weight file gets a new fingerprint."""
    parts = []
    for path in sorted(Path(model_dir).iterdir()):
        if path.is_file():
            st = path.stat()
            parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256(("|".join(parts) + str(Path(model_dir).resolve())).encode()).hexdigest()


def cache_key(model_dir: Path, examples: list[Example], precision: str) -> str:
    key = f"v{CACHE_VERSION}|{model_fingerprint(model_dir)}|{precision}|{examples_digest(examples, labels=False)}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "reflogps" / f"{key}.safetensors"


def store(path: Path, logps: torch.Tensor) -> None:
    """Write aside, then rename: a reader never sees a half-written cache file."""
    write_cached_tensor(path, logps, "the reference log-probs cache (--cache-dir chooses another place)")


class ReferenceLogps:
    """log π_ref for lists of examples, from the cache or computed by `model` (which must still be the freshly loaded
    reference; with sharded weights, the engine's module) on every process of `engine`, each a shard."""

    def __init__(self, engine, model, model_dir: Path, pad_token_id: int, batch_size: int, chunk_size: int,
                 cache_dir: Path):
        self.engine, self.model, self.model_dir = engine, model, model_dir
        self.pad_token_id, self.batch_size, self.chunk_size = pad_token_id, batch_size, chunk_size
        self.cache_dir = cache_dir

    def __call__(self, examples: list[Example], what: str) -> tuple[torch.Tensor, bool]:
        """(log-probs in input order, whether they came from the cache)."""
        engine = self.engine
        path = cache_path(self.cache_dir, cache_key(self.model_dir, examples, engine.precision))
        cached, damaged = read_cached_tensor(path, len(examples))
        if engine.main_value(cached is not None):  # every process must take the same branch
            engine.say(f"Reference log-probs for {len(examples)} {what} examples loaded from cache ({path.stem})")
            return cached, True
        if damaged:
            engine.say(f"The cached reference log-probs {path} are damaged ({damaged}): computed again")
        engine.say(f"Computing reference log-probs for {len(examples)} {what} examples (cached for later runs)")
        mine = examples[engine.rank::engine.world]
        # as many examples as the busiest process (sharded, every forward pass gathers from all): stand-ins repeat one
        stand_ins = engine.rounds(len(mine)) - len(mine)
        logps = batched_logps(self.model, mine + examples[:1] * stand_ins, self.pad_token_id, self.batch_size,
                              engine.device, engine.autocast, self.chunk_size, desc="reference log-probs",
                              disable_bar=engine.quiet)[:len(mine)]
        if engine.world > 1:
            full = torch.zeros(len(examples))
            for rank, values in enumerate(engine.gather_objects(logps.tolist())):
                full[rank::engine.world] = torch.tensor(values)
            logps = full
        if engine.is_main:
            store(path, logps)
        engine.wait()
        return logps, False
