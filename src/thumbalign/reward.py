"""A binary reward model: P(👍 | prompt, answer), trained directly on thumbs with binary cross-entropy.

A sequence-classification head with one logit sits on a causal-LM backbone; the score is read at the last
non-padding token (the rule transformers' *ForSequenceClassification models use, so the saved folder scores the
same elsewhere). Optional: UDM weights on 👎 examples, class-balance weights, LoRA, and temperature scaling fitted on
the held-out split so that σ(logit / T) is a calibrated probability.
"""

from __future__ import annotations

import json
import math
import shutil
from contextlib import nullcontext
from dataclasses import field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .batching import micro_batches, prepare_data
from .config import derived_config
from .errors import ConfigError, ThumbalignError
from .evaluate import expected_calibration_error, implicit_classifier_report
from .logprobs import collate
from .models import add_lora, bf16_available, cache_root, load_tokenizer, resolve_model
from .tokens import Example, encode_record

SHARED = ("data", "eval_data", "eval_split", "skip_invalid", "output_dir", "overwrite", "model", "trust_remote_code",
          "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "udm", "udm_encoder",
          "udm_samples_per_class", "udm_clip_min", "udm_clip_max", "udm_normalize", "max_length", "learning_rate",
          "weight_decay", "per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
          "max_steps", "warmup_ratio", "lr_scheduler_type", "max_grad_norm", "bf16", "gradient_checkpointing", "seed",
          "logging_steps", "save_steps", "save_total_limit", "resume", "cache_dir", "eval_batch_size")

RewardConfig = derived_config(
    "RewardConfig", SHARED,
    defaults={"output_dir": "runs/reward", "learning_rate": 2e-5, "eval_split": 0.1, "max_length": 512},
    extra=[("balance_classes", bool, field(default=True, metadata={
               "help": "Weight the classes so that 👍 and 👎 count equally in the loss."})),
           ("calibrate", bool, field(default=True, metadata={
               "help": "Fit a temperature on the held-out split so that scores are calibrated probabilities."}))],
    doc="Settings of `thumbalign reward train` (shared settings mean what they mean for `thumbalign train`).")


def _validate(self):
    if not self.data:
        raise ConfigError("no training data: pass --data FILE")
    if self.udm and self.udm_encoder == "policy":
        raise ConfigError("reward models take --udm-encoder minilm or a sentence-transformers folder, not 'policy'")
    if self.per_device_train_batch_size <= 0 or self.max_length <= 1:
        raise ConfigError("batch size and max_length must be positive")


RewardConfig.validate = _validate


class _RM:
    """Stands in for an objective in batching.prepare_data: unpaired, both labels."""

    name, data_kind, needs_both_labels, train_labels = "reward", "unpaired", True, (True, False)


# ------------------------------------------------------------------------------------------------- scoring

def last_token_index(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id) -> torch.Tensor:
    """Position of the last real, non-pad token of each row (as transformers' sequence classifiers pick it)."""
    keep = attention_mask.bool()
    if pad_token_id is not None:
        keep = keep & (input_ids != pad_token_id)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return (positions * keep).argmax(-1)


class RewardScores(torch.nn.Module):
    """forward(batch) = one logit per sequence; the module the training engine wraps."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = last_token_index(input_ids, attention_mask, self.model.config.pad_token_id)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.model.score(pooled).squeeze(-1).float()


def load_reward_model(path, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                               trust_remote_code=trust_remote_code)
    return model


@torch.no_grad()
def score_examples(model, examples: list[Example], pad_token_id: int, batch_size: int = 16,
                   progress: bool = False) -> torch.Tensor:
    """Raw logits, in input order (batches sorted by length for little padding)."""
    model.eval()
    scorer = RewardScores(model)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = torch.zeros(len(examples))
    for start in tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=not progress):
        idx = order[start:start + batch_size]
        batch = collate([examples[i] for i in idx], pad_token_id)
        out[idx] = scorer(batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)).cpu()
    return out


def temperature_of(model) -> float:
    return float(getattr(model.config, "thumbalign_temperature", 1.0) or 1.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the held-out log-loss of σ(logit / T) (Guo et al., 2017); one parameter, so it cannot
    change the ranking (accuracy and AUC stay as they are)."""
    log_t = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)
    target = labels.float()

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(logits / log_t.exp(), target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> dict:
    which = torch.clamp((probs * bins).long(), max=bins - 1)
    out = {"confidence": [], "frequency": [], "count": []}
    for b in range(bins):
        mask = which == b
        out["count"].append(int(mask.sum()))
        out["confidence"].append(float(probs[mask].mean()) if mask.any() else None)
        out["frequency"].append(float(labels[mask].float().mean()) if mask.any() else None)
    return out


# ------------------------------------------------------------------------------------------------- training

def train_reward_model(config, log=print) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from .train import _prepare_output_dir, _trim_metrics, _udm_weights

    out, resume_from = _prepare_output_dir(config)
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    use_bf16 = config.bf16 == "true" or (config.bf16 == "auto" and bf16_available(
        torch.device("cuda" if torch.cuda.is_available() else "cpu")))
    accelerator = Accelerator(mixed_precision="bf16" if use_bf16 else "no", cpu=not has_accel)
    if accelerator.num_processes > 1:
        raise ConfigError("reward training runs in one process for now")
    device = accelerator.device
    set_seed(config.seed)
    model_dir = resolve_model(config.model, config.cache_dir)
    tokenizer = load_tokenizer(model_dir, config.trust_remote_code)
    data = prepare_data(config, tokenizer, _RM, log=log)
    model = load_reward_model(model_dir, config.trust_remote_code)
    model.config.pad_token_id = tokenizer.pad_token_id
    udm_weights = None
    if config.udm:
        udm_weights, _, udm_stats = _udm_weights(config, data, model, tokenizer, out, resume_from is not None,
                                                 accelerator, cache_root(config.cache_dir), log)
    labels_all = torch.tensor([e.label for e in data.train])
    n_up, n_down = int(labels_all.sum()), int((~labels_all).sum())
    class_weight = {True: len(labels_all) / (2 * n_up), False: len(labels_all) / (2 * n_down)} \
        if config.balance_classes else {True: 1.0, False: 1.0}
    if config.use_lora:
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)
        for name, p in model.named_parameters():  # the new head always trains
            if "score" in name:
                p.requires_grad_(True)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    core_model = model.get_base_model() if config.use_lora else model
    micro, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(data.units) / (micro * accumulation))
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, int(round(config.warmup_ratio * total)), total)
    engine, optimizer = accelerator.prepare(RewardScores(core_model), optimizer)
    start = 0
    if resume_from is not None:
        start = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)["step"]
        _trim_metrics(out / "metrics.jsonl", start)
        log(f"Resumed from {resume_from} at step {start} of {total}")
    else:
        import yaml

        (out / "run_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    log(f"Training a reward model on {len(data.train)} examples ({n_up} 👍, {n_down} 👎): {total} steps")
    metrics_file = out / "metrics.jsonl"
    bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)
    engine.train()
    window = []
    for step in range(start, total):
        batches, n_step = micro_batches(data, step, micro, accumulation, 1, 0, config.seed)
        for m, idx in enumerate(batches):
            batch = collate([data.train[i] for i in idx], tokenizer.pad_token_id)
            labels = batch["labels"].to(device)
            weights = torch.tensor([class_weight[bool(l)] for l in batch["labels"]], device=device)
            if udm_weights is not None:
                weights = torch.where(labels, weights, weights * udm_weights[torch.tensor(idx)].to(device))
            sync = nullcontext() if m == len(batches) - 1 else accelerator.no_sync(engine)
            with sync, accelerator.autocast():
                logits = engine(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none") * weights
                accelerator.backward(losses.sum() / n_step)
            window.append((losses.detach().cpu(), logits.detach().cpu(), labels.cpu()))
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm if config.max_grad_norm > 0 else math.inf)
        if not torch.isfinite(torch.as_tensor(grad_norm)):
            raise ThumbalignError(f"step {step + 1}: non-finite loss or gradient; stopped without updating")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        done = step + 1
        if done % config.logging_steps == 0 or done == total:
            losses, logits, labels = (torch.cat(x) for x in zip(*window))
            window = []
            line = {"step": done, "loss": float(losses.mean()),
                    "accuracy": float(((logits > 0) == labels).float().mean()), "lr": scheduler.get_last_lr()[0]}
            with open(metrics_file, "a") as handle:
                handle.write(json.dumps(line) + "\n")
            bar.write(f"step {done}: loss {line['loss']:.4f}  acc {line['accuracy']:.3f}  lr {line['lr']:.2e}")
        if done % config.save_steps == 0 or done == total:
            ckpt.save_checkpoint(out / "checkpoints", done, model, optimizer, scheduler, {"step": done, "objective": {}},
                                 config.save_total_limit)
    bar.close()

    final = model.merge_and_unload() if config.use_lora else model
    summary = {"kind": "reward_model", "steps": total, "data": data.report, "settings": config.to_dict()}
    if config.udm:
        summary["udm"] = udm_stats
    if data.eval:
        logits = score_examples(final, data.eval, tokenizer.pad_token_id, config.eval_batch_size)
        labels = torch.tensor([e.label for e in data.eval])
        temperature = fit_temperature(logits, labels) if config.calibrate else 1.0
        held = implicit_classifier_report(logits / temperature, labels)
        held["ece_before_calibration"] = expected_calibration_error(torch.sigmoid(logits), labels)
        held["temperature"] = temperature
        held["reliability"] = reliability_bins(torch.sigmoid(logits / temperature), labels)
        summary["eval"] = held
        final.config.thumbalign_temperature = temperature
        auc = "n/a (one class)" if held["auc"] is None else f"{held['auc']:.3f}"
        log(f"Held-out: accuracy {held['accuracy']:.3f}, ROC AUC {auc}, ECE {held['ece']:.3f} "
            f"(before temperature scaling {held['ece_before_calibration']:.3f}, T = {temperature:.3f})")
    target, staging = out / "model", out / "model.staging"
    shutil.rmtree(staging, ignore_errors=True)
    final.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    from .report import write_report

    log(f"Saved the reward model to {target}; report: {write_report(out)}")
    return summary


# ------------------------------------------------------------------------------------------------- using it

class RewardModel:
    """A trained reward model folder, ready to score (prompt, completion) pairs as calibrated P(👍)."""

    def __init__(self, path, max_length: int = 512, batch_size: int = 16):
        self.tokenizer = load_tokenizer(Path(path))
        self.model = load_reward_model(path).eval()
        self.model.config.pad_token_id = self.model.config.pad_token_id or self.tokenizer.pad_token_id
        self.temperature, self.max_length, self.batch_size = temperature_of(self.model), max_length, batch_size

    def encode(self, record) -> Example:
        prompt, completion = encode_record(self.tokenizer, record)
        completion = completion[:self.max_length - 1]
        prompt = prompt[-(self.max_length - len(completion)):]
        return Example(prompt + completion, len(prompt), bool(record.label), 0)

    def probabilities(self, records) -> np.ndarray:
        examples = [self.encode(r) for r in records]
        logits = score_examples(self.model, examples, self.tokenizer.pad_token_id, self.batch_size)
        return torch.sigmoid(logits / self.temperature).numpy()


def _records_for_scoring(path: str):
    """Rows with a prompt and a completion (label optional), as records."""
    from .data import Record, _text_or_messages, iter_rows

    rows, records = [], []
    for where, row in iter_rows(path):
        if not isinstance(row, dict):
            raise ConfigError(f"{path}, {where}: expected an object")
        if "messages" in row and "completion" not in row:
            from .data import _messages, _split_messages

            prompt, completion = _split_messages(_messages(row["messages"], path, where, "messages"), path, where)
        else:
            for key in ("prompt", "completion"):
                if key not in row:
                    from .errors import DataError

                    raise DataError(path, where, key, "missing")
            prompt = _text_or_messages(row["prompt"], path, where, "prompt")
            completion = _text_or_messages(row["completion"], path, where, "completion")
            if isinstance(prompt, list) and isinstance(completion, str):  # a text answer to a conversation
                completion = [{"role": "assistant", "content": completion}]
            elif isinstance(prompt, str) and isinstance(completion, list):
                raise ConfigError(f"{path}, {where}: a text prompt with a message-list completion")
        rows.append(row)
        records.append(Record(prompt, completion, False, f"{path}, {where}"))
    return rows, records


def score_file(model_path: str, data: str, out: str, max_length: int = 512, batch_size: int = 16) -> int:
    rm = RewardModel(model_path, max_length, batch_size)
    rows, records = _records_for_scoring(data)
    probs = rm.probabilities(records)
    with open(out, "w", encoding="utf-8") as handle:
        for row, p in zip(rows, probs):
            handle.write(json.dumps({**row, "p_up": float(p)}, ensure_ascii=False) + "\n")
    return len(rows)


def rm_judge(path: str, threshold: float = 0.5):
    """`--judge rm:PATH`: thumbs-up when the reward model's P(👍) ≥ threshold."""
    from .data import Record

    rm = RewardModel(path)

    def judge(text, row):
        prompt = row.get("prompt", row.get("messages"))
        completion = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        return bool(rm.probabilities([Record(prompt, completion, False)])[0] >= threshold)

    return judge


def best_of_n(policy: str, rm_path: str, prompts_file: str, out: str, n: int = 4, max_new_tokens: int = 64,
              temperature: float = 1.0, seed: int = 0, batch_size: int = 8) -> int:
    """Sample n answers per prompt, keep the one the reward model likes best, write it as a 👍 training row."""
    from .data import Record
    from .generate import generate, load_prompts
    from .models import load_causal_lm

    model_dir = resolve_model(policy)
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    model.config.use_cache = True
    rm = RewardModel(rm_path)
    prompts = load_prompts(prompts_file)
    written = 0
    with open(out, "w", encoding="utf-8") as handle:
        for where, row in tqdm(prompts, desc="best-of-n", unit="prompt"):
            prompt = row.get("prompt", row.get("messages"))
            answers = []
            for start in range(0, n, batch_size):
                k = min(batch_size, n - start)
                answers += generate(model, tokenizer, [prompt] * k, max_new_tokens, temperature, seed + written * n + start)
            candidates = [a for a in answers if a.strip()]
            if not candidates:
                continue
            records = [Record(prompt, [{"role": "assistant", "content": a}] if isinstance(prompt, list) else a, True)
                       for a in candidates]
            probs = rm.probabilities(records)
            best = int(np.argmax(probs))
            handle.write(json.dumps({"prompt": prompt, "completion": records[best].completion, "label": True,
                                     "p_up": float(probs[best]), "n": len(candidates)}, ensure_ascii=False) + "\n")
            written += 1
    return written
