"""`thumbalign train`: the policy trainer, for every offline method. The method supplies its loss; the engine
supplies the loop; the skeleton (skeleton.py) the order of a run; this file says what a step of binary feedback is.

Order of events in a run:
  records -> tokens (data/) -> the model made trainable and prepared by the engine (model_setup.py) -> reference
  log-probs, cached (engine/reference.py) -> UDM weights (prompt_embeddings.py, methods/udm.py) -> for each optimizer
  step: policy log-probs (engine/logprobs.py) -> loss (methods/<method>.py) -> AdamW step (engine/loop.py)
  -> checkpoints -> held-out evaluation -> final model folder (final_model.py), summary.json, judged answers
  (judged.py), report
"""

from __future__ import annotations

import torch

from ..analysis.judges import load_judge
from ..analysis.metrics import implicit_classifier_report
from ..analysis.report import write_report
from ..data.batching import collate, collate_packed, micro_batches, step_groups
from ..data.prepare import PreparedData, data_sources, prepare_data
from ..data.tokens import condition_generation_on
from ..engine.inference import batched_logps
from ..engine.logprobs import CompletionLogps, completion_logps
from ..engine.loop import Engine, MicroStep
from ..engine.models import cache_root, grow_embeddings, load_tokenizer, resolve_model
from ..engine.reference import ReferenceLogps
from ..engine.rundir import RunDir
from ..methods.base import Objective, StepInputs
from ..methods.registry import get_method
from .config import TrainConfig
from .final_model import complete_model_folder, save_policy
from .judged import answers_on_shards, compare_with_base
from .model_setup import check_use_liger, load_policy, make_trainable
from .prompt_embeddings import UDMWeights, fit_udm, prompt_clusters, udm_window_stats
from .skeleton import Trainer, count_steps, data_fingerprint, require_inputs


def train(config: TrainConfig, log=print) -> dict:
    trainer = PolicyTrainer(config, log)
    if config.dry_run:
        require_inputs(*trainer.inputs())
        return dry_run(config, log)
    return trainer.run()


def dry_run(config: TrainConfig, log=print) -> dict:
    """Read and tokenise the data and say what training would do; no weights are loaded, nothing is written."""
    tokenizer = load_tokenizer(resolve_model(config.model, config.cache_dir, config.revision), config.trust_remote_code)
    method = get_method(config.method)
    data = prepare_data(config, tokenizer, method.needs, log=log)
    per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * config.num_processes
    steps, _ = count_steps(config, len(data.units), per_step)
    log(f"Dry run: {method.name} would train {steps} steps of {per_step} on {len(data.units)} "
        f"{'pairs' if method.needs.paired else 'prompts' if method.needs.grouped else 'examples'}; nothing was "
        "trained or written")
    return {"dry_run": True, "method": method.name, "steps": steps, "data": data.report}


class PolicyTrainer(Trainer):
    """An offline method on feedback rows: the policy against a frozen reference (its own starting point)."""

    def inputs(self) -> tuple:
        return (*data_sources(self.config), self.config.eval_prompts)

    def set_up(self) -> "PolicyTask":
        config, engine, tokenizer = self.config, self.engine, self.tokenizer
        self.method = method = get_method(config.method)
        self.data = data = prepare_data(config, tokenizer, method.needs, log=engine.say)
        added = data.report.get("added_tokens", [])
        model = load_policy(self.model_dir, config, engine)
        grow_embeddings(model, tokenizer, {t: method.token_meanings.get(t, t) for t in added})
        n_up = sum(e.label for e in data.train)
        self.objective = method(config, n_up, len(data.train) - n_up, log=engine.say)
        self.model = model = make_trainable(model, config)
        check_use_liger(config, engine, model, [(e.input_ids, [i >= e.prompt_len for i in range(len(e.input_ids))])
                                                for e in data.train[:4]], tokenizer.pad_token_id)
        # prepared (sharded, wrapped) before any pass: sharded, the passes below run on the shards, in step
        engine.prepare(CompletionLogps(model, config.logps_chunk_size, config.use_liger), model,
                       PolicyTask.count(config, data, engine)[0])
        engine.settle_root(tokenizer.pad_token_id)
        # The model as it starts is the reference (LoRA's fresh adapters add exactly zero): its log-probs are
        # computed now, once, and cached on disk.
        reference = ReferenceLogps(engine, engine.scorer(model), self.model_dir, tokenizer.pad_token_id,
                                   config.eval_batch_size, config.logps_chunk_size, cache_root(config.cache_dir))
        ref_train, self.ref_from_cache = reference(data.train, "training")
        self.ref_eval = reference(data.eval, "evaluation")[0] if data.eval else torch.zeros(0)
        self.udm = fit_udm(config, engine, self.run_dir, data, model, tokenizer) if config.udm else None
        clusters = prompt_clusters(config, engine, data, model, tokenizer) if config.delta == "prompt" else None
        self.task = PolicyTask(config, engine, data, self.objective, model, ref_train, self.udm,
                               tokenizer.pad_token_id, clusters)
        self.task.precompute_extra_references(reference)
        return self.task

    def fingerprint(self) -> dict:
        return data_fingerprint(self.config.data, self.data.train)

    def before_training(self, resumed: bool) -> None:
        if not resumed and self.data.eval:
            # measured, not assumed: the policy is still the reference, so every reward must come out exactly 0
            self.task.history["eval_before"] = self._held_out()
            self.engine.say(f"Held-out implicit-reward classifier before training: "
                            f"{format_eval(self.task.history['eval_before'])}")
        self.task.announce()

    def results(self, last_line: dict | None) -> dict:
        config, engine, tokenizer = self.config, self.engine, self.tokenizer
        if self.data.eval:
            self.task.history["eval_after"] = self._held_out()
            engine.say(f"Held-out implicit-reward classifier after training:  "
                       f"{format_eval(self.task.history['eval_after'])}")
        summary = _summary(config, engine, self.task, self.model_dir, self.ref_from_cache, self.udm, last_line)
        if self.method.needs.reward_tokens:  # served models answer as 👍 answers: the template conditions on 👍
            condition_generation_on(tokenizer, self.method.needs.reward_tokens[0])
        # sharded, the held-out prompts are answered now, on the shards; otherwise from the saved folder in save()
        self.answers = (answers_on_shards(config, engine, self.model, tokenizer, self.model_dir,
                                          config.eval_max_new_tokens) if config.eval_prompts and engine.sharded
                        else None)
        return summary

    def save(self, final, summary: dict) -> None:
        _finish(self.config, self.engine, self.run_dir, final, self.tokenizer, self.model_dir, summary, self.answers)

    def _held_out(self) -> dict:
        return held_out_classifier(self.engine.scorer(self.model), self.data.eval, self.ref_eval, self.objective,
                                   self.tokenizer.pad_token_id, self.config, self.engine)


class PolicyTask:
    """A step of offline training: micro-batches of feedback examples, their log-probs, the method's loss."""

    def __init__(self, config: TrainConfig, engine: Engine, data: PreparedData, objective: Objective, model,
                 ref_logps: torch.Tensor, udm: UDMWeights | None, pad_token_id: int,
                 clusters: torch.Tensor | None = None):
        self.config, self.engine, self.data, self.objective, self.model = config, engine, data, objective, model
        self.ref_logps, self.udm, self.pad_token_id = ref_logps, udm, pad_token_id
        self.micro, self.accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
        self.units_per_step = self.micro * self.accumulation * engine.world
        self.total_steps, self.steps_per_epoch = self.count(config, data, engine)
        self.history: dict = {}
        self.extra_ref: dict = {}   # the method's extra examples: key -> reference log-prob
        self.seen: set[tuple[int, int]] = set()  # (step, example) this process trained on, for the summary
        # grouped methods learn within a prompt: the unit (prompt) of each example, and its rank where given
        self.unit_of = torch.zeros(len(data.train), dtype=torch.long)
        for u, items in enumerate(data.units):
            self.unit_of[items] = u
        self.ranks = torch.tensor([float(f.get("rank", "nan")) for f in data.train_fields])  # checked in data/
        self.clusters = clusters  # --delta prompt: each example's prompt cluster

    def _plan(self, step: int, rank: int) -> list[tuple[list[int], list[int], int]]:
        """(this process's micro-batch, the micro-batch of every process together, examples in the step) for each
        micro-batch of the step; an empty micro-batch is a process that ran out of data."""
        c, world = self.config, self.engine.world
        batches, n_step = micro_batches(self.data.units, step, self.micro, self.accumulation, world, rank, c.seed)
        groups = step_groups(self.data.units, step, self.micro, self.accumulation, world, c.seed)
        groups += [[] for _ in range(len(batches) - len(groups))]
        return [(idx, group, n_step) for idx, group in zip(batches, groups)]

    def precompute_extra_references(self, reference: ReferenceLogps) -> None:
        """The extra examples of every micro-batch of the run are known in advance (the sampler is a function of
        the step), so their reference log-probs are computed once, before training, and cached like the others."""
        found = {}
        for step in range(self.total_steps):
            for rank in range(self.engine.world):
                for idx, group, _ in self._plan(step, rank):
                    found.update(self.objective.extra_examples(idx, group, self.data.train, self.config.max_length))
        if found:
            keys = sorted(found)
            logps, _ = reference([found[k] for k in keys], f"{self.objective.name} extra")
            self.extra_ref = dict(zip(keys, logps.tolist()))

    @staticmethod
    def count(config: TrainConfig, data: PreparedData, engine: Engine) -> tuple[int, float]:
        """(optimizer steps of the run, steps per epoch)."""
        per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps * engine.world
        return count_steps(config, len(data.units), per_step)

    def announce(self) -> None:
        c, e = self.config, self.engine
        unit = "pairs" if self.objective.paired else "prompts" if self.objective.needs.grouped else "examples"
        e.say(f"Training {self.objective.name} on {len(self.data.units)} {unit}: {self.total_steps} steps of "
              f"{self.units_per_step} ({self.micro} × {self.accumulation} accumulation × {e.world} processes), "
              f"{'LoRA' if c.use_lora else 'full fine-tune'}, {e.precision} on {e.device}")

    def step_batches(self, step: int) -> list[tuple[list[int], list[int], int]]:
        batches = self._plan(step, self.engine.rank)
        self.seen.update((step, i) for idx, _, _ in batches for i in idx)
        return batches

    def micro_step(self, module, batch) -> MicroStep:
        idx, group, n_step = batch
        # a process with no data left in this step still takes part, on a placeholder unit that weighs nothing
        present = idx or self.data.units[0]
        valid = torch.full((len(present),), bool(idx), device=self.engine.device)
        device, rows = self.engine.device, torch.tensor(present)
        examples = [self.data.train[i] for i in present]
        tensors = collate_packed(examples) if self.config.packing else collate(examples, self.pad_token_id)
        extra = {k: tensors[k].to(device) for k in ("position_ids", "sequence_ids") if k in tensors}
        extra_logps = self._extra_logps(idx, group)  # before the step's forward: no pass between it and backward
        policy = module(tensors["input_ids"].to(device), tensors["attention_mask"].to(device),
                        tensors["completion_mask"].to(device), **extra)
        labels = tensors["labels"].to(device)
        inputs = StepInputs(
            policy_logps=policy, ref_logps=self.ref_logps[rows].to(device), labels=labels,
            weights=self.udm.weights[rows].to(device) if self.udm else None,
            n_tokens=tensors["completion_lengths"].to(device), gather=self.engine.gather_rows, valid=valid,
            groups=self.unit_of[rows].to(device), ranks=self.ranks[rows].to(device),
            clusters=self.clusters[rows].to(device) if self.clusters is not None else None)
        if extra_logps is not None:
            inputs.extra_policy_logps, inputs.extra_ref_logps = extra_logps
        result = self.objective.loss(inputs)
        stats = {"loss": result.losses, "reward": result.rewards, "label": labels}
        if self.udm:
            stats.update(udm_weight=inputs.weights, udm_clipped=self.udm.clipped[rows].to(device))
        stats = {name: values[valid] for name, values in stats.items()}
        # the sum over the micro-batch / the examples of the whole step: the mean over the step once summed
        return MicroStep((result.losses * valid).sum() / n_step, stats,
                         tokens=int(tensors["n_tokens"]) if idx else 0, samples=len(idx))

    def _extra_logps(self, idx: list[int], group: list[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The policy's log-probs (no gradient) and the cached reference ones of the method's extra examples for this
        micro-batch (KTO's mismatched pairs). With sharded weights every process runs this forward pass through the
        engine's module, on a stand-in example where it has none of its own."""
        extra = self.objective.extra_examples(idx, group, self.data.train, self.config.max_length)
        in_step = self.engine.sharded and self.extra_ref
        if not extra and not in_step:
            return None
        device = self.engine.device
        tensors = collate([example for _, example in extra] or self.data.train[:1], self.pad_token_id)
        args = (tensors["input_ids"].to(device), tensors["attention_mask"].to(device),
                tensors["completion_mask"].to(device))
        scorer = self.engine.scorer(self.model)
        with torch.no_grad():
            logps = (scorer(*args) if isinstance(scorer, CompletionLogps)
                     else completion_logps(self.model, *args, self.config.logps_chunk_size))
        if not extra:
            return None
        return logps, torch.tensor([self.extra_ref[key] for key, _ in extra], device=device)

    def log_line(self, stats: dict[str, torch.Tensor]) -> dict:
        if not stats:  # every step since the last line was skipped as non-finite
            return {"loss": None, "rewards_up": None, "rewards_down": None, "margin": None,
                    **self.objective.metrics(), "accuracy": None}
        rewards, labels = stats["reward"], stats["label"]
        up, down = rewards[labels], rewards[~labels]
        return {"loss": float(stats["loss"].mean()),
                "rewards_up": float(up.mean()) if len(up) else None,
                "rewards_down": float(down.mean()) if len(down) else None,
                "margin": float(up.mean() - down.mean()) if len(up) and len(down) else None,
                **self.objective.metrics(), "accuracy": self.objective.accuracy(rewards, labels),
                **udm_window_stats(stats)}

    def format_line(self, m: dict) -> str:
        def f(v, spec=".4f"):
            return "n/a" if v is None else format(v, spec)

        return (f"step {m['step']}: loss {f(m['loss'])}  reward 👍 {f(m['rewards_up'])}  👎 {f(m['rewards_down'])}  "
                f"margin {f(m['margin'])}  " + (f"δ {f(m['delta'])}  " if "delta" in m else "")
                + (f"z_ref {f(m['z_ref'])}  " if "z_ref" in m else "")
                + f"acc {f(m['accuracy'], '.3f')}  lr {m['lr']:.2e}  "
                f"{m['samples_per_s']:.2f} samples/s  {m['tokens_per_s']:.0f} tokens/s")

    def state_dict(self) -> dict:
        return {"objective": self.objective.state_dict(), "history": dict(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.objective.load_state_dict(state["objective"])
        self.history = dict(state.get("history", {}))


@torch.no_grad()
def held_out_classifier(model, examples, ref_logps, objective: Objective, pad_token_id: int, config: TrainConfig,
                        engine: Engine) -> dict:
    """Implicit-reward classifier on held-out examples: r − threshold > 0 predicts 👍 (δ is frozen here)."""
    logps = batched_logps(model, examples, pad_token_id, config.eval_batch_size, engine.device, engine.autocast,
                          config.logps_chunk_size, desc="evaluating", disable_bar=engine.quiet)
    rewards = config.beta * (logps - ref_logps)
    labels = torch.tensor([e.label for e in examples])
    metrics = implicit_classifier_report(rewards - objective.threshold, labels)
    if objective.paired:
        metrics["pair_accuracy"] = objective.accuracy(rewards, labels)
    return metrics


def format_eval(m: dict) -> str:
    auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
    return (f"accuracy {m['accuracy']:.3f}, ROC AUC {auc} (👍 {m['accuracy_up']:.3f}, 👎 {m['accuracy_down']:.3f}; "
            f"{m['n']} examples)")


def _summary(config, engine: Engine, task: PolicyTask, model_dir, ref_from_cache: bool, udm, last_line) -> dict:
    shards = [set(map(tuple, shard)) for shard in engine.gather_objects(sorted(task.seen))]
    return {
        "world_size": engine.world,
        "examples_per_process": [len(x) for x in shards],
        "examples_on_several_processes": len(set.intersection(*shards)) if engine.world > 1 else 0,
        "method": task.objective.name, "model": config.model, "model_dir": str(model_dir),
        "steps": task.total_steps, "data": task.data.report, "reference_logps_from_cache": ref_from_cache,
        **({"udm": udm.stats} if udm else {}),
        "reward_shift": task.objective.state_dict(), "threshold": task.objective.threshold,
        "final_metrics": last_line, **task.history, "settings": config.to_dict(),
        **({"peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30} if torch.cuda.is_available() else {}),
    }


def _finish(config: TrainConfig, engine: Engine, run: RunDir, model, tokenizer, model_dir, summary: dict,
            answers: dict[str, list[str]] | None) -> None:
    """Main process: the final model folder, the judged comparison (of `answers`, when generated on the shards),
    summary.json and the report."""
    tokens = get_method(config.method).needs.reward_tokens
    if tokens:
        model.config.thumbalign_reward_tokens = {"up": tokens[0], "down": tokens[1]}
    engine.say(f"Saved the model to {save_policy(run, model, tokenizer, config, model_dir)}")
    if config.eval_prompts:
        judge = load_judge(config.judge, config.reference_field)
        summary["judged"] = compare_with_base(config, run, model_dir, config.eval_prompts, judge,
                                              config.eval_max_new_tokens, engine.say, answers)
    engine.say(f"Run summary: {run.write_summary(summary)}")
    complete_model_folder(run, summary, config, model_dir)
    if config.report:
        engine.say(f"Report: {write_report(run.path)}")
