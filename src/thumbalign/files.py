"""File-system operations that fail in one line: every OSError (a missing folder, no permission, a full disk, a
read-only file system) becomes a :class:`FileSystemError` naming the operation and the path, and a file written here
appears complete under its name or not at all (written aside, then renamed; the partial file is removed)."""

from __future__ import annotations

import errno
import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import ThumbalignError


class FileSystemError(ThumbalignError):
    """A file-system operation failed; the message names it and its path."""


def reason(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, "")
    return f"{err.strerror or err}" + (f" ({name})" if name else "")


@contextmanager
def file_operation(what: str, path) -> Iterator[None]:
    """Any OSError inside becomes one line: "cannot <what> <path>: <reason>"."""
    try:
        yield
    except OSError as err:
        raise FileSystemError(f"cannot {what} {path}: {reason(err)}") from None


def write_atomically(path: Path, write: Callable[[Path], None], what: str) -> Path:
    """`write(tmp)` fills a file beside `path`; it is renamed into place only once complete, and removed if the
    writing fails. The parent folder is created when missing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with file_operation(f"write {what}", path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


def write_text_atomically(path: Path, text: str, what: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def content_digest(path) -> str:
    """sha256 of a file's bytes, or of a folder's files (names and bytes, in name order); streamed."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    with file_operation("read", path):
        for file in files:
            digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
            with open(file, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()
