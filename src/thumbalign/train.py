"""The training loop: one trainer for every binary-feedback method; a method only supplies its loss.

Order of events in a run:
  records (data.py) -> tokens (tokens.py) -> reference log-probs, cached (refcache.py)
  -> for each optimizer step: policy log-probs (logprobs.py) -> loss (losses.py) -> AdamW step
  -> checkpoints (checkpoint.py) -> final model folder + summary.json
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import TrainConfig
from .batching import micro_batches, mismatched_example, prepare_data
from .errors import ConfigError, ThumbalignError
from .evaluate import implicit_classifier_report
from .logprobs import CompletionLogps, collate, collate_packed, completion_logps
from .objectives import METHODS, StepInputs, mismatched_pairs
from .models import add_lora, bf16_available, cache_root, load_causal_lm, load_tokenizer, resolve_model
from . import refcache
from .refcache import cache_key, compute_logps
from .udm import DensityRatio, embed_texts, fit_density_ratio, policy_prompt_embeddings, weight_stats

# Settings that may change between an interrupted run and its resumption; all others must match.
RESUMABLE_CHANGES = {"resume", "overwrite", "logging_steps", "save_steps", "save_total_limit", "cache_dir",
                     "eval_batch_size", "output_dir", "eval_prompts", "judge", "reference_field",
                     "eval_max_new_tokens", "eval_temperature", "report", "skip_nonfinite", "skip_invalid",
                     "num_processes", "accelerate_config"}
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", "model", "run_config.yaml", "udm_classifier.json",
             "generations.jsonl", "report.html")


# ------------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, examples, ref_logps, objective, pad_id, config, device, autocast, disable_bar) -> dict:
    """Implicit-reward classifier on held-out examples: r − δ > 0 predicts 👍. δ is frozen here."""
    if not examples:
        return {}
    logps = compute_logps(model, examples, pad_id, config.eval_batch_size, device, autocast,
                          config.logps_chunk_size, desc="evaluating", disable_bar=disable_bar)
    rewards = config.beta * (logps - ref_logps)
    labels = torch.tensor([e.label for e in examples])
    metrics = implicit_classifier_report(rewards - objective.threshold, labels)
    if objective.data_kind == "paired":
        metrics["pair_accuracy"] = objective.accuracy(rewards, labels)
    return metrics


# ------------------------------------------------------------------------------------------------- run folder

def _prepare_output_dir(config: TrainConfig) -> tuple[Path, Path | None]:
    out = Path(config.output_dir)
    checkpoints = out / "checkpoints"
    ckpt.remove_stale_staging(checkpoints)
    if config.resume:
        if config.resume == "latest":
            found = ckpt.list_checkpoints(checkpoints)
            if not found:
                raise ConfigError(f"--resume: no complete checkpoint in {checkpoints}")
            resume_from = found[-1]
        else:
            resume_from = Path(config.resume)
            if not (resume_from / ckpt.STATE_FILE).exists():
                raise ConfigError(f"--resume {config.resume}: not a complete checkpoint folder")
        saved = yaml.safe_load((out / "run_config.yaml").read_text()) if (out / "run_config.yaml").exists() else {}
        changed = [k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v]
        if changed:
            raise ConfigError("--resume with settings that differ from the interrupted run: "
                              + ", ".join(f"{k} {saved[k]!r} -> {getattr(config, k)!r}" for k in changed))
        return out, resume_from
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if existing and not config.overwrite:
        raise ConfigError(f"{out} already holds a run ({', '.join(existing)}); continue it with --resume "
                          "or replace it with --overwrite")
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out, None


def _trim_metrics(path: Path, last_step: int) -> None:
    """A resumed run re-logs the steps after its checkpoint; drop the lines the interrupted run wrote for them."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
    path.write_text("".join(l + "\n" for l in kept))


# ------------------------------------------------------------------------------------------------- the run

def train(config: TrainConfig, log=print) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed

    out, resume_from = _prepare_output_dir(config)
    probe_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_bf16 = config.bf16 == "true" or (config.bf16 == "auto" and bf16_available(probe_device))
    # On a machine without an accelerator, cpu=True is what makes accelerate join processes started by
    # torch.distributed.run into one gloo group (MULTI_CPU) instead of running them as unlinked copies.
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not has_accelerator)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    is_main = accelerator.is_main_process
    quiet = not is_main
    say = log if is_main else (lambda *a, **k: None)
    set_seed(config.seed)

    model_dir = resolve_model(config.model, config.cache_dir) if is_main else None
    model_dir = Path(gather_object([str(model_dir)] if is_main else [""])[0]) if world > 1 else model_dir
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    objective_cls = METHODS[config.method]
    data = prepare_data(config, tokenizer, objective_cls, log=say)
    model = load_causal_lm(model_dir, config.trust_remote_code).to(device)

    # Reference log-probs: the freshly loaded model is the reference. Cached on disk across runs.
    precision = "bf16" if use_bf16 else "fp32"
    root = cache_root(config.cache_dir)

    def reference(examples, what):
        path = refcache.cache_path(root, cache_key(model_dir, examples, precision))
        # every process must take the same branch: the main process's view of the cache decides
        hit = gather_object([path.exists()])[0] if world > 1 else path.exists()
        if hit:
            say(f"Reference log-probs for {len(examples)} {what} examples loaded from cache ({path.stem})")
            return refcache.load_cached(path), True
        say(f"Computing reference log-probs for {len(examples)} {what} examples (cached for later runs)")
        mine = examples[rank::world]  # each process computes a shard
        logps = compute_logps(model, mine, tokenizer.pad_token_id, config.eval_batch_size, device,
                              accelerator.autocast, config.logps_chunk_size, disable_bar=quiet)
        if world > 1:
            full = torch.zeros(len(examples))
            for r, values in gather_object([(rank, logps.tolist())]):
                full[r::world] = torch.tensor(values)
            logps = full
        if is_main:
            refcache.store(path, logps)  # written once
        accelerator.wait_for_everyone()
        return logps, False

    ref_train, hit_train = reference(data.train, "training")
    ref_eval, _ = reference(data.eval, "evaluation") if data.eval else (torch.zeros(0), True)

    udm_weights, udm_clipped, udm_stats = None, None, {}
    if config.udm:
        udm_weights, udm_clipped, udm_stats = _udm_weights(config, data, model, tokenizer, out, resume_from is not None,
                                                           accelerator, root, say)

    if config.use_lora:
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_up = sum(e.label for e in data.train)
    objective = objective_cls(config, n_up, len(data.train) - n_up, log=say)

    micro, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    global_batch = micro * accumulation * world
    steps_per_epoch = math.ceil(len(data.units) / global_batch)
    total_steps = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)

    def gather(t: torch.Tensor) -> torch.Tensor:
        """All-gather across processes; bool tensors travel as bytes (gloo has no bool collectives)."""
        return accelerator.gather(t.to(torch.uint8)).bool() if t.dtype == torch.bool else accelerator.gather(t)

    def plan(step):
        return micro_batches(data, step, micro, accumulation, world, rank, config.seed)

    kl_ref = {}
    if objective.uses_kl:
        # The mismatched pairs of every micro-batch of the run are known in advance (the sampler is a function of
        # the step), so their reference log-probs are computed once and cached like the others.
        pairs = sorted({pair for step in range(total_steps) for r in range(world)
                        for idx in micro_batches(data, step, micro, accumulation, world, r, config.seed)[0]
                        for pair in mismatched_pairs(idx)})
        if pairs:
            kl_examples = [mismatched_example(data.train[i], data.train[j], config.max_length) for i, j in pairs]
            kl_logps, _ = reference(kl_examples, "mismatched (KL)")
            kl_ref = dict(zip(pairs, kl_logps.tolist()))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                              num_warmup_steps=int(round(config.warmup_ratio * total_steps)),
                              num_training_steps=total_steps)
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP or (kind == DistributedType.DEEPSPEED
                                        and accelerator.state.deepspeed_plugin.zero_stage >= 3):
        raise ConfigError("ZeRO-3 and FSDP shard the weights, and thumbalign's checkpoints and evaluation do not gather "
                          "them yet: use --accelerate-config ddp or zero2")
    engine, optimizer = accelerator.prepare(CompletionLogps(model, config.logps_chunk_size), optimizer)
    core = accelerator.unwrap_model(engine).model  # the transformers model, for evaluation and saving

    autocast = accelerator.autocast
    eval_args = (tokenizer.pad_token_id, config, device, autocast, quiet)
    start_step, history = 0, {}
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, core, optimizer, scheduler)
        objective.load_state_dict(state["objective"])
        start_step, history = state["step"], state.get("history", {})
        resumed_nonfinite = state.get("nonfinite", 0)
        saved_batch = state.get("global_batch", global_batch)
        if saved_batch != global_batch:  # which examples a step holds depends on it
            raise ConfigError(f"--resume: the interrupted run's steps held {saved_batch} units, this one's would hold "
                              f"{global_batch} (batch × accumulation × processes); keep them equal to resume")
        if is_main:
            _trim_metrics(out / "metrics.jsonl", start_step)
        accelerator.wait_for_everyone()
        say(f"Resumed from {resume_from} at step {start_step} of {total_steps}")
    else:
        if is_main:
            (out / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if data.eval:
            # Before the first step the policy is the reference, so every implicit reward is 0 by definition:
            # the classifier is at chance, and no forward pass is needed to know it.
            labels = torch.tensor([e.label for e in data.eval])
            history["eval_before"] = implicit_classifier_report(torch.zeros(len(data.eval)), labels)
            say(f"Held-out implicit-reward classifier before training: {_fmt_eval(history['eval_before'])}")

    unit = "pairs" if objective.data_kind == "paired" else "examples"
    say(f"Training {objective.name} on {len(data.units)} {unit}: {total_steps} steps of {global_batch} "
        f"({micro} × {config.gradient_accumulation_steps} accumulation × {world} processes), "
        f"{'LoRA' if config.use_lora else 'full fine-tune'}, {'bf16' if use_bf16 else 'fp32'} on {device}")
    metrics_file = out / "metrics.jsonl"
    window = _Window(gather if world > 1 else None)
    nonfinite = resumed_nonfinite if resume_from is not None else 0
    seen: set[tuple[int, int]] = set()  # (step, example) pairs this process trained on, to report the data split
    bar = tqdm(total=total_steps, initial=start_step, desc="training", unit="step", disable=quiet, dynamic_ncols=True)
    engine.train()
    last_metrics = {}
    for step in range(start_step, total_steps):
        batches, n_step = plan(step)
        seen.update((step, i) for idx in batches for i in idx)
        objective_state, window_mark = objective.state_dict(), window.mark()
        for m, idx in enumerate(batches):
            rows_ = [data.train[i] for i in idx]
            batch = collate_packed(rows_) if config.packing else collate(rows_, tokenizer.pad_token_id)
            last = m == len(batches) - 1
            # DeepSpeed steps inside backward() when gradients are synced: tell accelerate which micro-batch ends the step
            accelerator.gradient_state._set_sync_gradients(last)
            sync = nullcontext() if last else accelerator.no_sync(engine)
            with sync, autocast():
                extra = {k: batch[k].to(device) for k in ("position_ids", "sequence_ids") if k in batch}
                policy = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                batch["completion_mask"].to(device), **extra)
                rows = torch.tensor(idx)
                inputs = StepInputs(
                    policy_logps=policy, ref_logps=ref_train[rows].to(device), labels=batch["labels"].to(device),
                    weights=udm_weights[rows].to(device) if udm_weights is not None else None,
                    n_tokens=batch["completion_lengths"].to(device),
                    gather=gather if world > 1 else (lambda t: t))
                if objective.uses_kl and (pairs := mismatched_pairs(idx)):
                    kl = collate([mismatched_example(data.train[i], data.train[j], config.max_length)
                                  for i, j in pairs], tokenizer.pad_token_id)
                    with torch.no_grad():
                        inputs.kl_policy_logps = completion_logps(
                            core, kl["input_ids"].to(device), kl["attention_mask"].to(device),
                            kl["completion_mask"].to(device), config.logps_chunk_size)
                    inputs.kl_ref_logps = torch.tensor([kl_ref[p] for p in pairs], device=device)
                result = objective.loss(inputs)
                # sum over the micro-batch / examples in the whole step, × world because DDP averages gradients
                loss = result.losses.sum() * world / n_step
                accelerator.backward(loss)
            window.add(result, inputs.labels, int(batch["n_tokens"]), len(idx),
                       None if udm_weights is None else (inputs.weights.cpu(), udm_clipped[rows]))
        # the norm is taken over the synchronised gradients, so every process sees the same verdict
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        done = step + 1
        if not torch.isfinite(torch.as_tensor(grad_norm)) or not window.finite_since(window_mark):
            nonfinite += 1
            optimizer.zero_grad(set_to_none=True)
            objective.load_state_dict(objective_state)  # δ must not absorb the bad rewards
            window.rollback(window_mark)
            latest = ckpt.list_checkpoints(out / "checkpoints")
            if nonfinite > config.skip_nonfinite:
                bar.close()
                raise ThumbalignError(
                    f"step {done}: the loss or the gradient is not finite (NaN/inf); stopped without updating the "
                    f"weights. Last good checkpoint: {latest[-1] if latest else 'none yet'}. Continue with --resume "
                    "(perhaps with a lower --learning-rate), or tolerate such steps with --skip-nonfinite N")
            say(f"step {done}: non-finite loss or gradient, step skipped ({nonfinite} of --skip-nonfinite "
                f"{config.skip_nonfinite})")
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        bar.update(1)
        if done % config.logging_steps == 0 or done == total_steps:
            last_metrics = window.flush(done, done / steps_per_epoch, scheduler.get_last_lr()[0],
                                        float(grad_norm), objective)
            last_metrics["skipped_nonfinite_steps"] = nonfinite
            if is_main:
                with open(metrics_file, "a") as handle:
                    handle.write(json.dumps(last_metrics) + "\n")
                bar.write(_fmt_metrics(last_metrics))
                if last_metrics["loss"] is not None:
                    bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", acc=f"{last_metrics['accuracy']:.2f}")
        if done % config.save_steps == 0 or done == total_steps:
            failure = None
            if is_main:
                try:
                    ckpt.save_checkpoint(out / "checkpoints", done, core, optimizer, scheduler,
                                         {"step": done, "objective": objective.state_dict(), "history": history,
                                          "total_steps": total_steps, "nonfinite": nonfinite,
                                          "global_batch": global_batch, "world_size": world},
                                         config.save_total_limit)
                except OSError as err:
                    failure = str(err.strerror or err)
            if world > 1:  # every process learns of a failed save, instead of waiting for the main one forever
                failure = gather_object([failure])[0]
            if failure:
                bar.close()
                raise ThumbalignError(f"could not write the checkpoint of step {done} ({failure}); "
                                      f"the earlier checkpoints in {out / 'checkpoints'} are intact")
    bar.close()

    if data.eval:
        history["eval_after"] = evaluate(core, data.eval, ref_eval, objective, *eval_args)
        say(f"Held-out implicit-reward classifier after training:  {_fmt_eval(history['eval_after'])}")

    shards = gather_object([sorted(seen)]) if world > 1 else [sorted(seen)]
    shard_sets = [set(map(tuple, shard)) for shard in shards]
    summary = {
        "world_size": world,
        "examples_per_process": [len(x) for x in shard_sets],
        "examples_on_several_processes": len(set.intersection(*shard_sets)) if world > 1 else 0,
        "method": objective.name, "model": config.model, "model_dir": str(model_dir),
        "steps": total_steps, "data": data.report, "reference_logps_from_cache": hit_train,
        **({"udm": udm_stats} if config.udm else {}),
        "reward_shift": objective.state_dict(), "threshold": objective.threshold, "final_metrics": last_metrics,
        **history,
        "settings": config.to_dict(),
    }
    if is_main:
        _save_final_model(core, tokenizer, out / "model", config)
        say(f"Saved the model to {out / 'model'}")
        if config.eval_prompts:
            summary["judged"] = _judged_eval(config, out, model_dir, say)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
        say(f"Run summary: {out / 'summary.json'}")
        if config.report:
            from .report import write_report

            say(f"Report: {write_report(out)}")
    accelerator.wait_for_everyone()
    return summary


def _judged_eval(config: TrainConfig, out: Path, base_dir: Path, say) -> dict:
    """The base and the trained model answer held-out prompts; the judge decides; bootstrap intervals."""
    from .generate import format_comparison, judged_generations
    from .judges import load_judge

    if config.use_lora and config.save_adapter:
        say("Generation eval skipped: the run saved an adapter only (drop --save-adapter to compare)")
        return {}
    judge = load_judge(config.judge, config.reference_field)
    result = judged_generations({"trained": out / "model", "base": base_dir}, config.eval_prompts, judge,
                                out / "generations.jsonl", max_new_tokens=config.eval_max_new_tokens,
                                temperature=config.eval_temperature, seed=config.seed,
                                batch_size=config.eval_batch_size)
    say(f"Held-out prompts answered by both models, judged by {config.judge}:\n{format_comparison(result)}")
    return result


def _udm_weights(config, data, model, tokenizer, out: Path, resuming: bool, accelerator, cache: Path, say):
    """Fit (or, on resume, reload) the prompt density-ratio classifier; return per-example weights, clipped flags
    and the weight statistics of the 👎 examples. The main process fits and saves; the others read its file."""
    quiet = not accelerator.is_main_process
    if config.udm_encoder == "policy":
        embeddings = policy_prompt_embeddings(model, data.train, tokenizer.pad_token_id, config.eval_batch_size,
                                              accelerator.device, disable_bar=quiet)
    else:
        embeddings = embed_texts(data.train_prompts, config.udm_encoder, cache_dir=cache, disable_bar=quiet)
    labels = np.array([e.label for e in data.train])
    path = out / "udm_classifier.json"
    if accelerator.is_main_process and not (resuming and path.exists()):
        ratio = fit_density_ratio(embeddings, labels, per_class=config.udm_samples_per_class, seed=config.seed,
                                  clip_min=config.udm_clip_min, clip_max=config.udm_clip_max,
                                  normalize=config.udm_normalize)
        ratio.save(path)
        say(f"UDM: fitted the prompt classifier on up to {config.udm_samples_per_class} prompts per class "
            f"({config.udm_encoder} embeddings), saved to {path}")
    elif resuming:
        say(f"UDM: reloaded the prompt classifier from {path}")
    accelerator.wait_for_everyone()
    ratio = DensityRatio.load(path)
    raw = np.clip(ratio.raw_ratio(embeddings), ratio.clip_min, ratio.clip_max)
    clipped = np.isclose(raw, ratio.clip_min) | np.isclose(raw, ratio.clip_max)
    weights = ratio.weights(embeddings)
    stats = weight_stats(weights[~labels], ratio)
    counts, edges = np.histogram(weights[~labels], bins=30)
    stats["histogram"] = {"counts": counts.tolist(), "edges": edges.tolist()}
    say(f"UDM weights of the 👎 examples: min {stats['min']:.3f}, mean {stats['mean']:.3f}, max {stats['max']:.3f}, "
        f"{stats['share_clipped']:.1%} clipped to [{ratio.clip_min}, {ratio.clip_max}]")
    return torch.tensor(weights, dtype=torch.float32), torch.tensor(clipped), stats


def _save_final_model(model, tokenizer, target: Path, config: TrainConfig) -> None:
    staging = target.with_name(target.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    if config.use_lora and config.save_adapter:
        model.save_pretrained(staging)
    else:
        if config.use_lora:
            # in place: training is over, and a merged copy would add a whole model to the run's peak memory
            model = model.merge_and_unload()
        model.config.use_cache = True
        model.save_pretrained(staging, safe_serialization=True)
        model.config.use_cache = False
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


# ------------------------------------------------------------------------------------------------- metrics

class _Window:
    """Accumulates per-example numbers between two log lines, from every process."""

    def __init__(self, gather=None):
        self.gather = gather or (lambda t: t)
        self.reset()

    def mark(self) -> tuple[int, int, int, int]:
        return len(self.losses), len(self.udm_weights), self.tokens, self.samples

    def finite_since(self, mark) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.losses[mark[0]:])

    def rollback(self, mark) -> None:
        """Forget a skipped step's numbers."""
        for items in (self.losses, self.rewards, self.labels):
            del items[mark[0]:]
        for items in (self.udm_weights, self.udm_clipped):
            del items[mark[1]:]
        self.tokens, self.samples = mark[2], mark[3]

    def reset(self):
        self.losses, self.rewards, self.labels = [], [], []
        self.udm_weights, self.udm_clipped = [], []
        self.tokens, self.samples, self.start = 0, 0, time.perf_counter()

    def add(self, result, labels, tokens, samples, udm=None):
        if udm is not None:  # UDM weights and clipped flags of this micro-batch's 👎 examples
            down = ~labels.cpu()
            self.udm_weights.append(udm[0][down])
            self.udm_clipped.append(udm[1][down])
        g = self.gather
        self.losses.append(g(result.losses.detach().float()).cpu())
        self.rewards.append(g(result.rewards.float()).cpu())
        self.labels.append(g(labels).cpu())
        counts = g(torch.tensor([tokens, samples], device=labels.device).unsqueeze(0)).sum(0)
        self.tokens += int(counts[0])
        self.samples += int(counts[1])

    def flush(self, step, epoch, lr, grad_norm, objective) -> dict:
        grad_norm = grad_norm if math.isfinite(grad_norm) else None
        if not self.losses:  # every step since the last line was skipped as non-finite
            self.reset()
            return {"step": step, "epoch": round(epoch, 4), "loss": None, "rewards_up": None, "rewards_down": None,
                    "margin": None, **objective.metrics(), "accuracy": None, "lr": lr, "grad_norm": grad_norm,
                    "samples_per_s": 0.0, "tokens_per_s": 0.0}
        losses, rewards, labels = torch.cat(self.losses), torch.cat(self.rewards), torch.cat(self.labels)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        up, down = rewards[labels], rewards[~labels]
        accuracy = objective.accuracy(rewards, labels)
        out = {
            "step": step, "epoch": round(epoch, 4), "loss": float(losses.mean()),
            "rewards_up": float(up.mean()) if len(up) else None,
            "rewards_down": float(down.mean()) if len(down) else None,
            "margin": float(up.mean() - down.mean()) if len(up) and len(down) else None,
            **objective.metrics(), "accuracy": accuracy, "lr": lr, "grad_norm": grad_norm,
            "samples_per_s": self.samples / elapsed, "tokens_per_s": self.tokens / elapsed,
        }
        if self.udm_weights and sum(len(w) for w in self.udm_weights):
            w, clipped = torch.cat(self.udm_weights), torch.cat(self.udm_clipped)
            out.update(udm_weight_min=float(w.min()), udm_weight_mean=float(w.mean()), udm_weight_max=float(w.max()),
                       udm_share_clipped=float(clipped.float().mean()))
        self.reset()
        return out


def _fmt_metrics(m: dict) -> str:
    def f(v, spec=".4f"):
        return "n/a" if v is None else format(v, spec)

    return (f"step {m['step']}: loss {f(m['loss'])}  reward 👍 {f(m['rewards_up'])}  👎 {f(m['rewards_down'])}  "
            f"margin {f(m['margin'])}  " + (f"δ {f(m['delta'])}  " if "delta" in m else "")
            + (f"z_ref {f(m['z_ref'])}  " if "z_ref" in m else "")
            + f"acc {f(m['accuracy'], '.3f')}  lr {m['lr']:.2e}  "
            f"{m['samples_per_s']:.2f} samples/s  {m['tokens_per_s']:.0f} tokens/s")


def _fmt_eval(m: dict) -> str:
    auc = "n/a" if m.get("auc") is None else f"{m['auc']:.3f}"
    return (f"accuracy {m['accuracy']:.3f}, ROC AUC {auc} (👍 {m['accuracy_up']:.3f}, 👎 {m['accuracy_down']:.3f}; "
            f"{m['n']} examples)")
