"""Settings dataclasses as command-line flags and YAML keys: one flag per field (``--learning-rate``, also spelt
``--learning_rate``), the same key in a ``--config`` file (``learning_rate:``); defaults, then the file, then the flags
given. TRL's names for the same settings are accepted too (``model_name_or_path``, ``dataset_name``, ``use_peft``,
``resume_from_checkpoint``, ...), and TRL settings that a thumbalign run has no use for are named once and ignored, so
that a `trl kto` YAML file runs here with its method line changed."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path

from ..errors import ConfigError
from ..files import load_settings_yaml

# TRL / transformers.TrainingArguments names -> thumbalign's, where they mean the same setting
TRL_ALIASES = {"model_name_or_path": "model", "dataset_name": "data", "use_peft": "use_lora",
               "resume_from_checkpoint": "resume", "per_device_eval_batch_size": "eval_batch_size",
               "model_revision": "revision", "dataset_config": "data_config", "dataset_train_split": "data_split",
               "dataset_test_split": "eval_data_split", "hub_private_repo": "hub_private"}
# TRL settings that have no meaning for a thumbalign run, and why
TRL_IGNORED = {
    "eval_strategy": "held-out data is evaluated before and after training",
    "eval_steps": "held-out data is evaluated before and after training",
    "do_eval": "--eval-data / --eval-split decide", "do_train": "training always runs",
    "logging_first_step": "--logging-steps decides", "logging_strategy": "--logging-steps decides",
    "save_strategy": "checkpoints every --save-steps", "logging_dir": "logs go to the run folder",
    "run_name": "the run is named by --output-dir", "torch_dtype": "weights train in float32 (--bf16 autocasts)",
    "dtype": "weights train in float32 (--bf16 autocasts)", "attn_implementation": "the model's default",
    "max_prompt_length": "--max-length cuts the prompt from the left",
    "max_completion_length": "--max-length keeps the completion whole", "dataset_num_proc": "data is tokenised once",
    "gradient_checkpointing_kwargs": "non-reentrant checkpointing", "optim": "AdamW",
    "tf32": "the hardware decides", "bf16_full_eval": "evaluation follows --bf16",
    "ddp_find_unused_parameters": "every trained parameter is used",
    "remove_unused_columns": "columns are read by name",
}


def finite_float(text: str) -> float:
    """An argparse type: a number, refusing nan and ±inf (which float() accepts and would run on as nonsense)."""
    import math

    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def seed_number(text: str) -> int:
    """An argparse type: a seed numpy and torch accept, 0 to 2**32 - 1."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text} is not a seed from 0 to 2**32 - 1")
    return value


def flag_names(name: str, cls) -> list[str]:
    """The flags of a setting: --name-with-dashes, --name_with_underscores, and TRL's names for it."""
    spellings = [name] + [alias for alias, target in TRL_ALIASES.items() if target == name]
    flags = []
    for spelling in spellings:
        for flag in ("--" + spelling.replace("_", "-"), "--" + spelling):
            if flag not in flags:
                flags.append(flag)
    return flags


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
    groups: dict = {}  # a method's own settings under a heading of their own
    for f in dataclasses.fields(cls):
        target = parser
        if f.metadata.get("settings") is not None:
            owner = f.metadata["settings"]
            if owner not in groups:
                groups[owner] = parser.add_argument_group(method_heading(f))
            target = groups[owner]
        flags = flag_names(f.name, cls)
        help_ = (f.metadata["help"] + f" (default: {f.default})").replace("%", "%%")  # argparse formats help with %
        if f.name == "eval_split":  # `--split` as in the issue tracker's wording, same setting
            target.add_argument(*flags, "--split", type=finite_float, default=None, help=help_, dest="eval_split",
                                metavar="SHARE")
        elif f.name == "resume":
            target.add_argument(*flags, nargs="?", const="latest", default=None, help=help_, dest=f.name)
        elif types_[f.name] is bool:
            target.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_, dest=f.name)
        elif _list_element(types_[f.name]) is not None:  # --reward a b, or --reward a --reward b
            target.add_argument(*flags, action="extend", nargs="+", type=_list_element(types_[f.name]), default=None,
                                help=help_ + " Several values: list them, or repeat the flag.",
                                metavar=f.name.upper(), dest=f.name)
        else:
            target.add_argument(*flags, type=types_[f.name], default=None, choices=f.metadata.get("choices"),
                                help=help_, metavar=f.name.upper() if not f.metadata.get("choices") else None,
                                dest=f.name)


def method_heading(f: dataclasses.Field) -> str:
    """The heading of a method's own settings: the family's name and the methods that take them."""
    return f"{f.metadata['settings'].title} settings ({f.metadata['method_flag']} {', '.join(f.metadata['methods'])})"


def load_yaml(path: str, cls) -> dict:
    if not Path(path).exists():
        raise ConfigError(f"{path}: no such config file")
    data = load_settings_yaml(path, "the config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    types_ = field_types(cls)
    out, ignored = {}, []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = TRL_ALIASES.get(name, name) if TRL_ALIASES.get(name) in names else name
        if name not in names and name in TRL_IGNORED:
            ignored.append(f"{key} ({TRL_IGNORED[name]})")
            continue
        if name not in names:
            raise ConfigError(f"{path}: unknown setting {key!r}")
        if name in out:
            raise ConfigError(f"{path}: setting {key!r} given twice (under two of its names)")
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
    if ignored:
        print(f"{path}: TRL settings with no meaning here, ignored: {'; '.join(ignored)}", file=sys.stderr)
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
    config.read_from = args.config if getattr(args, "config", None) else None  # an input too (not a setting)
    for f in dataclasses.fields(cls):
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise ConfigError(f"{f.name}: {getattr(config, f.name)!r} is not one of {list(choices)}")
    config.validate()
    return config


