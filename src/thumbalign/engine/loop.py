"""The training engine shared by every trainer: accelerator and precision, optimizer and scheduler, the optimizer
step over micro-batches, clipping, non-finite steps, metrics, checkpoints and exact resume.

A trainer supplies a :class:`Task` — how a step's micro-batches are chosen and how one becomes a loss, what to log,
what state to save — and the engine does the rest, the same way for the policy, the reward model and online
training::

    engine = Engine(config, log)
    engine.prepare(module, model, total_steps)   # module: what DDP wraps; model: whose weights are saved
    start = engine.start(run, task, config, units_per_step)     # resumed, or 0
    engine.run(task, run, start, units_per_step)
"""

from __future__ import annotations

import datetime
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, ThumbalignError
from . import checkpoint as ckpt
from . import sharding
from .models import bf16_available, quantized_layers
from .rundir import RunDir
from .window import MetricsWindow


@dataclass
class MicroStep:
    """What a task computes for one micro-batch."""

    loss: torch.Tensor                  # scalar: this micro-batch's share of the whole step's loss (all processes)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # per-example numbers to log, gathered
    tokens: int = 0                     # tokens processed (for tokens/s)
    samples: int = 0                    # examples processed (for samples/s)


class Task(Protocol):
    """What differs between trainers."""

    def step_batches(self, step: int) -> list[Any]:
        """This process's micro-batches of optimizer step `step` (0-based); a pure function of the step, so a
        resumed run replays exactly what an uninterrupted one would have done."""

    def micro_step(self, module: torch.nn.Module, batch: Any) -> MicroStep:
        """Forward through `module` (the wrapped model) and the loss, for one micro-batch."""

    def log_line(self, stats: dict[str, torch.Tensor]) -> dict:
        """The task's part of a log line, from the window's gathered statistics (empty when every step since the
        last line was skipped)."""

    def format_line(self, line: dict) -> str:
        """The console line for a log line."""

    def state_dict(self) -> dict:
        """State beyond weights, optimizer, scheduler and RNG (δ, history); saved in every checkpoint and restored
        when a non-finite step is skipped."""

    def load_state_dict(self, state: dict) -> None: ...


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def _forget_single_process_state() -> None:
    """accelerate keeps its state per process and refuses another precision later in the same process. A run that
    was not launched as one of several processes owns that state, so a second run in the same Python session (a
    notebook, a test suite) may set it afresh."""
    import os

    from accelerate.state import AcceleratorState

    if "WORLD_SIZE" not in os.environ:
        AcceleratorState._reset_state(reset_partial_state=True)


def trackers_to_use(config) -> list[str]:
    """--report-to without 'none'; a tracker whose package is missing is one line saying what to install."""
    import importlib.util

    wanted = [t for t in getattr(config, "report_to", None) or [] if t != "none"]
    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                "trackio": ("trackio",)}
    for tracker in wanted:
        if not any(importlib.util.find_spec(p) for p in packages[tracker]):
            raise ConfigError(f"--report-to {tracker}: the package is not installed (pip install "
                              f"{packages[tracker][0]})")
    return wanted


def scalars(values: dict) -> dict:
    """The numbers of a log line or a result, for the trackers (which take no None, text or lists)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}


def tracker_config(config) -> dict:
    """The settings as the trackers take them: numbers, text and flags (lists and None as text)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.to_dict().items()}


class Engine:
    """One per run. `config` supplies: bf16, seed, learning_rate, weight_decay, lr_scheduler_type, warmup_ratio,
    max_grad_norm, skip_nonfinite, logging_steps, save_steps, save_total_limit."""

    def __init__(self, config, log=print, tracking_dir: Path | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        probe = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16 = config.bf16 == "true" or (config.bf16 == "auto" and bf16_available(probe))
        # On a machine without an accelerator, cpu=True is what makes accelerate join processes started by
        # torch.distributed.run into one gloo group (MULTI_CPU) instead of running them as unlinked copies.
        has_accelerator = (torch.accelerator.is_available() if hasattr(torch, "accelerator")
                           else torch.cuda.is_available())
        _forget_single_process_state()
        self.trackers = trackers_to_use(config)
        options = sharding.accelerator_options(has_accelerator)  # what the launched backend needs, if anything
        from accelerate.utils import InitProcessGroupKwargs

        # Sharded, the other processes wait in their first collective while the first one reads the whole model:
        # 30 minutes, where NCCL's default (10) could run out on a big model and slow storage
        group = {"timeout": COLLECTIVE_TIMEOUT, **({"backend": options["backend"]} if "backend" in options else {})}
        handlers = [InitProcessGroupKwargs(**group)]
        self.accelerator = Accelerator(mixed_precision="bf16" if self.bf16 else "no",
                                       cpu=options.get("cpu", not has_accelerator), kwargs_handlers=handlers,
                                       log_with=self.trackers or None,
                                       project_dir=str(tracking_dir) if tracking_dir else None)
        self.backend = sharding.select(self.accelerator)  # how this run holds its weights over its processes
        self.device = self.accelerator.device
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.is_main = self.accelerator.is_main_process
        self.say = log if self.is_main else (lambda *a, **k: None)
        self.quiet = not self.is_main
        self.autocast = self.accelerator.autocast
        self.nonfinite = 0
        self.data_fingerprint: dict = {}
        self.module = self.model = self.optimizer = None  # set by prepare()
        set_seed(config.seed)

    @property
    def sharded(self) -> bool:
        """The run shards its weights over the processes (known from the launch, before any model is loaded): every
        process must then run the same forward passes, and gathering the model takes all of them."""
        return self.backend.sharded

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    # ------------------------------------------------------------------------------------------ processes

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """All-gather along the first dimension (identity with one process); bool tensors travel as bytes."""
        if self.world == 1:
            return t
        if t.dtype == torch.bool:
            return self.accelerator.gather(t.to(torch.uint8)).bool()
        return self.accelerator.gather(t)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """All-gather along the first dimension when processes hold different numbers of rows: padded to the
        longest for the collective, cut back after it."""
        if self.world == 1:
            return t
        sizes = self.gather(torch.tensor([t.shape[0]], device=t.device)).tolist()
        padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[:t.shape[0]] = t
        chunks = self.gather(padded).split(max(sizes))
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)])

    def gather_objects(self, obj) -> list:
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def main_value(self, obj):
        """The main process's `obj`, on every process (so that every process takes the same branch)."""
        return self.gather_objects(obj)[0]

    def scorer(self, model):
        """What evaluates `model` between training steps: the model itself, or — sharded — the engine's root unit,
        whose forward gathers the weights (every process must then evaluate the same batches)."""
        return self.backend.scorer(self.module, model)

    def settle_root(self, token_id: int, module=None) -> None:
        """Before a trainer calls the model's layers directly (sampling, UDM's policy embeddings): the backend may
        need the engine's module (or `module`, a frozen model's from :meth:`frozen`) to run once first (FSDP2 takes
        the first unit to run as the root)."""
        self.backend.settle_root(module or self.module, token_id, self.device)

    def rounds(self, mine: int) -> int:
        """How many passes of a loop every process runs when each has `mine` of its own: with sharded weights, as
        many as the busiest process (the others pad with stand-ins, since every forward gathers from all); else
        `mine`."""
        return max(self.gather_objects(mine)) if self.sharded else mine

    def in_lockstep(self, mine: Sequence, stand_in=None) -> Iterator[tuple[Any, bool]]:
        """(item, True) for each of this process's items, then (stand_in, False) until it has taken as many turns as
        the busiest process — with sharded weights every forward pass gathers from all, so a process with nothing
        left must still run one on a stand-in (and drop its result)."""
        for n in range(self.rounds(len(mine))):
            yield (mine[n], True) if n < len(mine) else (stand_in, False)

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------------ set-up

    def prepare(self, module: torch.nn.Module, model, total_steps: int | None) -> None:
        """AdamW over `model`'s trainable weights, the scheduler (unless `total_steps` is None: then `schedule`
        follows), and `module` wrapped for the distributed engine. `module` computes with `model`'s parameters;
        `model` is what checkpoints hold."""
        config = self.config
        self.model, self.total_steps = model, total_steps
        self.backend.configure(config)
        if self.sharded and quantized_layers(model):
            raise ConfigError("--load-in-4bit / --load-in-8bit do not run with sharded weights (FSDP, ZeRO-3) here "
                              "yet; use --accelerate-config ddp or zero2")
        # before the optimizer: it must hold the sharded parameters, which only exist once the model is sharded
        self.backend.shard(module, model, self.device, self.bf16)
        self.params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self._adamw = optimizer  # what the scheduler sets the learning rate of (DeepSpeed wraps it)
        if total_steps is not None:
            self.schedule(total_steps)
        self.module, self.optimizer = self.backend.wrap(module, optimizer)

    def schedule(self, total_steps: int) -> None:
        """The learning-rate schedule over `total_steps`: in `prepare`, or after it (`total_steps=None` there) for a
        trainer that learns the length of the run only by running the prepared model (online's prompt filter)."""
        from transformers import get_scheduler

        self.total_steps = total_steps
        self.scheduler = get_scheduler(self.config.lr_scheduler_type, self._adamw,
                                       num_warmup_steps=int(round(self.config.warmup_ratio * total_steps)),
                                       num_training_steps=total_steps)

    def frozen(self, module: torch.nn.Module, model: torch.nn.Module):
        """A model the run only evaluates and never trains (online's KL reference), held as the trained one is:
        sharded under FSDP and ZeRO-3, so that it costs each device 1/N of its weights, whole on the device
        otherwise. `module` computes with `model`'s weights; returns what to call in its place. Sharded, every
        process must call it in step (as the training forward is called); a process that built `model` empty
        receives the first process's weights. Call it after `prepare`."""
        model.requires_grad_(False)
        model.eval()
        return self.backend.frozen(module, model, self.device, self.bf16)

    def start(self, run: RunDir, task: Task, config, units_per_step: int,
              data_fingerprint: dict | None = None) -> int:
        """The step to start from: the resumed checkpoint's, or 0 for a fresh run (whose settings are written to
        run_config.yaml now, so that a later --resume can check them). `data_fingerprint` (content hashes of the
        training data) goes into every checkpoint; a resume with other data is refused."""
        self.data_fingerprint = data_fingerprint or {}
        if self.trackers:
            self.accelerator.init_trackers("thumbalign", config=tracker_config(config))
        if run.resume_from:
            return self.resume(run, task, units_per_step)
        if self.is_main:
            run.write_config(config)
            run.started()  # the data read, the model loaded and prepared: a run --overwrite replaced can go now
        return 0

    def resume(self, run: RunDir, task: Task, units_per_step: int) -> int:
        """Load the checkpoint `run` resumes from into the model, optimizer, scheduler, RNG and task; return its
        step. `units_per_step` (batch × accumulation × processes) must equal the interrupted run's."""
        for line in run.passed_over:
            self.say(f"Checkpoint {line}: passed over")
        state = self.backend.load_checkpoint(run.resume_from, self.module, self.model, self.optimizer, self.scheduler)
        saved_data = state.get("data", {})
        changed = [k for k, v in self.data_fingerprint.items() if k in saved_data and saved_data[k] != v]
        if changed:
            raise ConfigError(f"--resume: the training data changed since the interrupted run (changed: "
                              f"{', '.join(changed)}); resume with the data it was trained on, or start anew with "
                              "--overwrite")
        saved = state.get("global_batch", units_per_step)
        if saved != units_per_step:  # which examples a step holds depends on it
            raise ConfigError(f"--resume: the interrupted run's steps held {saved} units, this one's would hold "
                              f"{units_per_step} (batch × accumulation × processes); keep them equal to resume")
        task.load_state_dict(state["task"])
        self.nonfinite = state.get("nonfinite", 0)
        if self.is_main:
            run.trim_metrics(state["step"])
        self.wait()
        self.say(f"Resumed from {run.resume_from} at step {state['step']} of {self.total_steps}")
        return state["step"]

    # ------------------------------------------------------------------------------------------ the loop

    def run(self, task: Task, run: RunDir, start_step: int, units_per_step: int,
            steps_per_epoch: float | None = None) -> dict:
        """Optimizer steps `start_step` .. total_steps − 1; returns the last log line."""
        config = self.config
        window = MetricsWindow(self.gather_rows)
        bar = tqdm(total=self.total_steps, initial=start_step, desc="training", unit="step", disable=self.quiet,
                   dynamic_ncols=True)
        self.module.train()
        last_line = {}
        try:
            for step in range(start_step, self.total_steps):
                grad_norm = self._optimizer_step(task, run, step, window)
                self.scheduler.step()
                bar.update(1)
                done = step + 1
                saving = done % config.save_steps == 0 or done == self.total_steps
                # a checkpoint closes the window of the log line too: a run resumed from it logs the same lines
                # as the uninterrupted one (the window's statistics are not part of the checkpoint)
                if done % config.logging_steps == 0 or saving:
                    last_line = self._log(task, run, window, done, grad_norm, steps_per_epoch, bar)
                if saving:
                    self._save(task, run, done, units_per_step)
        finally:
            bar.close()
        return last_line

    def _optimizer_step(self, task: Task, run: RunDir, step: int, window: MetricsWindow) -> float:
        """Every micro-batch of the step, then the update — unless the loss or the gradient is not finite, in which
        case the update, the task's state change and the step's statistics are all dropped."""
        accelerator = self.accelerator
        batches = task.step_batches(step)
        task_state, mark = task.state_dict(), window.mark()
        finite = True
        for m, batch in enumerate(batches):
            last = m == len(batches) - 1
            # DeepSpeed steps inside backward() when gradients are synced: tell accelerate which micro-batch ends it
            accelerator.gradient_state._set_sync_gradients(last)
            with (nullcontext() if last else accelerator.no_sync(self.module)), self.autocast():
                out = task.micro_step(self.module, batch)
                # × world because DDP averages the gradients of the processes, and the loss is a share of the sum
                accelerator.backward(out.loss * self.world)
            finite &= bool(self.gather(torch.isfinite(out.loss.detach()).reshape(1)).all())
            window.add(out.stats, out.tokens, out.samples, self.device)
        # the norm is taken over the synchronised gradients, so every process sees the same verdict
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        grad_norm = self.backend.clip_grad_norm(self.params, max_norm)
        if finite and math.isfinite(grad_norm):
            self.optimizer.step()
        elif self.backend.updates_inside_backward:  # DeepSpeed: the step cannot be skipped
            latest = ckpt.list_checkpoints(run.checkpoints)
            raise ThumbalignError(
                f"step {step + 1}: the loss or the gradient is not finite (NaN/inf), and DeepSpeed has already applied "
                f"the update, so the step cannot be skipped. Last good checkpoint: "
                f"{latest[-1] if latest else 'none yet'}; continue with --resume (perhaps with a lower "
                "--learning-rate)")
        else:
            self._skip(task, run, task_state, window, mark, step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _skip(self, task: Task, run: RunDir, task_state: dict, window: MetricsWindow, mark, done: int) -> None:
        self.nonfinite += 1
        task.load_state_dict(task_state)  # e.g. δ must not absorb the bad rewards
        window.rollback(mark)
        if self.nonfinite > self.config.skip_nonfinite:
            latest = ckpt.list_checkpoints(run.checkpoints)
            raise ThumbalignError(
                f"step {done}: the loss or the gradient is not finite (NaN/inf); stopped without updating the "
                f"weights. Last good checkpoint: {latest[-1] if latest else 'none yet'}. Continue with --resume "
                "(perhaps with a lower --learning-rate), or tolerate such steps with --skip-nonfinite N")
        self.say(f"step {done}: non-finite loss or gradient, step skipped ({self.nonfinite} of --skip-nonfinite "
                 f"{self.config.skip_nonfinite})")

    def _log(self, task: Task, run: RunDir, window: MetricsWindow, done: int, grad_norm: float,
             steps_per_epoch: float | None, bar) -> dict:
        stats, samples_per_s, tokens_per_s = window.take()
        line = {"step": done}
        if steps_per_epoch:
            line["epoch"] = round(done / steps_per_epoch, 4)
        line.update(task.log_line(stats))
        line.update(lr=self.scheduler.get_last_lr()[0], grad_norm=grad_norm if math.isfinite(grad_norm) else None,
                    samples_per_s=samples_per_s if stats else 0.0, tokens_per_s=tokens_per_s if stats else 0.0,
                    skipped_nonfinite_steps=self.nonfinite)
        if self.trackers:
            self.accelerator.log(scalars(line), step=done)
        if self.is_main:
            run.append_metrics(line)
            bar.write(task.format_line(line))
            if line.get("loss") is not None:
                bar.set_postfix(loss=f"{line['loss']:.4f}")
        return line

    def whole_weights(self, model, everywhere: bool = False) -> dict | None:
        """`model`'s state dict, whole: on the main process only (None on the others), or on every process. A
        sharded model is gathered once, onto the main process (every process must call this then); an unsharded one
        is its own state dict, no copy."""
        if self.sharded:
            if everywhere:
                raise RuntimeError("sharded weights are gathered onto the main process only")
            weights = self.backend.full_weights(model, self.is_main)
            return weights if self.is_main else None
        return model.state_dict() if everywhere or self.is_main else None

    def final_model(self):
        """The trained model, whole, on the main process (None on the others; every process must call this). A
        sharded model is gathered once into a new unsharded copy."""
        return self.backend.whole_model(self.model, self.is_main)

    def finish(self, results: dict) -> None:
        """The run's final numbers (held-out evaluations, judged rates) to the trackers, then the end of the run on
        every process: trackers closed, and the process group torn down once all have arrived. A process group left
        to the interpreter's exit can abort a process whose peer has already gone (gloo's threads meet a closed
        socket: "terminate called without an active exception"), failing a run that finished its work."""
        if self.trackers:
            self.accelerator.log(scalars(results), step=self.total_steps)
        self.accelerator.wait_for_everyone()
        # the wrapped model (DDP's reducer) holds the process group: let go of it first, so that the group really
        # ends here and not in the interpreter's teardown
        self.module = self.optimizer = None
        self.accelerator.free_memory()
        self.accelerator.end_training()

    def _save(self, task: Task, run: RunDir, done: int, units_per_step: int) -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        state = {"step": done, "task": task.state_dict(), "total_steps": self.total_steps, "nonfinite": self.nonfinite,
                 "global_batch": units_per_step, "world_size": self.world, "sharded": self.backend.tag,
                 "data": self.data_fingerprint}
        failure = None
        try:
            self.backend.save_checkpoint(run.checkpoints, done, self.model, self.optimizer, self.scheduler, state,
                                         self.config.save_total_limit, self.is_main, self.wait)
        except OSError as err:
            failure = str(err.strerror or err)
        except CheckpointException as err:  # a shard's write failed on some process; every process is told
            rank, cause = next(iter(err.failures.items()))
            cause = cause[0] if isinstance(cause, tuple) else cause  # (exception, its frames)
            failure = f"process {rank}: {getattr(cause, 'strerror', None) or cause}"
        # every process learns of a failed save, instead of waiting forever
        failure = next((f for f in self.gather_objects(failure) if f), None)
        if failure:
            raise ThumbalignError(f"could not write the checkpoint of step {done} ({failure}); "
                                  f"the earlier checkpoints in {run.checkpoints} are intact")
