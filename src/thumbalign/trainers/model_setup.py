"""The model a trainer trains: loaded (whole, quantised, or empty to receive its shards), checked for Liger, and
made trainable (LoRA, gradient checkpointing)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..engine.loop import Engine
from ..engine.models import add_lora, empty_model, load_causal_lm, quantized_layers, wants_gradient_checkpointing
from ..errors import ConfigError


def load_policy(model_dir: Path, config, engine: Engine):
    """The model to train: float32 weights, or with --load-in-4bit / --load-in-8bit a base whose linear layers
    bitsandbytes holds in 4 or 8 bits (QLoRA). With sharded weights (FSDP, ZeRO-3) the engine shards the model
    before anything runs on it: only the first process reads the weights; the others build the architecture empty and
    receive their shards from it (a method's new tokens grow their empty tables to the same shape), and the model
    stays in CPU memory: sharding moves each weight to the device on its own, so the device never holds the whole
    model.
    Otherwise the model goes to the device whole."""
    bits = 4 if getattr(config, "load_in_4bit", False) else 8 if getattr(config, "load_in_8bit", False) else None
    sharded_first = engine.sharded and not bits
    if sharded_first and not engine.is_main:
        return empty_model(model_dir, config.trust_remote_code)
    model = load_causal_lm(model_dir, config.trust_remote_code, bits, engine.device,
                           torch.bfloat16 if engine.bf16 else torch.float32)
    if bits:
        engine.say(f"Loaded {quantized_layers(model)} linear layers in {bits} bits (bitsandbytes); LoRA trains on "
                   "top of them")
        return model  # placed on the device by the loader; a quantised model refuses .to()
    return model if sharded_first else model.to(engine.device)


def check_use_liger(config, engine: Engine, model, sequences: list[tuple[list[int], list[bool]]], pad_token_id: int):
    """--use-liger: the package and a CUDA GPU are there, and Liger's log-probs and gradients agree with the chunked
    computation on the first few sequences (token ids and which of them are completion tokens) of this run."""
    if not getattr(config, "use_liger", False):
        return
    import importlib.util

    from ..data.batching import collate_masked
    from ..engine.logprobs import check_liger

    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("--use-liger: liger-kernel is not installed (pip install liger-kernel), or drop --use-liger")
    if engine.sharded:
        raise ConfigError("--use-liger is not checked with sharded weights (FSDP, ZeRO-3) yet; use it with one "
                          "process, DDP or ZeRO-2")
    if engine.device.type != "cuda":
        raise ConfigError(f"--use-liger: Liger's kernels are Triton kernels for CUDA GPUs, and this run is on "
                          f"{engine.device.type}; drop --use-liger")
    batch = collate_masked([t for t, _ in sequences[:4]], [m for _, m in sequences[:4]], pad_token_id)
    try:
        with engine.autocast():
            worst = check_liger(model, *(batch[k].to(engine.device) for k in
                                         ("input_ids", "attention_mask", "completion_mask")), config.logps_chunk_size)
    except ValueError as err:
        raise ConfigError(f"--use-liger: {err}; upgrade liger-kernel, or drop --use-liger") from None
    engine.say(f"--use-liger: Liger's log-probs and gradients agree with the chunked computation on "
               f"{min(4, len(sequences))} sequences (largest relative difference {worst:.1e})")


def make_trainable(model, config, task_type: str = "CAUSAL_LM"):
    """LoRA adapters (when asked) and gradient checkpointing (asked, or by model size); returns the model to
    train. A quantised base is first prepared as peft prescribes (norms in float32, inputs that carry gradients)."""
    checkpointing = wants_gradient_checkpointing(model, config.gradient_checkpointing)
    if quantized_layers(model):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointing = False  # switched on just now, if wanted
    if config.use_lora:
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                         task_type)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model

