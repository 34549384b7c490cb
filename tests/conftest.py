"""Shared fixtures: tiny real transformers models and a byte-level tokenizer, built from configs (no downloads)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_tokenizer():
    """A byte-level BPE tokenizer without merges (every byte a token) plus ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|pad|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_model(kind: str, vocab_size: int, seed: int = 0, hidden: int = 32):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=True, pad_token_id=vocab_size - 1, bos_token_id=vocab_size - 3,
                  eos_token_id=vocab_size - 2)
    config = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny_model(path: Path, kind: str = "llama", hidden: int = 32) -> Path:
    tokenizer = make_tokenizer()
    model = make_model(kind, len(tokenizer), hidden=hidden)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_wide(tmp_path_factory) -> Path:
    """Layers 128 wide: bitsandbytes' CPU 4-bit kernels work on blocks of 64 input features."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-wide"), "llama", hidden=128)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder for converted models and reference log-probs."""
    monkeypatch.setenv("THUMBALIGN_CACHE", str(tmp_path / "cache"))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_feedback(n: int = 16):
    """A file a tiny model can learn: answers that are cheerful get 👍, gloomy ones 👎, to the same prompts."""
    rows = []
    for i in range(n):
        prompt = f"q{i % 4}?"
        good = i % 2 == 0
        rows.append({"prompt": prompt, "completion": "yay!" if good else "no.", "label": good})
    return rows
