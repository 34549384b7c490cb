"""The run folder: what a run writes, where, and how it survives a crash.

    checkpoints/step-N/   weights, optimizer, scheduler, RNG, trainer state (engine/checkpoint.py)
    metrics.jsonl         one line per logging step
    run_config.yaml       the resolved settings; --resume refuses to continue with different ones
    summary.json          data counts, settings, final metrics, evaluations
    model/                the final model folder, written aside and renamed into place
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import yaml

from ..errors import ConfigError
from . import checkpoint as ckpt

RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "model", "run_config.yaml", "udm_classifier.json",
             "generations.jsonl", "report.html")


def changed_settings(config, saved: dict) -> list[str]:
    """Settings that differ from the interrupted run's, except those marked resumable (metadata) in the config."""
    return [f.name for f in dataclasses.fields(config)
            if not f.metadata.get("resumable") and f.name in saved and saved[f.name] != getattr(config, f.name)]


class RunDir:
    def __init__(self, path: Path, resume_from: Path | None):
        self.path, self.resume_from = path, resume_from

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @classmethod
    def open(cls, config) -> "RunDir":
        """Find the checkpoint to resume from (checking the settings are those of the interrupted run), or make a
        fresh folder, refusing one that holds another run unless `overwrite`."""
        out = Path(config.output_dir)
        ckpt.remove_stale_staging(out / "checkpoints")
        if config.resume:
            return cls(out, _checkpoint_to_resume(out, config))
        existing = [name for name in RUN_FILES if (out / name).exists()]
        if existing and not config.overwrite:
            raise ConfigError(f"{out} already holds a run ({', '.join(existing)}); continue it with --resume "
                              "or replace it with --overwrite")
        for name in existing:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
        return cls(out, None)

    def write_config(self, config) -> None:
        (self.path / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    def append_metrics(self, line: dict) -> None:
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(line) + "\n")

    def trim_metrics(self, last_step: int) -> None:
        """A resumed run re-logs the steps after its checkpoint; drop the lines the interrupted run wrote for them."""
        if not self.metrics_file.exists():
            return
        kept = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= last_step:
                    kept.append(line)
            except json.JSONDecodeError:  # the half-written last line of a killed run
                continue
        self.metrics_file.write_text("".join(line + "\n" for line in kept))

    def write_summary(self, summary: dict) -> Path:
        path = self.path / "summary.json"
        path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        return path

    def save_folder(self, name: str, write) -> Path:
        """`write(staging_path)` fills a folder aside; it is renamed into place only once complete."""
        target = self.path / name
        staging = target.with_name(target.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        write(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return target


def _checkpoint_to_resume(out: Path, config) -> Path:
    if config.resume == "latest":
        found = ckpt.list_checkpoints(out / "checkpoints")
        if not found:
            raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
        resume_from = found[-1]
    else:
        resume_from = Path(config.resume)
        if not (resume_from / ckpt.STATE_FILE).exists():
            raise ConfigError(f"--resume {config.resume}: not a complete checkpoint folder")
    saved_file = out / "run_config.yaml"
    saved = yaml.safe_load(saved_file.read_text()) if saved_file.exists() else {}
    changed = changed_settings(config, saved)
    if changed:
        raise ConfigError("--resume with settings that differ from the interrupted run: "
                          + ", ".join(f"{k} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed))
    return resume_from
