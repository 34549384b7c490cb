"""Checkpoints that survive a crash: everything is written into a hidden folder beside the final one, flushed to
disk, then renamed into place in one step. A kill at any moment leaves either the old set of checkpoints or the old
set plus one complete new one, never a half-written folder under a real name.

No pickle anywhere: tensors go to safetensors, everything else to JSON.
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
from safetensors.torch import load_file, save_file

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


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
                    keep: int) -> Path:
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoints_dir / f"step-{step:06d}"
    staging = checkpoints_dir / f".staging-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_checkpoint(staging, model, optimizer, scheduler, trainer_state)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed save (disk full) leaves nothing half-written behind
        raise
    if final.exists():  # the same step saved again (a resumed run): move the old one out of the way first, so a
        retired = checkpoints_dir / f".staging-retired-{step:06d}-{os.getpid()}"  # kill never leaves a half folder
        os.replace(final, retired)
        shutil.rmtree(retired)
    os.replace(staging, final)
    _fsync_dir(checkpoints_dir)
    for old in list_checkpoints(checkpoints_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(staging: Path, model, optimizer, scheduler, trainer_state: dict) -> None:
    _save_tensors(staging / "weights.safetensors", trainable_state(model))
    if os.environ.get("THUMBALIGN_TEST_CHECKPOINT_PAUSE"):
        # fault injection for the kill tests: widen the window in which a kill lands inside a save
        time.sleep(float(os.environ["THUMBALIGN_TEST_CHECKPOINT_PAUSE"]))
    opt_tensors, opt_plain = _split_optimizer(optimizer.state_dict())
    _save_tensors(staging / "optimizer.safetensors", opt_tensors)
    _write_json(staging / "optimizer.json", opt_plain)
    _write_json(staging / "scheduler.json", scheduler.state_dict())
    rng_tensors, rng_plain = rng_state()
    _save_tensors(staging / "rng.safetensors", rng_tensors)
    _write_json(staging / "rng.json", rng_plain)
    _write_json(staging / STATE_FILE, trainer_state)  # last: its presence marks a complete checkpoint
    _fsync_dir(staging)


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


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    weights = load_file(str(path / "weights.safetensors"))
    params = trainable_state(model)
    if set(weights) != set(params):
        raise ValueError(f"{path}: checkpoint weights do not match the model being trained "
                         f"({len(weights)} tensors saved, {len(params)} trainable)")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    opt_plain = json.loads((path / "optimizer.json").read_text())
    optimizer.load_state_dict(_join_optimizer(load_file(str(path / "optimizer.safetensors")), opt_plain))
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    set_rng_state(load_file(str(path / "rng.safetensors")), json.loads((path / "rng.json").read_text()))
    return json.loads((path / STATE_FILE).read_text())
