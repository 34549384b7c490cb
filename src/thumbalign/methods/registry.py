"""The methods, found by themselves: every module of this folder that defines an :class:`Objective` with a name is
a method. Adding one means adding its file (and its test); nothing here changes."""

from __future__ import annotations

import functools
import importlib
import pkgutil

from ..errors import ConfigError
from .base import Objective

NOT_METHOD_MODULES = {"base", "registry", "udm"}


@functools.cache
def methods() -> dict[str, type[Objective]]:
    """name -> objective class; unpaired methods first, then paired, each alphabetical."""
    found = {}
    for info in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        if info.name in NOT_METHOD_MODULES:
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Objective) and value.name
                    and value.__module__ == module.__name__):
                found[value.name] = value
    return dict(sorted(found.items(), key=lambda item: (item[1].needs.paired, item[0])))


def get_method(name: str) -> type[Objective]:
    table = methods()
    if name not in table:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(table)} (`thumbalign methods`)")
    return table[name]
