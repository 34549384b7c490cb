"""`thumbalign config`: a commented starter YAML file holding every setting of a command, with its default."""

from __future__ import annotations

import dataclasses

import yaml

from ..trainers.config import OnlineConfig, RewardConfig, TrainConfig
from .options import method_heading

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
    """Every shared setting, then each method's own under its heading (only the chosen method's, when one is
    given)."""
    lines = [f"# thumbalign {next(k for k, v in CONFIGS.items() if v is cls)} settings: every flag, with underscores "
             "(flags given on the command line override this file)"]
    chosen = overrides.get("method") or overrides.get("objective")
    heading = None
    for f in dataclasses.fields(cls):
        if f.metadata.get("settings") is not None:
            if chosen and chosen not in f.metadata["methods"]:
                continue
            if method_heading(f) != heading:
                heading = method_heading(f)
                lines.append(f"\n# --- {heading}")
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
