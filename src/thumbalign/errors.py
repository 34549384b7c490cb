"""Errors a user can act on. The CLI prints them as one line, without a traceback."""

from __future__ import annotations


class ThumbalignError(Exception):
    """Base class: a problem with the user's input or settings, not a bug."""


class DataError(ThumbalignError):
    """A record that cannot be used, located by file, line (or row) and field."""

    def __init__(self, path, where: str | None, field: str | None, message: str):
        self.path, self.where, self.field, self.message = str(path), where, field, message
        location = self.path + (f", {where}" if where else "")
        what = f"field '{field}': " if field else ""
        super().__init__(f"{location}: {what}{message}")


class ConfigError(ThumbalignError):
    """A setting that is missing, unknown or out of range."""
