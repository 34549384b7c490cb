"""`thumbalign config`: a commented starter YAML file holding every setting of a command, with its default."""

from __future__ import annotations

import dataclasses

import yaml

from ..trainers.config import OnlineConfig, RewardConfig, TrainConfig

CONFIGS = {"train": TrainConfig, "online": OnlineConfig, "reward": RewardConfig}


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "config", help="print a commented starter YAML file for train, online or reward train",
        description="Print every setting of a command as YAML, each with its explanation and default, to start a "
                    "--config file from: thumbalign config --method kto > kto.yaml")
    parser.add_argument("--command", choices=tuple(CONFIGS), default="train", help="whose settings (default: train)")
    parser.add_argument("--method", help="fill in the method (train) or objective (online)")
    parser.set_defaults(run=run)


def starter_yaml(cls, overrides: dict) -> str:
    lines = [f"# thumbalign {next(k for k, v in CONFIGS.items() if v is cls)} settings: every flag, with underscores "
             "(flags given on the command line override this file)"]
    for f in dataclasses.fields(cls):
        value = overrides.get(f.name, f.default)
        lines.append(f"# {f.metadata['help']}")
        entry = yaml.safe_dump({f.name: value}, allow_unicode=True, default_flow_style=True, width=1000).strip()
        lines.append(entry.strip("{}") if entry.startswith("{") else entry)
    return "\n".join(lines) + "\n"


def run(args, argv: list[str]) -> int:
    cls = CONFIGS[args.command]
    overrides = {}
    if args.method:
        overrides["objective" if args.command == "online" else "method"] = args.method
    print(starter_yaml(cls, overrides), end="")
    return 0
