"""The run skeleton every trainer fills in. One order of events for every kind of run::

    check the inputs → lock the run folder → engine (processes, precision) → model folder, tokenizer
    → set_up: data, model, the engine prepared with it (trainer) → engine.start: fresh or resumed
    → before_training (trainer) → engine.run: the optimizer steps → results: held-out numbers, summary (trainer)
    → the final model, gathered on every process → save: model folder, summary, report (trainer, main process)
    → engine.finish

A trainer (policy.py, reward.py, online.py) overrides the hooks and nothing else; what it shares with the others
(the model's set-up, UDM, judged answers) lives in the files next to this one.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from ..data.readers import Source, is_hub_dataset, load_hub_dataset
from ..data.tokens import Example, examples_digest
from ..engine.loop import Engine, Task
from ..engine.models import load_tokenizer, resolve_model
from ..engine.rundir import RunDir
from ..errors import DataError
from ..files import content_digest


class Trainer:
    """A run of one kind. Subclasses fill in :meth:`set_up`, :meth:`results` and :meth:`save` (and, when they need
    to, :meth:`inputs`, :meth:`fingerprint`, :meth:`before_training`); :meth:`run` calls them in order. While a run
    lasts, `engine`, `run_dir`, `model_dir` and `tokenizer` are set."""

    def __init__(self, config, log=print):
        self.config, self.log = config, log
        self.engine: Engine
        self.run_dir: RunDir
        self.model_dir: Path

    # ------------------------------------------------------------------------------------------ hooks

    def inputs(self) -> tuple:
        """The files, folders or Hub datasets the run reads, checked before any model is loaded."""
        return ()

    def set_up(self) -> Task:
        """Read the data, load the model and prepare the engine with it (``engine.prepare``); the task to run."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What a resumed run must find unchanged (content hashes of its data)."""
        return {}

    def before_training(self, resumed: bool) -> None:
        """After the engine has started (and restored a checkpoint when resuming), before the first step."""

    def results(self, last_line: dict | None) -> dict:
        """Every process, after the last step: held-out numbers; returns the run's summary."""
        raise NotImplementedError

    def save(self, final, summary: dict) -> None:
        """The main process: the final model folder (`final`: the whole trained model), summary.json, report."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        require_inputs(*self.inputs())
        with RunDir.open(self.config) as run:  # the folder's lock lives as long as the run
            return self._run(run)

    def _run(self, run: RunDir) -> dict:
        config = self.config
        self.run_dir = run
        self.engine = engine = Engine(config, self.log, tracking_dir=run.path / "tracking")
        engine.say(describe_settings(config))
        self.model_dir = model_folder(engine, config)
        self.tokenizer = load_tokenizer(self.model_dir, config.trust_remote_code)
        task = self.set_up()
        start = engine.start(run, task, config, task.units_per_step, self.fingerprint())
        self.before_training(resumed=run.resume_from is not None)
        last_line = engine.run(task, run, start, task.units_per_step, task.steps_per_epoch)
        summary = self.results(last_line)
        final = engine.final_model()  # every process takes part: a sharded model is gathered here
        if engine.is_main:
            self.save(final, summary)
        engine.finish(final_results(engine.main_value(summary)))
        return summary


def describe_settings(config) -> str:
    """The resolved settings that differ from the defaults, for the first line of a run."""
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
               if getattr(config, f.name) != f.default]
    return "Settings (besides the defaults): " + (", ".join(changed) or "none")


def model_folder(engine: Engine, config) -> Path:
    """Resolve `--model` once, on the main process (converting a GGUF file or downloading from the Hub happens
    there), for every process."""
    model_dir = resolve_model(config.model, config.cache_dir, config.revision) if engine.is_main else None
    return Path(engine.main_value(str(model_dir)))


def require_inputs(*sources: str | Source | None) -> None:
    """The data exists — files and folders here, Hub datasets in the datasets cache (fetched now if need be): checked
    before a model is converted, downloaded or loaded."""
    for source in sources:
        if source is None or not str(getattr(source, "path", source)):
            continue
        source = source if isinstance(source, Source) else Source(str(source))
        if is_hub_dataset(source.path):
            load_hub_dataset(source)
        elif not Path(source.path).exists():
            raise DataError(source.path, None, None, "no such file or folder")


def data_fingerprint(data_path: str, examples: list[Example]) -> dict:
    """What a resumed run must find unchanged: the data file's bytes (a Hub dataset: its tokenised examples alone)
    and the tokenised training examples."""
    fingerprint = {} if is_hub_dataset(data_path) else {"data file": content_digest(data_path)}
    fingerprint["tokenised examples"] = examples_digest(examples)
    return fingerprint


def count_steps(config, n_units: int, units_per_step: int) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch): --max-steps when set, else --num-train-epochs passes."""
    steps_per_epoch = math.ceil(n_units / units_per_step)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    return total, steps_per_epoch


def final_results(summary: dict) -> dict:
    """The run's closing numbers, flat, for the trackers: held-out classifier before/after, reward-model held-out
    metrics, judged 👍 rates and their difference."""
    out = {}
    for key in ("eval_before", "eval_after", "eval"):
        for metric in ("accuracy", "auc", "ece"):
            if (summary.get(key) or {}).get(metric) is not None:
                out[f"{key}/{metric}"] = summary[key][metric]
    judged = summary.get("judged") or {}
    for name, m in judged.get("models", {}).items():
        out[f"judged/{name}_thumbs_up_rate"] = m["thumbs_up_rate"]
    if "difference" in judged:
        out["judged/difference"] = judged["difference"]["mean"]
    return out

