"""Reference log-probs, computed once per (model weights, tokenised data, precision) and cached on disk.

The reference model is frozen, so log π_ref(y|x) of each example never changes during training. Computing it
once before training removes the reference forward from every step and means no second copy of the model is ever
held in memory: at step 0 the policy *is* the reference, so the policy itself computes them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .logprobs import collate, completion_logps
from .tokens import Example

CACHE_VERSION = "1"  # bump when the log-prob computation changes


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
    digest = hashlib.sha256()
    digest.update(f"v{CACHE_VERSION}|{model_fingerprint(model_dir)}|{precision}|".encode())
    for e in examples:
        digest.update(f"{e.prompt_len}:{','.join(map(str, e.input_ids))};".encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_logps(model, examples: list[Example], pad_token_id: int, batch_size: int, device, autocast,
                  chunk_size: int, desc: str = "reference log-probs", disable_bar: bool = False) -> torch.Tensor:
    """log π(y|x) for each example, in input order. Examples are sorted by length so batches carry little padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = torch.zeros(len(examples), dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=disable_bar):
        idx = order[start:start + batch_size]
        batch = collate([examples[i] for i in idx], pad_token_id)
        with autocast():
            logps = completion_logps(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                     batch["completion_mask"].to(device), chunk_size)
        out[idx] = logps.float().cpu()
    model.train(was_training)
    return out


def cache_path(cache_dir: Path, key: str) -> Path:
    return cache_dir / "reflogps" / f"{key}.safetensors"


def load_cached(path: Path) -> torch.Tensor:
    return load_file(str(path))["logps"]


def store(path: Path, logps: torch.Tensor) -> None:
    """Write aside, then rename: a reader never sees a half-written cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({"logps": logps.contiguous()}, str(tmp))
    os.replace(tmp, path)
