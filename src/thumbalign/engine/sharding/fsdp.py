"""Fully sharded training with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`), for runs started with an FSDP
accelerate config (`--accelerate-config fsdp`, or the user's own with `distributed_type: FSDP`).

Each process keeps 1/N of every weight, gradient and optimizer moment; a layer's weights are gathered just before it
runs and freed after. The units are the ones accelerate's FSDP2 wrapping uses: each transformer block on its own,
and everything outside the blocks (embeddings, final norm, output head — tied or not) as one more group, so that
calling a piece of the model directly (the chunked log-prob path calls the decoder and the head separately) still
gathers what that piece needs.

The engine applies `fully_shard` itself rather than through `accelerator.prepare`: accelerate turns FSDP on for GPUs
only (a CPU run would silently train unsharded), and the engine must name the units above for its own forward path
either way. The sharding, the collectives and the checkpoint resharding are PyTorch's.
"""

from __future__ import annotations

import os

import torch

from ...errors import ConfigError
from .. import checkpoint as ckpt
from .base import ShardedBackend


def leave_loading_to_thumbalign() -> None:
    """Under FSDP, transformers loads real weights on the first process of each machine only (the others get empty
    'meta' tensors) if FSDP_CPU_RAM_EFFICIENT_LOADING is set, for every model it loads, including those a run needs
    whole on every process (a model that samples before training). The setting is turned off for this run: the
    trainers decide which process reads the weights (the first only, when nothing runs on the model before it is
    sharded), and `shard` broadcasts them into the others' shards."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"


def _block_class_names(model) -> set[str]:
    """The transformer block classes transformers marks as never to be split (`_no_split_modules`)."""
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            return set(names)
    return set()


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    names = _block_class_names(model)
    return [m for m in model.modules() if type(m).__name__ in names]


def _outside_blocks(module: torch.nn.Module, blocks: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The modules of `module` owning weights outside the transformer blocks (embeddings, final norm, head)."""
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    return [m for m in module.modules() if any(id(p) not in in_blocks for p in m.parameters(recurse=False))]


def shard(module: torch.nn.Module, model: torch.nn.Module, device: torch.device, bf16: bool) -> None:
    """Shard `model`'s weights over every process, in place. `module` is what the engine calls (it computes with
    `model`'s parameters) and becomes the root unit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = _blocks(model)
    if not blocks:
        raise ConfigError(f"FSDP: {type(model).__name__} names no transformer block class (_no_split_modules), so "
                          "there is nothing to shard layer by layer; use --accelerate-config ddp")
    # processes that built the model empty receive their shards from the first one, which loaded the weights
    empty = any(p.is_meta for p in model.parameters())
    receiving = any(_all_processes(empty))
    whole = model.state_dict() if receiving and dist.get_rank() == 0 else {}  # references, not copies
    # no module.to(device) first: fully_shard moves each unit's parameters to the mesh's device as it shards them,
    # so the device never holds more than one layer whole
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16 compute with float32 master weights and float32 gradient reduction (the sums stay exact enough)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
              else MixedPrecisionPolicy())
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # modules owning weights outside the blocks: one group, so tied input/output embeddings stay one tensor
    rest = _outside_blocks(module, blocks)
    if rest:
        fully_shard(rest, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(module, mesh=mesh, mp_policy=policy)
    if receiving:
        _receive_from_first_process(module, model, whole, device, empty)


def _all_processes(flag: bool) -> list[bool]:
    import torch.distributed as dist

    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, flag)
    return flags


def _receive_from_first_process(module, model, whole: dict, device: torch.device, empty: bool) -> None:
    """The first process's weights broadcast into every process's shards (PyTorch's broadcast_from_rank0), and its
    buffers (rotary frequencies, computed at construction, are not in the state dict) into every process's."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if empty:
        module.to_empty(device=device)
    set_model_state_dict(model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for _, buffer in sorted(model.named_buffers()):
        dist.broadcast(buffer.data, src=0)


def reshard_all(module: torch.nn.Module, model: torch.nn.Module) -> None:
    """The group outside the blocks back to its shards. It stays gathered after a forward pass (the chunked log-prob
    path uses the output weight after the head's own forward), and until the next backward the model then holds
    gathered tensors where the optimizer and the checkpoints know the shards: the passes before training (the
    reference log-probs, say) leave it so. FSDP keeps such a group gathered even when asked to reshard, so it is
    switched to resharding for the moment."""
    rest = _outside_blocks(module, _blocks(model))
    if rest:
        rest[0].set_reshard_after_forward(True, recurse=False)
        rest[0].reshard()
        rest[0].set_reshard_after_forward(False, recurse=False)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A reduced value (a gradient norm) as a plain tensor, whether it came out as a DTensor or not."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and buffer of a sharded model, gathered whole onto the main process's CPU memory (empty on the
    others). Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class Fsdp(ShardedBackend):
    """FSDP2: weights, gradients and optimizer moments split over the processes, a block at a time."""

    name, tag = "FSDP", "fsdp"
    accelerate_types = ("FSDP",)

    @classmethod
    def check_accelerate_settings(cls, settings: dict, where: str) -> None:
        version = str((settings.get("fsdp_config") or {}).get("fsdp_version", 1))
        if version != "2":
            raise ConfigError(f"{where}: fsdp_version {version} is not supported; set fsdp_version: 2 (FSDP2)")

    @classmethod
    def launched(cls) -> bool:
        return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"

    @classmethod
    def accelerator_options(cls, has_accelerator: bool) -> dict:
        leave_loading_to_thumbalign()
        return {}

    @classmethod
    def chosen(cls, accelerator) -> bool:
        """accelerate's own verdict on GPUs, its environment on CPUs."""
        from accelerate.utils import DistributedType

        return accelerator.distributed_type == DistributedType.FSDP or cls.launched()

    def shard(self, module, model, device, bf16) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ConfigError("FSDP needs a distributed launch: start the run with --accelerate-config fsdp "
                              "(and --num-processes N)")
        shard(module, model, device, bf16)

    def wrap(self, module, optimizer):
        return module, optimizer  # already what trains: accelerate would shard it again (GPUs) or not at all (CPUs)

    def frozen(self, module, model, device, bf16):
        shard(module, model, device, bf16)

        def call_and_reshard(*args, **kwargs):
            out = module(*args, **kwargs)
            reshard_all(module, model)  # FSDP would keep the group outside the blocks gathered
            return out

        return call_and_reshard

    def scorer(self, module, model):
        return module  # the root unit: its forward gathers the weights

    def settle_root(self, module, token_id: int, device: torch.device) -> None:
        """FSDP2 takes the first unit to run a forward pass as the root of the sharded model: the root module runs
        once, on a two-token stand-in, before anything calls the layers directly."""
        with torch.no_grad():
            stand_in = torch.tensor([[token_id, token_id]], device=device)
            module(stand_in, torch.ones_like(stand_in), torch.tensor([[False, True]], device=device))

    def clip_grad_norm(self, params, max_norm: float) -> float:
        # the norm over every shard, reduced by the DTensors themselves
        return float(local_value(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    def full_weights(self, model, is_main: bool) -> dict[str, torch.Tensor]:
        return full_weights(model)

    def checkpoint_views(self, model, optimizer):
        _, optim, flat = _state_views(model, optimizer)
        plain = {"param_groups": optim["param_groups"],
                 "state": {name: {k: v for k, v in values.items() if not torch.is_tensor(v)}
                           for name, values in optim["state"].items()}}
        return flat, plain

    def load_checkpoint(self, path, module, model, optimizer, scheduler) -> dict:
        reshard_all(module, model)  # the passes before training may have left a unit gathered
        return super().load_checkpoint(path, module, model, optimizer, scheduler)

    def load_own(self, path, tag, module, model, optimizer) -> bool:
        """Every process reads the pieces of its own shards (DCP reshards when the number of processes changed)."""
        if tag != self.tag or not ckpt.is_sharded(path):
            return False
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        weights, optim, flat = _state_views(model, optimizer)
        plain = ckpt.read_shards(path, flat)
        optim["param_groups"] = plain["param_groups"]
        for name, values in plain["state"].items():
            optim["state"][name].update(values)
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                       options=StateDictOptions(ignore_frozen_params=True))
        return True

    def put_whole(self, model, optimizer, weights, optim) -> None:
        """Whole tensors into an FSDP run: every process keeps its shard of them."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                       options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True))


def _state_views(model, optimizer) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """The model's trainable weights and the optimizer's state keyed by parameter name (PyTorch's distributed state
    dict: each process's tensors are its shards), and one flat name -> tensor view of both that shares their storage,
    so that loading into the view restores them in place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    once = {name for name, _ in model.named_parameters()}  # tied weights (input and output embeddings) once
    flat = {f"model/{name}": t for name, t in weights.items() if name in once}
    for name, values in optim["state"].items():
        flat.update({f"optim/{name}/{key}": v for key, v in values.items() if torch.is_tensor(v)})
    return weights, optim, flat
