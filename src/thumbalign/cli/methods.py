"""`thumbalign methods`: the offline methods and the online objectives, one line each."""

from __future__ import annotations

import dataclasses

from ..trainers.config import OnlineConfig, TrainConfig


def add_parser(commands) -> None:
    parser = commands.add_parser("methods", help="list the training methods and the data each takes",
                                 description="List the training methods (--method) with one line each.")
    parser.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from ..methods.registry import methods, online_objectives

    print("thumbalign train --method:")
    for name, cls in methods().items():
        kind = data_kind(cls.needs)
        default = " (default)" if name == TrainConfig.method else ""
        print(f"  {name:<13} {kind:<36} {cls.summary}{default}")
        print_settings(cls)
    print("thumbalign online --objective (prompts, rewards on the model's own answers):")
    for name, cls in online_objectives().items():
        default = " (default)" if name == OnlineConfig.objective else ""
        print(f"  {name:<13} {cls.summary}{default}")
        print_settings(cls)
    return 0


def print_settings(method) -> None:
    """The method's own settings (its file declares them), as flags with their defaults."""
    if method.settings_class is not None:
        flags = [f"--{f.name.replace('_', '-')} {f.default}" for f in dataclasses.fields(method.settings_class)]
        print(f"  {'':<13} settings: {', '.join(flags)}")


def data_kind(needs) -> str:
    """What rows a method trains on, in a few words."""
    if needs.paired:
        return "paired (prompt, chosen, rejected)"
    kind = "unpaired 👍 only" if needs.train_labels == (True,) else "unpaired 👍/👎"
    if needs.grouped:
        kind += ", ≥2 answers per prompt"
    if needs.feedback_field:
        kind += f" (+ {needs.feedback_field})"
    return kind
