"""Checkpoints that survive a crash: everything is written into a hidden folder beside the final one, flushed to
disk, then renamed into place in one step. A kill at any moment leaves either the old set of checkpoints or the old
set plus one complete new one, never a half-written folder under a real name.

No pickle anywhere: tensors go to safetensors, everything else to JSON.

A sharded run (FSDP, or DeepSpeed ZeRO-3) writes its weights and optimizer moments with
`torch.distributed.checkpoint`: every process its own shard, as safetensors files whose headers record where each
piece lies (PyTorch's HuggingFace storage format), so any number of processes — or one unsharded process — can read
them back, each taking the pieces it needs.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ThumbalignError
from ..files import content_digest, give_usual_modes, os_errors_of_safetensors

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
SHARDED_DIR = "sharded"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with os_errors_of_safetensors(path):  # a full disk: an OSError, which the save reports in one line
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights that training changes (all of them, or the adapter's); shared (tied) tensors appear once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- optimizer state <-> safetensors+JSON

def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, values in state["state"].items():
        plain["state"][str(pid)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{pid}/{key}"] = value
            else:
                plain["state"][str(pid)][key] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {int(pid): dict(values) for pid, values in plain["state"].items()}
    for name, tensor in tensors.items():
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = tensor
    return {"state": state, "param_groups": plain["param_groups"]}


# --------------------------------------------------------------------------- random number generators

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    plain = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


# --------------------------------------------------------------------------- save / find / load

def save_checkpoint(checkpoints_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict,
                    keep: int, gathered: tuple[dict, dict] | None = None) -> Path:
    """An unsharded checkpoint, written by one process. `gathered`: the weights and the optimizer state, already put
    together from the processes' pieces (ZeRO-1/2), instead of the model's and the optimizer's own."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    staging = checkpoints_dir / f".staging-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_checkpoint(staging, model, optimizer, scheduler, trainer_state, gathered)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed save (disk full) leaves nothing half-written behind
        raise
    return _publish(checkpoints_dir, staging, step, keep)


def _publish(checkpoints_dir: Path, staging: Path, step: int, keep: int) -> Path:
    """The complete staging folder renamed into place in one step, and the oldest checkpoints beyond `keep` gone."""
    final = checkpoints_dir / f"step-{step:06d}"
    if final.exists():  # the same step saved again (a resumed run): move the old one out of the way first, so a
        retired = checkpoints_dir / f".staging-retired-{step:06d}-{os.getpid()}"  # kill never leaves a half folder
        os.replace(final, retired)
        shutil.rmtree(retired)
    give_usual_modes(staging)
    os.replace(staging, final)
    _fsync_dir(checkpoints_dir)
    for old in list_checkpoints(checkpoints_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _test_pause() -> None:
    if os.environ.get("THUMBALIGN_TEST_CHECKPOINT_PAUSE"):
        # fault injection for the kill tests: widen the window in which a kill lands inside a save
        time.sleep(float(os.environ["THUMBALIGN_TEST_CHECKPOINT_PAUSE"]))


def _write_checkpoint(staging: Path, model, optimizer, scheduler, trainer_state: dict,
                      gathered: tuple[dict, dict] | None = None) -> None:
    weights, optim = gathered or (trainable_state(model), optimizer.state_dict())
    _save_tensors(staging / "weights.safetensors", weights)
    _test_pause()
    opt_tensors, opt_plain = _split_optimizer(optim)
    _save_tensors(staging / "optimizer.safetensors", opt_tensors)
    _write_json(staging / "optimizer.json", opt_plain)
    _write_rest(staging, scheduler, trainer_state)


def _write_rest(staging: Path, scheduler, trainer_state: dict) -> None:
    _write_json(staging / "scheduler.json", scheduler.state_dict())
    rng_tensors, rng_plain = rng_state()
    _save_tensors(staging / "rng.safetensors", rng_tensors)
    _write_json(staging / "rng.json", rng_plain)
    # last: its presence marks a complete checkpoint, and its digests of every other file an intact one
    _write_json(staging / STATE_FILE, {**trainer_state, FILES_KEY: _digests(staging)})
    _fsync_dir(staging)


# --------------------------------------------------------------------------- damage

FILES_KEY = "files"


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the shards of every process included), by path relative to it."""
    return {str(p.relative_to(folder)): content_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STATE_FILE}


def damage(path: Path) -> str | None:
    """Why the checkpoint `path` cannot be resumed from (a file missing, truncated or changed since it was written,
    its state unreadable), or None when it is intact. A checkpoint from before digests were kept is checked for
    readable JSON and safetensors headers only."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} unreadable ({type(err).__name__})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE_FILE} holds no step"
    digests = state.get(FILES_KEY)
    if not isinstance(digests, dict):
        return _legacy_damage(path)
    for name, digest in digests.items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        try:
            if content_digest(file) != digest:
                return f"{name} differs from what was written (truncated or corrupted)"
        except ThumbalignError as err:
            return str(err)
    return None


def _legacy_damage(path: Path) -> str | None:
    for file in sorted(path.rglob("*")):
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
        except (OSError, ValueError, SafetensorError) as err:
            return f"{file.relative_to(path)} unreadable ({type(err).__name__})"
    return None


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for path in checkpoints_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / STATE_FILE).exists():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def remove_stale_staging(checkpoints_dir: Path) -> None:
    """Folders left by a save that was killed half-way; they were never valid checkpoints."""
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.glob(".staging-*"):
            shutil.rmtree(path, ignore_errors=True)


def is_sharded(path: Path) -> bool:
    """The checkpoint holds its weights as shards written by every process (`torch.distributed.checkpoint`)."""
    return (path / SHARDED_DIR).is_dir()


def _read_unsharded(path: Path, model) -> tuple[dict[str, torch.Tensor], dict]:
    """An unsharded checkpoint's weights (checked against `model`'s trainable ones) and optimizer state."""
    weights = load_file(str(path / "weights.safetensors"))
    params = trainable_state(model)
    if set(weights) != set(params):
        raise ValueError(f"{path}: checkpoint weights do not match the model being trained "
                         f"({len(weights)} tensors saved, {len(params)} trainable)")
    optim = _join_optimizer(load_file(str(path / "optimizer.safetensors")),
                            json.loads((path / "optimizer.json").read_text()))
    return weights, optim


def load_unsharded(path: Path, model, optimizer) -> None:
    weights, optim = _read_unsharded(path, model)
    params = trainable_state(model)
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict(optim)


def load_rest(path: Path, scheduler) -> dict:
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    set_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return json.loads((path / STATE_FILE).read_text())


# --------------------------------------------------------------------------- sharded (FSDP) checkpoints

def save_sharded_checkpoint(checkpoints_dir: Path, step: int, views, scheduler, trainer_state: dict, keep: int,
                            is_main: bool, barrier) -> None:
    """Called by every process: each writes its shards into the staging folder; then the main process adds the small
    JSON files (the trainer state last) and renames the folder into place. Nothing is gathered onto one process.
    `views()`: this process's shards named model/<name> and optim/<name>/<moment>, and the optimizer's plain
    settings ({"param_groups": [...], "state": {name: {non-tensor entries}}}), once every process is ready."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    staging = checkpoints_dir / f".staging-step-{step:06d}-sharded"  # one name every process agrees on
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier()
    flat, plain = views()
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(str(staging / SHARDED_DIR), save_distributed=True))
    if not is_main:
        return
    try:
        _test_pause()
        _write_json(staging / "optimizer.json", plain)
        _write_rest(staging, scheduler, trainer_state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(checkpoints_dir, staging, step, keep)


def read_shards(path: Path, flat: dict[str, torch.Tensor]) -> dict:
    """Every process reads the pieces of its own shards into `flat` (named as written; DCP reshards when the number
    of processes changed); returns the optimizer's plain settings."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(path / SHARDED_DIR))
    check_saved(path, flat, reader.read_metadata().state_dict_metadata)
    dcp.load(flat, storage_reader=reader)
    return json.loads((path / "optimizer.json").read_text())


def check_saved(path: Path, flat: dict[str, torch.Tensor], saved: dict) -> None:
    """The checkpoint holds the same tensors, of the same shapes, as the run resuming from it."""
    missing, extra = sorted(set(flat) - set(saved)), sorted(set(saved) - set(flat))
    if missing or extra:
        raise ValueError(f"{path} holds other weights than the model being trained (not in the checkpoint: "
                         f"{missing[:2]}; not in the model: {extra[:2]}); resume with the model and --use-lora "
                         "settings it was written with")
    shapes = [(name, tuple(saved[name].size), tuple(t.shape)) for name, t in flat.items()
              if hasattr(saved[name], "size") and tuple(saved[name].size) != tuple(t.shape)]
    if shapes:
        name, was, now = shapes[0]
        raise ValueError(f"{path}: {name} was saved with shape {was}, the model being trained has {now}")


def read_whole(path: Path, model) -> tuple[dict[str, torch.Tensor], dict]:
    """Every trainable weight and optimizer entry of a checkpoint, whole and shaped like the model's parameters, the
    optimizer's entries named by parameter: what a run holding its weights differently from the writer's resumes
    from."""
    if not is_sharded(path):
        weights, numbered = _read_unsharded(path, model)
        names = list(trainable_state(model))
        return weights, {"state": {names[pid]: values for pid, values in numbered["state"].items()},
                         "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                          for group in numbered["param_groups"]]}
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(path / SHARDED_DIR))
    saved_meta = reader.read_metadata().state_dict_metadata
    params = trainable_state(model)
    expected = {f"model/{name}" for name in params}
    missing, extra = sorted(expected - set(saved_meta)), sorted(n for n in saved_meta if n.startswith("model/")
                                                                 and n not in expected)
    if missing or extra:
        raise ValueError(f"{path} holds other weights than the model being trained (not in the checkpoint: "
                         f"{missing[:2]}; not in the model: {extra[:2]}); resume with the model and --use-lora "
                         "settings it was written with")
    whole = {name: torch.empty(tuple(meta.size), dtype=meta.properties.dtype) for name, meta in saved_meta.items()}
    dcp.load(whole, storage_reader=reader)
    plain = json.loads((path / "optimizer.json").read_text())
    weights, optim = {}, {"state": {}, "param_groups": plain["param_groups"]}
    for key, tensor in whole.items():
        kind, rest = key.split("/", 1)
        if kind == "model":
            weights[rest] = _shaped(tensor, params[rest], key, path)
        else:
            name, entry = rest.rsplit("/", 1)
            moment = entry != "step" and tensor.numel() == params[name].numel()
            value = _shaped(tensor, params[name], key, path) if moment else tensor
            optim["state"].setdefault(name, {})[entry] = value
    for name, values in plain.get("state", {}).items():
        optim["state"].setdefault(name, {}).update(values)
    return weights, optim


def _shaped(tensor: torch.Tensor, param: torch.Tensor, key: str, path: Path) -> torch.Tensor:
    """A saved tensor in its parameter's shape (ZeRO-3 checkpoints hold parameters flattened)."""
    shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
    if tensor.numel() != shape.numel():
        raise ValueError(f"{path}: {key} was saved with shape {tuple(tensor.shape)}, the model being trained has "
                         f"{tuple(shape)}")
    return tensor.reshape(shape)


def put_whole_into_plain(model, optimizer, weights: dict[str, torch.Tensor], optim: dict) -> None:
    """Whole tensors into a run that holds whole weights; the optimizer numbers its entries by parameter."""
    params = trainable_state(model)
    number = {name: i for i, name in enumerate(params)}
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    optimizer.load_state_dict({"state": {number[name]: values for name, values in optim["state"].items()},
                               "param_groups": [{**group, "params": [number[n] for n in group["params"]]}
                                                for group in optim["param_groups"]]})


def set_group_settings(optimizer, groups: list[dict]) -> None:
    """Learning rate, betas, weight decay… of each parameter group (not which parameters it holds)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner = getattr(inner, "optimizer", inner)  # accelerate's wrapper, then DeepSpeed's
    for group, saved in zip(inner.param_groups, groups):
        group.update({k: v for k, v in saved.items() if k != "params"})
