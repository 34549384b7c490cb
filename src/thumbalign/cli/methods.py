"""`thumbalign methods`: the offline methods and the online objectives, one line each."""

from __future__ import annotations

from ..trainers.config import OnlineConfig, TrainConfig


def add_parser(commands) -> None:
    parser = commands.add_parser("methods", help="list the training methods and the data each takes",
                                 description="List the training methods (--method) with one line each.")
    parser.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from ..methods.registry import methods, online_objectives

    print("thumbalign train --method:")
    for name, cls in methods().items():
        kind = "paired (prompt, chosen, rejected)" if cls.needs.paired else "unpaired 👍/👎"
        default = " (default)" if name == TrainConfig.method else ""
        print(f"  {name:<13} {kind:<36} {cls.summary}{default}")
    print("thumbalign online --objective (prompts, rewards on the model's own answers):")
    for name, cls in online_objectives().items():
        default = " (default)" if name == OnlineConfig.objective else ""
        print(f"  {name:<13} {cls.summary}{default}")
    return 0
