"""How a run holds its weights over its processes: one backend per kind, each one file of this package, behind the
interface of :class:`~.base.Backend` that the engine calls. The kind is read from the launch (accelerate's
environment); a new kind is a new file here with a `Backend` subclass, found by itself.

| file | kind |
| --- | --- |
| replicated.py | whole weights in every process: one process, or DDP (the default) |
| zero12.py | DeepSpeed ZeRO-1/2: whole weights, optimizer (and gradients) split |
| zero3.py | DeepSpeed ZeRO-3: weights split, DeepSpeed gathers each layer |
| fsdp.py | FSDP2 (`fully_shard`): weights split, a transformer block per unit |

zero.py holds what both ZeRO backends share (DeepSpeed's configuration, its shards as checkpoint pieces); base.py the
interface and what the sharded backends share.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from ...errors import ConfigError
from .base import Backend
from .replicated import Replicated


@functools.cache
def _kinds() -> tuple[type[Backend], ...]:
    """Every backend class defined in this package (the fallback, Replicated, aside)."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found += [value for value in vars(module).values()
                  if isinstance(value, type) and issubclass(value, Backend) and value.__module__ == module.__name__
                  and value.chosen.__func__ is not Backend.chosen.__func__]
    return tuple(found)


def accelerator_options(has_accelerator: bool) -> dict:
    """What the launched backend needs of the accelerator, asked before it is made: {"cpu": ..., "backend": ...}."""
    options: dict = {}
    # one call per distinct method: the ZeRO-1/2 and ZeRO-3 backends share theirs
    asked = {kind.accelerator_options.__func__: kind for kind in _kinds() if kind.launched()}
    for kind in asked.values():
        options.update(kind.accelerator_options(has_accelerator))
    return options


def select(accelerator) -> Backend:
    """The backend of the launch `accelerator` was made for."""
    chosen = [kind for kind in _kinds() if kind.chosen(accelerator)]
    return (chosen[0] if chosen else Replicated)(accelerator)


def check_accelerate_settings(settings: dict, where: str) -> None:
    """An accelerate config's `distributed_type` names a kind that runs here, and its settings are ones that kind
    supports (a ConfigError naming the setting otherwise), before any process is launched."""
    kind = str(settings.get("distributed_type", "NO")).upper()
    plain = ("NO", "MULTI_GPU", "MULTI_CPU")  # whole weights: one process, or DDP
    backend = next((k for k in _kinds() if kind in k.accelerate_types), None)
    if backend is None and kind not in plain:
        raise ConfigError(f"{where}: distributed_type {kind} is not supported; use ddp, zero2, zero3 or fsdp")
    if backend is not None:
        backend.check_accelerate_settings(settings, where)


__all__ = ["Backend", "accelerator_options", "check_accelerate_settings", "select"]
