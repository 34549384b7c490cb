"""A method's own settings: a dataclass in the method's file, next to its loss, validated there.

    @dataclass
    class KTOSettings(MethodSettings):
        title = "KTO"
        desirable_weight: float = setting(1.0, "KTO: weight of thumbs-up losses (w_D).")

        def validate(self) -> None:
            ...

    class KTO(Objective):
        settings_class = KTOSettings

Each field is a setting of `thumbalign train` (offline methods) or `thumbalign online` (online objectives), under
its own name: a flag (`--desirable-weight`), a YAML key (`desirable_weight:`), a line of `thumbalign config` and of
`thumbalign methods`, grouped by method — all built from the registry, so a method with a setting is one file. The
run's settings stay one flat mapping (run_config.yaml, summary.json), and the method reads its typed part with
`Settings.from_config(config)`.

No torch here: the command line reads these at every `--help`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from ..errors import ConfigError


def setting(default, help: str, **metadata):
    """A field of a settings dataclass: its default and its help line (`choices=(...)` limits the values,
    `resumable=True` lets the value change on --resume)."""
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class MethodSettings:
    """Base of every method's settings; a subclass adds fields (with :func:`setting`) and may override `validate`."""

    title: ClassVar[str] = ""  # how the help and the errors name the method family (e.g. "BCO")

    def validate(self) -> None:
        """Refuse values the method cannot train with, in one line (ConfigError)."""

    @classmethod
    def from_config(cls, config) -> "MethodSettings":
        """This method's settings out of a run's flat settings (a setting the run does not have takes its default:
        a method added after the settings class of the command was made)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})


def require(condition: bool, message: str) -> None:
    """One line naming the setting when `condition` does not hold."""
    if not condition:
        raise ConfigError(message)
