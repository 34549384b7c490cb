"""`thumbalign reward train`: a binary reward model P(👍 | prompt, answer), trained directly on thumbs with binary
cross-entropy, on the same engine as the policy trainer (checkpoints, resume, non-finite steps, several processes).

Optional: UDM weights on 👎 examples, class-balance weights, LoRA, and temperature scaling fitted on the held-out
split so that σ(logit / T) is a calibrated probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..analysis.metrics import (expected_calibration_error, fit_temperature, implicit_classifier_report,
                                reliability_bins)
from ..analysis.report import write_report
from ..data.batching import collate, micro_batches
from ..data.prepare import DataNeeds, PreparedData, data_sources, prepare_data
from ..engine.loop import Engine, MicroStep
from ..engine.models import empty_model
from ..engine.reward_model import RewardScores, load_reward_model, score_examples
from .final_model import complete_model_folder, save_reward_model
from .model_setup import make_trainable
from .prompt_embeddings import UDMWeights, fit_udm, udm_window_stats
from .skeleton import Trainer, count_steps, data_fingerprint

REWARD_DATA = DataNeeds("reward")


def train_reward_model(config, log=print) -> dict:
    return RewardTrainer(config, log).run()


class RewardTrainer(Trainer):
    """A binary reward model: a sequence classifier trained with BCE on thumbs, then calibrated."""

    def inputs(self) -> tuple:
        return data_sources(self.config)

    def set_up(self) -> "RewardTask":
        config, engine, tokenizer = self.config, self.engine, self.tokenizer
        needs = DataNeeds("reward", principle_field=config.principle_field) if config.principle_field else REWARD_DATA
        self.data = data = prepare_data(config, tokenizer, needs, log=engine.say)
        # with sharded weights (FSDP, ZeRO-3) only the first process reads them; the others receive their shards
        model = load_reward(self.model_dir, config, engine)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.thumbalign_principled = bool(config.principle_field)  # scoring then needs a principle
        self.udm = fit_udm(config, engine, self.run_dir, data, model, tokenizer) if config.udm else None
        self.model = model = make_trainable(model, config, task_type="SEQ_CLS")  # LoRA: peft trains the head whole
        self.task = RewardTask(config, engine, data, self.udm, tokenizer.pad_token_id)
        core = model.get_base_model() if config.use_lora else model
        engine.prepare(RewardScores(core), model, self.task.total_steps)
        return self.task

    def fingerprint(self) -> dict:
        return data_fingerprint(self.config.data, self.data.train)

    def before_training(self, resumed: bool) -> None:
        task = self.task
        self.engine.say(f"Training a reward model on {len(self.data.train)} examples ({task.n_up} 👍, "
                        f"{len(self.data.train) - task.n_up} 👎): {task.total_steps} steps of {task.units_per_step}")

    def results(self, last_line: dict | None) -> dict:
        config, engine, data = self.config, self.engine, self.data
        # every process scores the held-out examples with the model as trained (sharded: on the shards, in step)
        self.held_out = (held_out_logits(engine, self.model, data, self.tokenizer.pad_token_id, config)
                         if data.eval else None)
        return {"kind": "reward_model", "steps": self.task.total_steps, "world_size": engine.world,
                "data": data.report, "settings": config.to_dict(), **({"udm": self.udm.stats} if self.udm else {})}

    def save(self, final, summary: dict) -> None:
        config, run = self.config, self.run_dir
        final = final.merge_and_unload() if config.use_lora else final
        if self.data.eval:
            summary["eval"] = calibrate(final, self.held_out, self.data, config, self.engine.say)
        folder = save_reward_model(run, final, self.tokenizer, config, self.model_dir)
        run.write_summary(summary)
        complete_model_folder(run, summary, config, self.model_dir)
        self.engine.say(f"Saved the reward model to {folder}; report: {write_report(run.path)}")


def load_reward(model_dir, config, engine: Engine):
    """The reward model to train, in CPU memory (the engine places it). With sharded weights (FSDP, ZeRO-3) only the
    first process reads the weights: the others build the architecture empty and receive their shards from it when
    the engine shards the model, which nothing runs before (UDM here embeds with a sentence encoder, not the
    model)."""
    if engine.sharded and not engine.is_main:
        return empty_model(model_dir, config.trust_remote_code, "AutoModelForSequenceClassification", num_labels=1)
    model = load_reward_model(model_dir, config.trust_remote_code)
    model.config.use_cache = False  # scoring keeps no cache, as on the processes that built the model empty
    return model


class RewardTask:
    """A step of reward-model training: micro-batches of feedback examples, one logit each, weighted BCE."""

    def __init__(self, config, engine: Engine, data: PreparedData, udm: UDMWeights | None, pad_token_id: int):
        self.config, self.engine, self.data, self.udm, self.pad_token_id = config, engine, data, udm, pad_token_id
        self.micro, self.accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
        self.units_per_step = self.micro * self.accumulation * engine.world
        self.total_steps, self.steps_per_epoch = count_steps(config, len(data.units), self.units_per_step)
        labels = torch.tensor([e.label for e in data.train])
        self.n_up = int(labels.sum())
        n, n_down = len(labels), len(labels) - self.n_up
        self.class_weight = ({True: n / (2 * self.n_up), False: n / (2 * n_down)} if config.balance_classes
                             else {True: 1.0, False: 1.0})

    def step_batches(self, step: int) -> list[tuple[list[int], int]]:
        batches, n_step = micro_batches(self.data.units, step, self.micro, self.accumulation, self.engine.world,
                                        self.engine.rank, self.config.seed)
        return [(idx, n_step) for idx in batches]

    def micro_step(self, module, batch) -> MicroStep:
        idx, n_step = batch
        device = self.engine.device
        present = idx or [0]  # a process with no data left in this step runs a placeholder that weighs nothing
        tensors = collate([self.data.train[i] for i in present], self.pad_token_id)
        labels = tensors["labels"].to(device)
        weights = torch.tensor([self.class_weight[bool(label)] for label in tensors["labels"]], device=device)
        weights = weights * float(bool(idx))
        stats = {}
        if self.udm:
            rows = torch.tensor(present)
            weights = torch.where(labels, weights, weights * self.udm.weights[rows].to(device))
            stats.update(udm_weight=self.udm.weights[rows], udm_clipped=self.udm.clipped[rows])
        logits = module(tensors["input_ids"].to(device), tensors["attention_mask"].to(device))
        losses = F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none") * weights
        stats.update(loss=losses, logit=logits, label=labels)
        if not idx:
            stats = {name: values[:0] for name, values in stats.items()}
        return MicroStep(losses.sum() / n_step, stats, tokens=int(tensors["n_tokens"]) if idx else 0,
                         samples=len(idx))

    def log_line(self, stats: dict[str, torch.Tensor]) -> dict:
        if not stats:
            return {"loss": None, "accuracy": None}
        right = (stats["logit"] > 0) == stats["label"]
        return {"loss": float(stats["loss"].mean()), "accuracy": float(right.float().mean()), **udm_window_stats(stats)}

    def format_line(self, m: dict) -> str:
        if m["loss"] is None:
            return f"step {m['step']}: every step since the last line was skipped (non-finite)"
        return f"step {m['step']}: loss {m['loss']:.4f}  acc {m['accuracy']:.3f}  lr {m['lr']:.2e}"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def held_out_logits(engine: Engine, model, data: PreparedData, pad_token_id: int, config) -> torch.Tensor:
    """The trained model's logit for every held-out example: through the engine's module when the weights are
    sharded, on the model itself otherwise (with LoRA, the base model its adapters sit in)."""
    scorer = engine.scorer(model) if engine.sharded else RewardScores(model.get_base_model() if config.use_lora
                                                                      else model)
    with torch.no_grad():
        return score_examples(scorer, data.eval, pad_token_id, config.eval_batch_size, device=engine.device)


def calibrate(model, logits: torch.Tensor, data: PreparedData, config, say) -> dict:
    """Held-out accuracy, ROC AUC and ECE from the held-out `logits`; the temperature fitted on the held-out split is
    stored in the model's config, so that σ(logit / T) is the calibrated P(👍) wherever the folder is loaded."""
    labels = torch.tensor([e.label for e in data.eval])
    temperature = fit_temperature(logits, labels) if config.calibrate else 1.0
    held = implicit_classifier_report(logits / temperature, labels)
    held["ece_before_calibration"] = expected_calibration_error(torch.sigmoid(logits), labels)
    held["temperature"] = temperature
    held["reliability"] = reliability_bins(torch.sigmoid(logits / temperature), labels)
    model.config.thumbalign_temperature = temperature
    # what the model scores held-out 👍 and 👎 answers: online training compares its answers' scores with these
    p_up = torch.sigmoid(logits / temperature)
    model.config.thumbalign_held_out = {
        "p_up_of_up": float(p_up[labels].mean()) if labels.any() else None,
        "p_up_of_down": float(p_up[~labels].mean()) if (~labels).any() else None, "auc": held["auc"]}
    held.update(p_up_of_up=model.config.thumbalign_held_out["p_up_of_up"],
                p_up_of_down=model.config.thumbalign_held_out["p_up_of_down"])
    auc = "n/a (one class)" if held["auc"] is None else f"{held['auc']:.3f}"
    say(f"Held-out: accuracy {held['accuracy']:.3f}, ROC AUC {auc}, ECE {held['ece']:.3f} "
        f"(before temperature scaling {held['ece_before_calibration']:.3f}, T = {temperature:.3f})")
    return held
