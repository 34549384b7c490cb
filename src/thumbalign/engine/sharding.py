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

from ..errors import ConfigError


def fsdp_requested(accelerator) -> bool:
    """True when the launcher asked for FSDP: accelerate's own verdict on GPUs, its environment on CPUs."""
    from accelerate.utils import DistributedType

    return (accelerator.distributed_type == DistributedType.FSDP
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


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
