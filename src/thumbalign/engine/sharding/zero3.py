"""DeepSpeed ZeRO-3 (`--accelerate-config zero3`): the weights are split over the processes too, and DeepSpeed
gathers a layer's weights just before it runs. Checkpoints are written by every process, each its own shards, as
views of DeepSpeed's own fp32 master weights and Adam moments (see zero.py), and DCP reshards them on load."""

from __future__ import annotations

import torch

from .. import checkpoint as ckpt
from . import zero
from .base import ShardedBackend


class Zero3(zero.DeepSpeedBackend, ShardedBackend):
    name, tag = "DeepSpeed ZeRO-3", "zero3"

    @classmethod
    def chosen(cls, accelerator) -> bool:
        return zero.requested() and zero.stage(accelerator) >= 3

    def shard(self, module, model, device, bf16) -> None:
        zero.partition(module, self.accelerator, device)

    def frozen(self, module, model, device, bf16):
        return zero.frozen(module, self.accelerator, device)

    def scorer(self, module, model):
        return module.module  # DeepSpeed's hooks sit on every layer; the engine's module traced them

    def full_weights(self, model, is_main: bool) -> dict[str, torch.Tensor]:
        return zero.full_weights(model, is_main)

    def checkpoint_views(self, model, optimizer):
        flat = zero.shard_views(model, optimizer)
        inner = optimizer.optimizer.optimizer  # accelerate's wrapper, DeepSpeed's ZeRO-3 optimizer, torch's AdamW
        # the engine's optimizer has one group, of every trainable parameter
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(ckpt.trainable_state(model))}
                  for g in inner.param_groups]
        return flat, {"param_groups": groups, "state": {}}

    def load_own(self, path, tag, module, model, optimizer) -> bool:
        """Every process reads the pieces of its own shards into DeepSpeed's master weights and moments."""
        if tag != self.tag or not ckpt.is_sharded(path):
            return False
        zero.ensure_optimizer_state(optimizer)
        flat = zero.shard_views(model, optimizer)
        plain = ckpt.read_shards(path, flat)
        zero.set_step_counts(model, optimizer, flat)
        ckpt.set_group_settings(optimizer, plain["param_groups"])
        zero.refresh_after_load(optimizer)
        return True

    def put_whole(self, model, optimizer, weights, optim) -> None:
        zero.ensure_optimizer_state(optimizer)
        flat = {f"model/{name}": t for name, t in weights.items()}
        for name, values in optim["state"].items():
            flat.update({f"optim/{name}/{key}": v for key, v in values.items() if torch.is_tensor(v)})
        zero.set_shards(model, optimizer, flat)
        ckpt.set_group_settings(optimizer, optim["param_groups"])
        zero.refresh_after_load(optimizer)
