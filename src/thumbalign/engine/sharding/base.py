"""The interface every sharding backend fills in: how a run holds its weights over its processes, and every step
that depends on it — preparing the model and the optimizer, frozen models, the model that scores between steps, the
gradient norm, gathering the model whole, and the pieces of a checkpoint.

The engine calls these methods and never asks which backend it holds; a backend is one file of this package (found
by `thumbalign.engine.sharding.select`). The defaults are those of a run that keeps whole weights in every process
(one process, or DDP through accelerate).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint as ckpt

# what checkpoints written before the backends existed recorded for FSDP under "sharded"
_LEGACY_SHARDED_TAG = "fsdp"


class Backend:
    """One per run, chosen from the launch (accelerate's environment) when the engine starts."""

    name = "whole weights"
    tag: str | bool = False          # what a checkpoint records of its writer ("sharded" in trainer_state.json)
    sharded = False                  # weights split over the processes: every process must run the same forwards
    updates_inside_backward = False  # the optimizer step already happened in backward(): it cannot be skipped
    accelerate_types: tuple[str, ...] = ()  # the `distributed_type`s of an accelerate config that launch this kind

    # ----------------------------------------------------------------------------- choice, before any model

    @classmethod
    def launched(cls) -> bool:
        """The launch asked for this backend (read from the environment, before the accelerator exists)."""
        return False

    @classmethod
    def accelerator_options(cls, has_accelerator: bool) -> dict:
        """Settings of the accelerator this backend needs: {"cpu": bool} and/or {"backend": process-group backend}.
        Called only when `launched()`; may also set environment variables the libraries read at start."""
        return {}

    @classmethod
    def check_accelerate_settings(cls, settings: dict, where: str) -> None:
        """The rest of an accelerate config launching this kind asks for nothing it cannot do (a ConfigError naming
        the setting), checked before any process starts."""

    @classmethod
    def chosen(cls, accelerator) -> bool:
        """This backend runs the launch `accelerator` was made for."""
        return False

    def __init__(self, accelerator):
        self.accelerator = accelerator

    # ----------------------------------------------------------------------------- set-up

    def configure(self, config) -> None:
        """The run's settings that the backend's own configuration must follow (batch sizes, clipping)."""

    def shard(self, module: torch.nn.Module, model: torch.nn.Module, device: torch.device, bf16: bool) -> None:
        """Split `model`'s weights over the processes, before the optimizer is made (it must hold the shards).
        `module` is what the engine calls; it computes with `model`'s parameters."""

    def wrap(self, module: torch.nn.Module, optimizer):
        """The module and optimizer the training loop uses."""
        return self.accelerator.prepare(module, optimizer)

    def frozen(self, module: torch.nn.Module, model: torch.nn.Module, device: torch.device, bf16: bool):
        """A model the run evaluates and never trains, held as the trained one is; what to call in its place."""
        return module.to(device)

    def scorer(self, module: torch.nn.Module, model: torch.nn.Module):
        """What evaluates the trained `model` between steps (`module`: the wrapped training module)."""
        return model

    def settle_root(self, module, token_id: int, device: torch.device) -> None:
        """Called before a trainer calls the model's layers directly (sampling, embeddings)."""

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip the synchronised gradients; their norm before clipping, the same on every process."""
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    # ----------------------------------------------------------------------------- gathering

    def whole_model(self, model: torch.nn.Module, is_main: bool):
        """The trained model, whole, on the main process (None on the others). Every process must call it."""
        return model if is_main else None

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, checkpoints: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                        is_main: bool, barrier) -> None:
        """Write checkpoint `step` (every process calls this)."""
        if is_main:
            ckpt.save_checkpoint(checkpoints, step, model, optimizer, scheduler, state, keep)

    def load_checkpoint(self, path: Path, module, model, optimizer, scheduler) -> dict:
        """Restore `path` (written by any backend, with any number of processes) into the model, optimizer,
        scheduler and RNG; return the trainer state. A checkpoint written the way this backend writes is read piece
        by piece (`load_own`); any other is read whole and cut to this run's shape (`put_whole`)."""
        if not self.load_own(path, writer_tag(path), module, model, optimizer):
            self.put_whole(model, optimizer, *ckpt.read_whole(path, model))
        return ckpt.load_rest(path, scheduler)

    def load_own(self, path: Path, tag, module, model, optimizer) -> bool:
        """Read a checkpoint whose writer recorded `tag`, if this backend wrote it; False to have it read whole."""
        if tag or ckpt.is_sharded(path):
            return False
        ckpt.load_unsharded(path, model, optimizer)
        return True

    def put_whole(self, model, optimizer, weights: dict[str, torch.Tensor], optim: dict) -> None:
        """Whole weights and optimizer entries (named by parameter) into this run."""
        ckpt.put_whole_into_plain(model, optimizer, weights, optim)


def writer_tag(path: Path):
    """What the checkpoint records of its writer's backend (False: whole weights)."""
    saved = json.loads((path / ckpt.STATE_FILE).read_text()).get("sharded", False)
    return _LEGACY_SHARDED_TAG if saved is True else saved


def plain_copy(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A new, unsharded model of `model`'s architecture (adapter included) holding `weights`: what the final folder,
    LoRA merging and generation need. Built on the meta device, so no second random copy is ever allocated."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.device("meta"):
        copy = type(base)(base.config)
        if hasattr(model, "peft_config"):
            from peft import get_peft_model

            copy = get_peft_model(copy, model.peft_config["default"])
    _, unexpected = copy.load_state_dict(weights, strict=False, assign=True)
    for name, buffer in model.named_buffers():
        # buffers are never sharded; those still on the meta device were not in the state dict, so they are the
        # non-persistent ones (rotary frequencies): taken from the trained model as they are
        parent, _, leaf = name.rpartition(".")
        owner = copy.get_submodule(parent) if parent else copy
        if getattr(owner, leaf, None) is not None and getattr(owner, leaf).is_meta:
            owner.register_buffer(leaf, buffer.detach().cpu().clone(), persistent=False)
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    left = [n for n, p in [*copy.named_parameters(), *copy.named_buffers()] if p.is_meta]
    if unexpected or left:
        raise RuntimeError(f"the gathered weights do not fit the model: unexpected {unexpected[:3]}, "
                           f"missing {left[:3]}")
    return copy


class ShardedBackend(Backend):
    """What the backends that split the weights themselves (FSDP, ZeRO-3) share: the model gathered into a plain
    copy, and checkpoints written by every process, each its own shards (`torch.distributed.checkpoint`)."""

    sharded = True

    def full_weights(self, model: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
        """Every weight and persistent buffer, whole, on the main process's CPU (empty on the others)."""
        raise NotImplementedError

    def checkpoint_views(self, model, optimizer) -> tuple[dict[str, torch.Tensor], dict]:
        """This process's shards of the trainable weights and optimizer moments, named model/<name> and
        optim/<name>/<moment>, as views that share their storage (so that loading into them restores them in place);
        and the optimizer's plain settings ({"param_groups": [...], "state": {name: {non-tensor entries}}})."""
        raise NotImplementedError

    def whole_model(self, model: torch.nn.Module, is_main: bool):
        weights = self.full_weights(model, is_main)
        return plain_copy(model, weights) if is_main else None

    def save_checkpoint(self, checkpoints: Path, step: int, model, optimizer, scheduler, state: dict, keep: int,
                        is_main: bool, barrier) -> None:
        ckpt.save_sharded_checkpoint(checkpoints, step, lambda: self.checkpoint_views(model, optimizer), scheduler,
                                     state, keep, is_main, barrier)
