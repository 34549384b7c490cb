"""The run folder: what a run writes, where, and how it survives a crash or a second run started on it.

    .lock                 held by the running process (an OS file lock: it dies with the process)
    checkpoints/step-N/   weights, optimizer, scheduler, RNG, trainer state (engine/checkpoint.py)
    metrics.jsonl         one line per logging step
    run_config.yaml       the resolved settings; --resume refuses to continue with different ones
    summary.json          data counts, settings, final metrics, evaluations
    model/                the final model folder, written aside and renamed into place
    .replaced/            with --overwrite, the earlier run moved aside: deleted once the new run has started
                          (written its run_config.yaml), moved back if it fails before that

Every write goes through thumbalign.files: a failure is one line naming the operation and the path, and nothing is
left half-written under a real name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..files import file_operation, give_usual_modes, write_text_atomically
from . import checkpoint as ckpt

RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "model", "run_config.yaml", "udm_classifier.json",
             "generations.jsonl", "report.html")
LOCK_FILE = ".lock"
REPLACED = ".replaced"


def changed_settings(config, saved: dict) -> list[str]:
    """Settings that differ from the interrupted run's, except those marked resumable (metadata) in the config."""
    return [f.name for f in dataclasses.fields(config)
            if not f.metadata.get("resumable") and f.name in saved and saved[f.name] != getattr(config, f.name)]


def is_first_process() -> bool:
    """The process that owns the folder: the only one, or rank 0 of a launched group (the others only read)."""
    return os.environ.get("RANK", "0") == "0"


class RunDir:
    """Use as a context manager: the lock is released when the run ends, however it ends."""

    def __init__(self, path: Path, resume_from: Path | None, lock=None, replaced: Path | None = None,
                 passed_over: list[str] | None = None):
        self.path, self.resume_from, self._lock = path, resume_from, lock
        self.passed_over = passed_over or []  # damaged checkpoints newer than resume_from, each with what is wrong
        self._replaced = replaced  # the earlier run, moved aside by --overwrite, until this one has started

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._replaced is not None:
            # failed (or interrupted) before it started: the earlier run comes back as it was
            _move_back(self.path, self._replaced) if exc_type is not None else self.started()
        self.close()

    def started(self) -> None:
        """The new run has started cleanly (its settings are written): the run it replaced is deleted now."""
        if self._replaced is not None:
            with file_operation("delete the replaced run", self._replaced):
                shutil.rmtree(self._replaced)
            self._replaced = None

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the lock
            self._lock = None

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @classmethod
    def open(cls, config) -> "RunDir":
        """Take the folder's lock (before anything in it is touched), then find the checkpoint to resume from
        (checking the settings are those of the interrupted run), or make a fresh folder, refusing one that holds
        another run unless `overwrite`. Processes other than the first only work out the paths."""
        out = Path(config.output_dir)
        if not is_first_process():
            if not config.resume:
                return cls(out, None)
            resume_from, passed_over = _checkpoint_to_resume(out, config)
            return cls(out, resume_from, passed_over=passed_over)
        lock = take_lock(out)
        try:
            _recover_replaced(out)
            ckpt.remove_stale_staging(out / "checkpoints")
            if config.resume:
                resume_from, passed_over = _checkpoint_to_resume(out, config)
                return cls(out, resume_from, lock, passed_over=passed_over)
            existing = [name for name in RUN_FILES if (out / name).exists()]
            if existing and not config.overwrite:
                raise ConfigError(f"{out} already holds a run ({', '.join(existing)}); continue it with --resume "
                                  "or replace it with --overwrite")
            _refuse_inputs_inside(out, existing, config)
            return cls(out, None, lock, _move_aside(out, existing) if existing else None)
        except BaseException:
            lock.close()
            raise

    def write_config(self, config) -> None:
        write_text_atomically(self.path / "run_config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False),
                              "the run's settings")

    def append_metrics(self, line: dict) -> None:
        with file_operation("append to", self.metrics_file), open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(line) + "\n")

    def trim_metrics(self, last_step: int) -> None:
        """A resumed run re-logs the steps after its checkpoint; drop the lines the interrupted run wrote for them."""
        if not self.metrics_file.exists():
            return
        kept = []
        with file_operation("read", self.metrics_file):
            lines = self.metrics_file.read_text().splitlines()
        for line in lines:
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except json.JSONDecodeError:  # the half-written last line of a killed run
                continue
        write_text_atomically(self.metrics_file, "".join(line + "\n" for line in kept), "the metrics")

    def write_summary(self, summary: dict) -> Path:
        return write_text_atomically(self.path / "summary.json", json.dumps(summary, indent=1, ensure_ascii=False),
                                     "the run summary")

    def save_folder(self, name: str, write) -> Path:
        """`write(staging_path)` fills a folder aside; it is renamed into place only once complete, and removed if
        writing it fails (the earlier folder of that name stays until then)."""
        target = self.path / name
        staging = target.with_name(target.name + ".staging")
        with file_operation(f"write the {name} folder", target):
            shutil.rmtree(staging, ignore_errors=True)
            try:
                write(staging)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            give_usual_modes(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        return target


def input_paths(config) -> list[tuple[str, Path]]:
    """(flag, path) of every file or folder the run may read: each setting's value (rm:PATH as PATH) and the YAML
    file the settings were read from (`read_from`, set by the command line)."""
    found = [("--config", Path(config.read_from))] if getattr(config, "read_from", None) else []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item and f.name != "output_dir":
                found.append((f"--{f.name.replace('_', '-')}", Path(item.removeprefix("rm:"))))
    return found


def _refuse_inputs_inside(out: Path, names: list[str], config) -> None:
    """--overwrite removes the earlier run's files: none of them may be something this run reads."""
    doomed = [(out / name).resolve() for name in names]
    for flag, path in input_paths(config):
        try:
            where = path.resolve() if path.exists() else None
        except (OSError, RuntimeError):  # a name too long or a symlink loop: not a file this run can read
            continue
        if where is not None and any(where == d or d in where.parents for d in doomed):
            raise ConfigError(f"{flag} {path} lies inside the earlier run in {out}, which --overwrite would delete; "
                              f"move it out of {out} first, or choose another --output-dir")


def _move_aside(out: Path, names: list[str]) -> Path:
    """The earlier run's files, renamed into OUT/.replaced (the same file system: nothing is copied)."""
    aside = out / REPLACED
    with file_operation("move the earlier run aside in", out):
        aside.mkdir()
        for name in names:
            (out / name).rename(aside / name)
    return aside


def _move_back(out: Path, aside: Path) -> None:
    """Undo :func:`_move_aside`: whatever the failed run wrote under the same names goes, the earlier files return."""
    with file_operation("restore the earlier run in", out):
        for kept in aside.iterdir():
            target = out / kept.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            kept.rename(target)
        aside.rmdir()


def _recover_replaced(out: Path) -> None:
    """A run killed between moving the earlier run aside and starting: the earlier run is moved back. Killed after
    it started (its run_config.yaml is written), the aside copy is what it replaced and is deleted."""
    aside = out / REPLACED
    if not aside.is_dir():
        return
    if (out / "run_config.yaml").exists():  # moved aside with the rest, so written by the new run: it started
        with file_operation("delete the replaced run", aside):
            shutil.rmtree(aside)
    else:
        _move_back(out, aside)


def take_lock(out: Path):
    """An exclusive OS lock on OUT/.lock, holding this process's PID; another run on the folder is refused."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): no lock
        return None
    with file_operation("create the run folder", out):
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise ConfigError(f"{out} is in use by another thumbalign run (PID {holder}); wait for it to end or choose "
                          "another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _checkpoint_to_resume(out: Path, config) -> tuple[Path, list[str]]:
    """The checkpoint to resume from, and a line for each damaged newer one passed over on the way to it."""
    if config.resume == "latest":
        resume_from, passed_over = _newest_intact(out / "checkpoints")
    else:
        resume_from, passed_over = Path(config.resume), []
        if not (resume_from / ckpt.STATE_FILE).exists():
            raise ConfigError(f"--resume {config.resume}: not a complete checkpoint folder")
        why = ckpt.damage(resume_from)
        if why:
            raise ConfigError(f"--resume {config.resume}: the checkpoint is damaged ({why}); resume from another "
                              "one, or with --resume latest from the newest intact one")
    saved_file = out / "run_config.yaml"
    saved = yaml.safe_load(saved_file.read_text()) if saved_file.exists() else {}
    changed = changed_settings(config, saved)
    if changed:
        raise ConfigError("--resume with settings that differ from the interrupted run: "
                          + ", ".join(f"{k} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed))
    return resume_from, passed_over


def _newest_intact(checkpoints: Path) -> tuple[Path, list[str]]:
    """A damaged checkpoint (a disk that filled, a copy cut short, bytes changed) costs that checkpoint only: the
    newest intact one is resumed from, and each one passed over is named with what is wrong with it."""
    found = ckpt.list_checkpoints(checkpoints)
    if not found:
        raise ConfigError(f"--resume: no complete checkpoint in {checkpoints}")
    passed_over = []
    for path in reversed(found):
        why = ckpt.damage(path)
        if why is None:
            return path, passed_over
        passed_over.append(f"{path.name} is damaged ({why})")
    raise ConfigError(f"--resume: no intact checkpoint in {checkpoints}: " + "; ".join(passed_over))
