"""The methods, found by themselves: every module of this folder that defines an :class:`Objective` (offline) or an
:class:`OnlineObjective` (online) with a name is a method. Adding one means adding its file (and its test); nothing
here changes."""

from __future__ import annotations

import functools
import importlib
import pkgutil

from ..errors import ConfigError
from .base import Objective
from .online_base import OnlineObjective
from .settings import MethodSettings

NOT_METHOD_MODULES = {"base", "online_base", "registry", "udm", "lazy", "settings"}


def _defined_here(kind: type) -> dict[str, type]:
    found = {}
    for info in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        if info.name in NOT_METHOD_MODULES:
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for value in vars(module).values():
            defined_here = isinstance(value, type) and value.__module__ == module.__name__
            if defined_here and issubclass(value, kind) and value.name:
                found[value.name] = value
    return found


@functools.cache
def methods() -> dict[str, type[Objective]]:
    """Offline methods (`thumbalign train`), name -> class; unpaired first, then paired, each alphabetical."""
    return dict(sorted(_defined_here(Objective).items(), key=lambda item: (item[1].needs.paired, item[0])))


@functools.cache
def online_objectives() -> dict[str, type[OnlineObjective]]:
    """Online objectives (`thumbalign online`), name -> class, alphabetical."""
    return dict(sorted(_defined_here(OnlineObjective).items()))


def settings_groups(table: dict[str, type]) -> list[tuple[type[MethodSettings], list[str]]]:
    """The settings classes of the methods of `table` (:func:`methods` or :func:`online_objectives`), each with the
    names of the methods that take it, in the table's order."""
    groups: dict[type[MethodSettings], list[str]] = {}
    for name, cls in table.items():
        if cls.settings_class is not None:
            groups.setdefault(cls.settings_class, []).append(name)
    return list(groups.items())


def get_online_objective(name: str) -> type[OnlineObjective]:
    table = online_objectives()
    if name not in table:
        raise ConfigError(f"unknown online objective {name!r}; choose one of {', '.join(table)}")
    return table[name]


def get_method(name: str) -> type[Objective]:
    table = methods()
    if name not in table:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(table)} (`thumbalign methods`)")
    return table[name]
