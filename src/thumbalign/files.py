"""File-system operations that fail in one line: every OSError (a missing folder, no permission, a full disk, a
read-only file system) becomes a :class:`FileSystemError` naming the operation and the path, and a file written here
appears complete under its name or not at all (written aside, then renamed; the partial file is removed)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError, ThumbalignError


class FileSystemError(ThumbalignError):
    """A file-system operation failed; the message names it and its path."""


def reason(err: OSError) -> str:
    name = errno.errorcode.get(err.errno or 0, "")
    return f"{err.strerror or err}" + (f" ({name})" if name else "")


# safetensors' Rust writer reports a failed write (a full disk) as SafetensorError("... (os error 28)")
SAFETENSORS_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def as_os_error(err: BaseException, path=None) -> OSError | None:
    """The OSError that `err` is or stands for (safetensors' report of one), else None."""
    if isinstance(err, OSError):
        return err
    found = SAFETENSORS_OS_ERROR.search(str(err)) if type(err).__name__ == "SafetensorError" else None
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), None if path is None else str(path))


@contextmanager
def os_errors_of_safetensors(path) -> Iterator[None]:
    """A safetensors write that fails for the file system raises the OSError it stands for (about `path`)."""
    try:
        yield
    except Exception as err:
        found = as_os_error(err, path)
        if found is None or found is err:
            raise
        raise found from None


@contextmanager
def file_operation(what: str, path) -> Iterator[None]:
    """Any OSError inside (safetensors' reports of one too) becomes one line: "cannot <what> <path>: <reason>"."""
    try:
        yield
    except Exception as err:
        found = as_os_error(err)
        if found is None:
            raise
        raise FileSystemError(f"cannot {what} {path}: {reason(found)}") from None


# Model weights are read from safetensors only: a pickle (pytorch_model.bin, *.pt) is a program that torch.load runs
# in a restricted interpreter, and a flaw there is a way in. Whoever trusts a folder's pickles may opt in.
ALLOW_PICKLE = "THUMBALIGN_ALLOW_PICKLE"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def pickles_allowed() -> bool:
    return os.environ.get(ALLOW_PICKLE) == "1"


def safetensors_only() -> dict:
    """The from_pretrained arguments that keep a loader to safetensors (none when pickles are allowed)."""
    return {} if pickles_allowed() else {"use_safetensors": True}


def refuse_pickled_weights(folder: Path) -> None:
    """A model folder whose weights are pickles only is one line saying how to convert it (or how to opt in)."""
    folder = Path(folder)
    if pickles_allowed() or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        raise ConfigError(f"{folder}: its weights are a pickle ({pickles[0]}), which thumbalign does not load "
                          "(unpickling can run code); convert the folder once in Python: from_pretrained(FOLDER)"
                          ".save_pretrained(FOLDER, safe_serialization=True), with the model's transformers class; "
                          f"or, if you trust the file, set {ALLOW_PICKLE}=1")


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only read by setting)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_usual_modes(path: Path) -> None:
    """The file, or every file and folder under `path`, gets the mode open() and mkdir() would have given it
    (0o666 / 0o777 less the umask): safetensors writes through a private temporary file (0600) and mkdtemp makes
    0700 folders, so that a run's weights would otherwise be the only files others in the group cannot read."""
    path = Path(path)
    mask = umask()
    if path.is_file():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, folders, files in os.walk(path):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def write_atomically(path: Path, write: Callable[[Path], None], what: str) -> Path:
    """`write(tmp)` fills a file beside `path`; it is renamed into place only once complete, and removed if the
    writing fails. The parent folder is created when missing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with file_operation(f"write {what}", path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
            give_usual_modes(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


def write_text_atomically(path: Path, text: str, what: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what)


def write_cached_tensor(path: Path, tensor, what: str) -> None:
    """A cache entry: one tensor in a safetensors file whose metadata holds the sha256 of its bytes, so that a
    damaged entry is recognised (and computed again) rather than read as numbers."""
    from safetensors.torch import save_file

    tensor = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(tensor.numpy().tobytes()).hexdigest()
    write_atomically(path, lambda tmp: save_file({"values": tensor}, str(tmp), metadata={"sha256": digest}), what)


def read_cached_tensor(path: Path, rows: int):
    """(the cached tensor, None); (None, None) when there is no entry; (None, what is wrong) when the entry is
    damaged: unreadable, its bytes not those written, or not `rows` rows long."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as handle:
            digest = (handle.metadata() or {}).get("sha256")
            tensor = handle.get_tensor("values")
    except (OSError, SafetensorError) as err:
        return None, f"unreadable: {err}"
    if digest != hashlib.sha256(tensor.numpy().tobytes()).hexdigest():
        return None, "its bytes differ from those written"
    if tensor.shape[0] != rows:
        return None, f"{tensor.shape[0]} rows for {rows} examples"
    return tensor, None


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


# a settings file is small; these bounds keep a hostile one (a FIFO, a binary, an alias bomb, 50 000 levels of
# nesting) to one line instead of a hang, a MemoryError or a RecursionError
MAX_SETTINGS_BYTES = 10 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


def read_settings_text(path, what: str) -> str:
    """The text of a small settings file: a regular file (never opened otherwise: a FIFO would block), at most
    MAX_SETTINGS_BYTES, UTF-8 (with or without a byte-order mark)."""
    import stat


    file = Path(path)
    with file_operation(f"read {what}", file):
        info = os.stat(file)
        mode = info.st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a pipe, socket or device)"
            raise ConfigError(f"{path}: {what} is {kind}; give a YAML file")
        if info.st_size > MAX_SETTINGS_BYTES:
            raise ConfigError(f"{path}: {what} is larger than {MAX_SETTINGS_BYTES >> 20} MiB; not a settings file")
        data = file.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: {what} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_settings_yaml(path, what: str):
    """A YAML settings file, parsed safely and within bounds: nesting at most MAX_YAML_DEPTH levels, and at most
    MAX_YAML_NODES values once every alias is expanded (YAML's aliases share nodes: a few hundred bytes of them can
    stand for billions of values, which whatever walks the result then builds)."""
    import yaml


    loader = yaml.SafeLoader(read_settings_text(path, what))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, 0, path, what)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{path}: {what} is nested deeper than YAML can read") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {what} is not valid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict, depth: int, path, what: str) -> int:
    """How many values `node` stands for with its aliases expanded (an alias is the same node object again)."""
    import yaml


    if depth > MAX_YAML_DEPTH:
        raise ConfigError(f"{path}: {what} is nested deeper than {MAX_YAML_DEPTH} levels")
    key = id(node)
    if key in sizes:
        if sizes[key] is None:
            raise ConfigError(f"{path}: {what} holds an alias that refers to itself")
        return sizes[key]
    sizes[key] = None  # in progress
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [item for pair in node.value for item in pair]
    else:
        children = []
    size = 1 + sum(_expanded_size(child, sizes, depth + 1, path, what) for child in children)
    if size > MAX_YAML_NODES:
        raise ConfigError(f"{path}: {what} expands to more than {MAX_YAML_NODES} values through its aliases; a "
                          "settings file needs a few dozen")
    sizes[key] = size
    return size
