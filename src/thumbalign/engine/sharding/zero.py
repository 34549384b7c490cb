"""DeepSpeed ZeRO through accelerate (`--accelerate-config zero2` / `zero3`, or the user's own DeepSpeed config).

ZeRO-1/2 shard the optimizer's fp32 master weights and Adam moments (and, stage 2, the gradients); every process
keeps the whole working weights. A checkpoint gathers each parameter's pieces one parameter at a time and the main
process writes them like any unsharded run's checkpoint, which any run can resume from.

ZeRO-3 shards the weights too, and DeepSpeed gathers a layer's weights just before it runs. DeepSpeed keeps a
parameter's shard as one contiguous piece of the *flattened* parameter: with N processes and a parameter of n
elements, process r holds elements [r·⌈n/N⌉, (r+1)·⌈n/N⌉) (the last ones padded). That is exactly how a 1-D
`DTensor` sharded on dimension 0 splits n elements, so each shard is handed to `torch.distributed.checkpoint` as a
view of such a DTensor: every process writes its own piece, nothing is gathered, and DCP reshards when a run resumes
with another number of processes. The views point into DeepSpeed's own fp32 master weights and Adam moments, so a
load writes straight into them.

DeepSpeed does the sharding, the collectives and the optimizer step; thumbalign only reads and writes the pieces.
"""

from __future__ import annotations

import os
import warnings

import torch

from ...errors import ConfigError
from .base import Backend


def requested() -> bool:
    """The launcher asked for DeepSpeed (any stage)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def leave_loading_to_thumbalign() -> None:
    """With zero3_init_flag, transformers would build every model it loads already sharded (`deepspeed.zero.Init`),
    including those a run needs whole (a model that samples before training, the copy compared with at the end).
    The flag is turned off for this run: the trainers decide which process reads the weights (the first only, when
    nothing runs on the model before sharding), and `partition` shards the model one parameter at a time."""
    if requested():
        os.environ["ACCELERATE_DEEPSPEED_ZERO3_INIT"] = "false"


def keep_transformers_unsharded(accelerator) -> None:
    """accelerate tells transformers about a ZeRO-3 run (whatever zero3_init_flag says), and transformers then builds
    every model sharded and loads weights into the shards. transformers is told nothing, for the reason above:
    models load whole or empty as the trainer asks, and the engine shards the ones it prepares."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    from transformers.integrations import unset_hf_deepspeed_config

    plugin.dschf = None
    unset_hf_deepspeed_config()


def use_gloo_collectives() -> None:
    """On CPU processes DeepSpeed would compile a shared-memory all-reduce kernel when it starts (a C++ compiler and
    ninja at run time, about a minute the first time) and fall over where either is missing. The processes talk
    through gloo instead, as every other CPU run of thumbalign does."""
    import importlib

    # by module name: the package's attribute `torch` is the torch library itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def stage(accelerator) -> int:
    """The ZeRO stage of this run (0 when it does not run under DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0


def configure(accelerator, config) -> None:
    """thumbalign's flags decide the batch and the clipping, whatever the DeepSpeed config says. The engine runs the
    micro-batches of a step itself and tells DeepSpeed which one ends the step, so DeepSpeed accumulates nothing of
    its own."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = config.per_device_train_batch_size * accelerator.num_processes
    ds["gradient_clipping"] = float(config.max_grad_norm) if config.max_grad_norm > 0 else 0.0


def partition(module: torch.nn.Module, accelerator, device: torch.device) -> None:
    """ZeRO-3: split every weight of `module` over the processes before DeepSpeed takes it, one parameter at a time.

    Given a whole model, DeepSpeed would first move all of it to the device and split it afterwards, so each device
    would briefly hold the whole model. Here each parameter goes to the device on its own, is broadcast from the first
    process, and is cut to this process's shard before the next one moves (`deepspeed.zero.Init` on an existing
    module), so a device never holds more than its shards and one whole parameter. The broadcast also means a process
    that built the model empty (meta tensors, no weights read) receives the first process's weights."""
    import deepspeed
    import torch.distributed as dist

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    dtype = _param_dtype(ds)
    empty = any(p.is_meta for p in module.parameters())
    flags: list = [None] * dist.get_world_size()
    dist.all_gather_object(flags, empty)
    if empty:
        _allocate_empty(module, dtype)
    for p in module.parameters():
        # what DeepSpeed does to a whole model (bf16 / fp16 working weights; its fp32 master copy is made later)
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for owner in module.modules():  # buffers are never split: they go to the device whole, as DeepSpeed puts them
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                owner._buffers[name] = buffer.to(device)
    if any(flags):  # non-persistent buffers (rotary frequencies) are computed at construction: not on empty models
        for _, buffer in sorted(module.named_buffers()):
            dist.broadcast(buffer.data, src=0)
    deepspeed.zero.Init(module=module, config_dict_or_path=_init_config(ds))


def frozen(module: torch.nn.Module, accelerator, device: torch.device):
    """A model that is evaluated and never trained, split over the processes as ZeRO-3 splits the trained one: a
    DeepSpeed engine without an optimizer, whose forward gathers each layer (every process must call it in step).
    After `configure`, whose batch sizes its config takes."""
    import deepspeed

    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    partition(module, accelerator, device)
    config = _init_config(ds)
    dtype = _param_dtype(ds)
    if dtype != torch.float32:
        config["bf16" if dtype == torch.bfloat16 else "fp16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


def _allocate_empty(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """CPU memory for every meta tensor of `module`, never written (the system commits a page when it is), for the
    first process's values to be broadcast into. A parameter that several modules share (tied embeddings) stays one
    parameter: every process must hand DeepSpeed the same list of parameters."""
    made: dict[int, torch.nn.Parameter] = {}
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    kind = dtype if p.is_floating_point() else p.dtype
                    made[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=kind), requires_grad=p.requires_grad)
                owner._parameters[name] = made[id(p)]
        for name, b in owner._buffers.items():
            if b is not None and b.is_meta:
                owner._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _param_dtype(ds: dict) -> torch.dtype:
    if str(ds.get("bf16", {}).get("enabled", False)).lower() == "true":
        return torch.bfloat16
    if str(ds.get("fp16", {}).get("enabled", False)).lower() == "true":
        return torch.float16
    return torch.float32


def _init_config(ds: dict) -> dict:
    """The parts of the run's DeepSpeed config that say where shards live (parameter offload, NVMe), without the
    'auto' values accelerate fills in only when it starts the engine."""
    def settled(value):
        if isinstance(value, dict):
            return {k: settled(v) for k, v in value.items() if v != "auto"}
        return value

    keys = ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "zero_optimization")
    return {k: settled(ds[k]) for k in keys if k in ds}


def _zero_optimizer(optimizer):
    """DeepSpeed's ZeRO-3 optimizer behind accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def full_weights(model: torch.nn.Module, is_main: bool) -> dict[str, torch.Tensor]:
    """Every weight and persistent buffer of `model`, whole, on the main process's CPU (empty on the others). Layer
    by layer: only one layer's weights are ever gathered at a time. Every process must call it."""
    import deepspeed

    persistent = set(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if is_main:
                for name, p in module.named_parameters(recurse=False):
                    out[f"{prefix}.{name}" if prefix else name] = p.detach().cpu().clone()
    if is_main:
        out.update({name: b.detach().cpu().clone() for name, b in model.named_buffers() if name in persistent})
    return out


def _shards(model, optimizer):
    """(name, parameter, sub-group, offset of its shard in the sub-group's flat tensors) for every trainable
    parameter, tied ones once."""
    zero = _zero_optimizer(optimizer)
    names = {}
    for name, p in model.named_parameters():
        names.setdefault(id(p), name)
    for group, params in enumerate(zero.fp16_groups):
        offset = 0
        for p in params:
            yield names[id(p)], p, group, offset
            offset += p.ds_tensor.numel()


def shard_views(model, optimizer) -> dict[str, torch.Tensor]:
    """Each process's shards as 1-D DTensors named like the FSDP checkpoints' tensors (model/<name>,
    optim/<name>/<moment>), viewing DeepSpeed's fp32 master weights and Adam moments. The step count, the same for
    every parameter of a sub-group, is a plain tensor per parameter (every process holds the same value): a copy, put
    back by :func:`set_step_counts` after a load."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    zero = _zero_optimizer(optimizer)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(zero.fp32_partitioned_groups_flat[0].device.type, (world,))
    flat: dict[str, torch.Tensor] = {}
    for name, p, group, offset in _shards(model, optimizer):
        size, numel = p.ds_tensor.numel(), p.ds_numel
        mine = max(0, min(size, numel - rank * size))  # the last processes' shards end in padding

        def view(t: torch.Tensor) -> DTensor:
            return DTensor.from_local(t.narrow(0, offset, mine), mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size([numel]), stride=(1,))

        master = zero.fp32_partitioned_groups_flat[group]
        flat[f"model/{name}"] = view(master.data)
        for key, value in zero.optimizer.state.get(master, {}).items():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == master.numel():
                flat[f"optim/{name}/{key}"] = view(value)
            elif torch.is_tensor(value) and value.numel() == 1:  # a copy: one tensor may not be saved under two names
                flat[f"optim/{name}/{key}"] = value.detach().clone().reshape(())
    return flat


def set_step_counts(model, optimizer, flat: dict[str, torch.Tensor]) -> None:
    """The step counts read back into :func:`shard_views`' copies, put where the optimizer keeps them."""
    zero = _zero_optimizer(optimizer)
    for name, _, group, _ in _shards(model, optimizer):
        state = zero.optimizer.state[zero.fp32_partitioned_groups_flat[group]]
        for key, value in state.items():
            if torch.is_tensor(value) and value.numel() == 1 and f"optim/{name}/{key}" in flat:
                value.copy_(flat[f"optim/{name}/{key}"].reshape(value.shape))


def set_shards(model, optimizer, whole: dict[str, torch.Tensor]) -> None:
    """Load whole tensors (named like :func:`shard_views`, shaped like their parameters or flat) into this process's
    shards: what a checkpoint written by another engine (one process, DDP, FSDP) resumes through."""
    import torch.distributed as dist

    zero = _zero_optimizer(optimizer)
    rank = dist.get_rank()
    for name, p, group, offset in _shards(model, optimizer):
        size, numel = p.ds_tensor.numel(), p.ds_numel
        start = min(rank * size, numel)
        mine = max(0, min(size, numel - start))
        master = zero.fp32_partitioned_groups_flat[group]
        targets = {f"model/{name}": master.data, **{f"optim/{name}/{key}": value
                                                   for key, value in zero.optimizer.state.get(master, {}).items()
                                                   if torch.is_tensor(value)}}
        for key, target in targets.items():
            source = whole[key]
            if target.dim() == 1 and target.numel() == master.numel():
                target.narrow(0, offset, mine).copy_(source.reshape(-1)[start:start + mine])
            else:  # the step count
                target.copy_(source.reshape(target.shape))


def refresh_after_load(optimizer) -> None:
    """After the fp32 master shards were overwritten: the working copies of the weights follow, and the small
    'persistent' parameters, which DeepSpeed keeps whole on every process, are gathered again (the same sequence as
    DeepSpeed's own checkpoint loading)."""
    zero = _zero_optimizer(optimizer)
    zero.checkpoint_event_prologue()
    for master, working in zip(zero.fp32_partitioned_groups_flat, zero.fp16_partitioned_groups_flat):
        if master is not working and master.numel() > 0:
            working.data.copy_(master.data)
    zero.checkpoint_event_epilogue()


def ensure_optimizer_state(optimizer) -> None:
    """Adam creates its moments at the first step, and a run resumed before any step has none to load into: they are
    created now, as torch's AdamW would (zeros, step 0)."""
    zero = _zero_optimizer(optimizer)
    amsgrad = any(group.get("amsgrad") for group in zero.optimizer.param_groups)
    for master in zero.fp32_partitioned_groups_flat:
        state = zero.optimizer.state[master]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)


# --------------------------------------------------------------------------- ZeRO-1/2: whole weights, sharded optimizer

def _pieces(model, optimizer):
    """(name, parameter, where this process's piece lies in the flattened parameter, the same piece of the fp32
    partition's tensors) for every trainable parameter; the slices are None where this process holds none of it."""
    zero = _zero_optimizer(optimizer)
    group_of = {id(p): i for i, params in enumerate(zero.bit16_groups) for p in params}
    for name, p in _trainable(model).items():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:
            yield name, p, group_of[id(p)], None, None
            continue
        lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
        yield name, p, group_of[id(p)], slice(lp.start, lp.start + lp.numel), slice(hp.start, hp.start + hp.numel)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _partition_state(zero, group: int) -> tuple[torch.Tensor, dict]:
    """A ZeRO-1/2 sub-group's fp32 master partition and its Adam state, created (zeros, step 0) if Adam has not
    stepped yet, as torch's AdamW would."""
    master = zero.single_partition_of_fp32_groups[group]
    state = zero.optimizer.state[master]
    if not state:
        state["step"] = torch.tensor(0.0)
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.zeros_like(master, memory_format=torch.preserve_format)
        if any(g.get("amsgrad") for g in zero.optimizer.param_groups):
            state["max_exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
    return master, state


def gathered_state(model, optimizer, is_main: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """ZeRO-1/2: every trainable weight (fp32 master) and its Adam moments, whole, on the main process, in the form of
    an unsharded run's checkpoint (moments numbered by parameter). One parameter at a time is gathered; every process
    must call it."""
    import torch.distributed as dist

    zero = _zero_optimizer(optimizer)
    weights, numbered = {}, {}
    for number, (name, p, group, lp, hp) in enumerate(_pieces(model, optimizer)):
        master, state = _partition_state(zero, group)
        sources = {"weight": master, **{k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1}}
        whole = {}
        for key, source in sources.items():
            buffer = torch.zeros(p.numel(), dtype=torch.float32, device=master.device)
            if lp is not None:
                buffer[lp].copy_(source[hp])
            dist.all_reduce(buffer)  # each element is held by exactly one process, the others add zeros
            whole[key] = buffer.reshape(p.shape).cpu()
        if is_main:
            weights[name] = whole.pop("weight")
            numbered[number] = {**whole, "step": state["step"].detach().clone().cpu()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(numbered)))}
              for g in zero.optimizer.param_groups]
    return weights, {"state": numbered, "param_groups": groups}


def set_whole(model, optimizer, weights: dict[str, torch.Tensor], optim_by_name: dict) -> None:
    """ZeRO-1/2: whole weights and moments (every process has read them) into the working weights, which every
    process keeps whole, and into this process's pieces of the master weights and moments."""
    zero = _zero_optimizer(optimizer)
    with torch.no_grad():
        for name, p, group, lp, hp in _pieces(model, optimizer):
            p.data.copy_(weights[name].to(p.dtype))
            master, state = _partition_state(zero, group)
            saved = optim_by_name["state"].get(name, {})
            if "step" in saved:
                state["step"].copy_(torch.as_tensor(saved["step"]).reshape(state["step"].shape))
            if lp is None:
                continue
            master[hp].copy_(weights[name].reshape(-1)[lp])
            for key, value in state.items():
                if torch.is_tensor(value) and value.dim() == 1 and key in saved:
                    value[hp].copy_(saved[key].reshape(-1)[lp])
    for group, saved in zip(zero.optimizer.param_groups, optim_by_name["param_groups"]):
        group.update({k: v for k, v in saved.items() if k != "params"})


# --------------------------------------------------------------------------- what both ZeRO backends share

class DeepSpeedBackend(Backend):
    """A run under DeepSpeed (through accelerate): its stage decides the backend (zero12.py, zero3.py)."""

    updates_inside_backward = True  # DeepSpeed steps inside backward() once the gradients are synced
    accelerate_types = ("DEEPSPEED",)

    @classmethod
    def check_accelerate_settings(cls, settings: dict, where: str) -> None:
        import importlib.util

        nvme = [k for k, v in (settings.get("deepspeed_config") or {}).items()
                if k.startswith("offload_") and str(v).lower() == "nvme"]
        if nvme:
            raise ConfigError(f"{where}: {nvme[0]}: nvme is not supported (thumbalign checkpoints the shards DeepSpeed "
                              "keeps in memory); use none or cpu")
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"{where}: distributed_type DEEPSPEED needs DeepSpeed (pip install deepspeed)")

    @classmethod
    def launched(cls) -> bool:
        return requested()

    @classmethod
    def accelerator_options(cls, has_accelerator: bool) -> dict:
        leave_loading_to_thumbalign()
        if has_accelerator:
            return {}
        # on CPU processes accelerate joins them through DeepSpeed only when not told cpu=True, and then needs the
        # backend named (it knows no default without a GPU)
        use_gloo_collectives()
        return {"cpu": False, "backend": "gloo"}

    def __init__(self, accelerator):
        super().__init__(accelerator)
        keep_transformers_unsharded(accelerator)

    def configure(self, config) -> None:
        configure(self.accelerator, config)
        # DeepSpeed calls collectives torch has renamed, and torch says so at every call
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.distributed\.\w+` is deprecated")
