"""torch for the method files, imported when a loss first runs rather than when a file is read.

The command line builds its flags, `--help` and `thumbalign config` from every method's settings, which live in the
method files (see settings.py), so reading those files must not load torch (2–3 s at every `--help`). Inside a
function `torch.sigmoid(...)` and `F.logsigmoid(...)` behave exactly as with `import torch`; the first use imports
the library."""

from __future__ import annotations

import importlib


class Deferred:
    """A module imported at the first attribute read."""

    def __init__(self, name: str):
        self.module_name = name

    def __getattr__(self, attribute: str):
        return getattr(importlib.import_module(self.module_name), attribute)

    def __repr__(self) -> str:
        return f"<{self.module_name}, imported when first used>"


torch = Deferred("torch")
F = Deferred("torch.nn.functional")
