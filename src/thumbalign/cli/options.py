"""Settings dataclasses as command-line flags and YAML keys: one flag per field (``--learning-rate``), the same key
in a ``--config`` file (``learning_rate:``); defaults, then the file, then the flags given."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

import yaml

from ..errors import ConfigError


def _base_type(tp):
    if isinstance(tp, (typing._UnionGenericAlias, types.UnionType)):  # Optional[X]
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _list_element(tp):
    """The element type of a `list[X]` setting, else None."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: _base_type(hints[f.name]) for f in dataclasses.fields(cls)}


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field, named like transformers.TrainingArguments (dashes for underscores).
    Every default is None here so that we can tell which flags the user actually gave."""
    types_ = field_types(cls)
    parser.add_argument("--config", help="YAML file with the same keys as these flags; flags override it.")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = (f.metadata["help"] + f" (default: {f.default})").replace("%", "%%")  # argparse formats help with %
        if f.name == "eval_split":  # `--split` as in the issue tracker's wording, same setting
            parser.add_argument(flag, "--split", type=float, default=None, help=help_, dest="eval_split",
                                metavar="SHARE")
        elif f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", default=None, help=help_)
        elif types_[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif _list_element(types_[f.name]) is not None:  # --reward a b, or --reward a --reward b
            parser.add_argument(flag, action="extend", nargs="+", type=_list_element(types_[f.name]), default=None,
                                help=help_ + " Several values: list them, or repeat the flag.",
                                metavar=f.name.upper())
        else:
            parser.add_argument(flag, type=types_[f.name], default=None, choices=f.metadata.get("choices"),
                                help=help_, metavar=f.name.upper() if not f.metadata.get("choices") else None)


def load_yaml(path: str, cls) -> dict:
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    types_ = field_types(cls)
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        element = _list_element(types_[name])
        if name == "resume" and value is True:
            value = "latest"
        elif value is not None and element is not None:
            value = [_yaml_value(path, key, v, element) for v in (value if isinstance(value, list) else [value])]
        elif value is not None and types_[name] is float and isinstance(value, (int, str)):
            try:
                value = float(value)  # YAML reads 5e-6 as a string
            except ValueError:
                raise ConfigError(f"{path}: setting {key!r}: expected a number, got {value!r}") from None
        elif value is not None and types_[name] is str and isinstance(value, bool):
            value = "true" if value else "false"  # `bf16: true`
        elif value is not None and not isinstance(value, types_[name]):
            raise ConfigError(f"{path}: setting {key!r}: expected {types_[name].__name__}, got {value!r}")
        out[name] = value
    return out


def _yaml_value(path, key, value, tp):
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, tp):
        raise ConfigError(f"{path}: setting {key!r}: expected {tp.__name__} values, got {value!r}")
    return value


def build_config(args: argparse.Namespace, cls):
    """Defaults, then the YAML file, then the flags given on the command line."""
    values = load_yaml(args.config, cls) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(cls):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    config = cls(**values)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ConfigError(f"{f.name}: {getattr(config, f.name)!r} is not one of {list(choices)}")
    config.validate()
    return config


