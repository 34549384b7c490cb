"""Settings of every trainer: dataclasses with a help string per field. The CLI flags and the YAML keys are made
from them (thumbalign.cli.options), so the two always match (``--learning-rate`` on the command line is
``learning_rate:`` in the file). A field marked ``resumable`` may change when an interrupted run is resumed; every
other setting must equal the interrupted run's.

This module imports nothing heavy: ``thumbalign --help`` reads it without loading torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..errors import ConfigError


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- data
    data: str | None = _f(None, "Feedback: a JSONL, JSON, CSV or Parquet file, a datasets folder, or a Hugging Face "
                                "Hub dataset id (owner/name; downloaded once into the datasets cache) (required).")
    data_config: str | None = _f(None, "With a Hub dataset: its configuration (subset) name.")
    data_split: str = _f("train", "With a Hub dataset: the split to train on.")
    eval_data: str | None = _f(None, "Held-out feedback (a file, folder or Hub dataset) to measure the "
                                     "implicit-reward classifier on.")
    eval_data_split: str | None = _f(None, "The split of --eval-data to use; without --eval-data, a held-out split "
                                           "of the --data dataset (e.g. test).")
    prompt_field: str = _f("prompt", "Column holding the prompt, when the data names it otherwise.")
    completion_field: str = _f("completion", "Column holding the completion, when the data names it otherwise.")
    label_field: str = _f("label", "Column holding the thumbs-up / thumbs-down label, when the data names it "
                                   "otherwise.")
    eval_split: float = _f(0.0, "Share of --data held out (seeded) for evaluation when --eval-data is not given.")
    skip_invalid: bool = _f(False, "Skip rows that cannot be used (counted by reason and reported) instead of "
                                   "stopping at the first one.", resumable=True)
    output_dir: str = _f("runs/thumbalign", "Run folder: checkpoints, metrics.jsonl, summary.json, final model.",
                         resumable=True)
    overwrite: bool = _f(False, "Allow an --output-dir that already holds another run's files.", resumable=True)
    # --- model
    model: str = _f("default", "A Hugging Face Hub model id (downloaded once into the Hub cache; HF_HOME and "
                               "HF_HUB_OFFLINE apply), a local transformers folder, a .gguf file, or 'default' (the "
                               "embedded SmolLM2-135M-Instruct, offline).")
    revision: str | None = _f(None, "With a Hub model id: the branch, tag or commit to use (default: main).")
    trust_remote_code: bool = _f(False, "Run model code shipped inside the model folder. Off: only trust what you "
                                        "wrote.")
    use_lora: bool = _f(False, "Train a LoRA adapter instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA branch.")
    lora_target_modules: str = _f("all-linear", "Modules that get an adapter: 'all-linear' or comma-separated names.")
    save_adapter: bool = _f(False, "With --use-lora: save the adapter alone instead of the merged model.")
    load_in_4bit: bool = _f(False, "QLoRA: hold the base model's linear layers in 4 bits (NF4, bitsandbytes) and "
                                   "train LoRA adapters on top (needs --use-lora); a 7-8B model then fits a 24 GB "
                                   "GPU. The saved model is the adapter merged into the full-precision base.")
    load_in_8bit: bool = _f(False, "Like --load-in-4bit, with 8-bit linear layers (LLM.int8).")
    save_dtype: str = _f("auto", "Precision of the saved model: auto (the base model's, from its config.json), "
                                 "bfloat16, float16 or float32.",
                         choices=("auto", "bfloat16", "float16", "float32"))
    save_max_shard_size: str = _f("5GB", "Largest file of the saved model (e.g. 5GB, 500MB): a bigger model is split "
                                         "into several safetensors files with an index, as transformers writes and "
                                         "loads them.", resumable=True)
    # --- method
    method: str = _f("bco", "Training objective; `thumbalign methods` lists them with the data each takes.")
    beta: float = _f(0.1, "β: scale of the implicit reward r = β·(log π − log π_ref).")
    delta: str = _f("running", "BCO reward shift δ: 'running' = running mean of all rewards (the reference "
                               "implementation), 'balanced' = midpoint of the thumbs-up and thumbs-down means, "
                               "'prompt' = δ(x), the running mean reward of the prompt's cluster (k-means on "
                               "--udm-encoder embeddings) shrunk towards the running mean, so that what the prompt "
                               "alone explains is absorbed and the classifier must separate answers.",
                    choices=("running", "balanced", "prompt"))
    delta_clusters: int = _f(16, "--delta prompt: number of prompt clusters (fewer when there are fewer prompts).")
    delta_prior: float = _f(8.0, "--delta prompt: weight κ, in rewards, of the global δ in each cluster's δ(x).")
    sft_weight: float | None = _f(None, "BCO: add this weight × the mean token NLL of each 👍 answer to its loss, "
                                        "an anchor that keeps raising the likelihood of good answers. Default: 1 "
                                        "for --method bco (the best setting on benchmarks/shift_quality.py), 0 for "
                                        "bco-pair; 0 gives the paper's BCO.")
    udm: bool = _f(False, "Underlying distribution matching: reweight 👎 examples by the prompt density ratio "
                          "p_up(x)/p_down(x), when 👍 and 👎 prompts come from different distributions "
                          "(see `thumbalign inspect`).")
    udm_encoder: str = _f("minilm", "Prompt embeddings for --udm: 'minilm' (all-MiniLM-L6-v2, offline package), "
                                    "'policy' (the model's own mean-pooled hidden states) or a local "
                                    "sentence-transformers folder.")
    udm_samples_per_class: int = _f(1024, "Prompts per class the density-ratio classifier is fitted on.")
    udm_clip_min: float = _f(0.5, "Lower clip of the UDM weight.")
    udm_clip_max: float = _f(10.0, "Upper clip of the UDM weight.")
    udm_normalize: bool = _f(False, "Scale the UDM weights of the 👎 examples to mean 1.")
    aft_boundary: float = _f(1.0, "AFT: how far (in length-normalised log-likelihood) a 👎 answer's score may fall "
                                  "below the worst 👍 answer of its prompt before the constraint pulls it back.")
    aft_sft_weight: float = _f(1.0, "AFT: weight λ of the NLL on the 👍 answers trained alongside the ranking "
                                    "loss (AFT trains L_VFT + L_A); 0 for the ranking loss alone.")
    desirable_weight: float = _f(1.0, "KTO: weight of thumbs-up losses (w_D).")
    undesirable_weight: float = _f(1.0, "KTO: weight of thumbs-down losses (w_U).")
    auto_weights: bool = _f(False, "KTO: choose w_D, w_U from the class counts so that (w_D·n_D)/(w_U·n_U) = 1, "
                                   "inside the paper's [1, 4/3].")
    max_length: int = _f(1024, "Longest prompt+completion in tokens; prompts are cut from the left to fit, "
                               "records whose completion alone is longer are dropped (both counted).")
    # --- optimisation
    learning_rate: float = _f(5e-6, "Peak AdamW learning rate. 5e-7 is the paper's value for billion-scale full "
                                    "fine-tunes; small models and LoRA want more (LoRA: try 1e-4).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    # both may change on --resume (with another number of processes) as long as their product with the number of
    # processes, the examples of one step, stays the same: the engine checks that
    per_device_train_batch_size: int = _f(8, "Examples per micro-batch on each process.", resumable=True)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.", resumable=True)
    num_train_epochs: float = _f(1.0, "Passes over the training data (ignored when --max-steps is set).")
    max_steps: int = _f(-1, "Optimizer steps to run; overrides --num-train-epochs when > 0.")
    warmup_ratio: float = _f(0.1, "Share of the steps spent warming the learning rate up from 0.")
    lr_scheduler_type: str = _f("linear", "Decay after warm-up: linear, cosine, constant_with_warmup, ... "
                                          "(transformers.get_scheduler names).")
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0 turns clipping off).")
    bf16: str = _f("auto", "bfloat16 autocast: 'auto' (on where the hardware supports it), 'true' or 'false'.",
                   choices=("auto", "true", "false"))
    gradient_checkpointing: bool | None = _f(None, "Recompute activations in the backward pass: less memory, ~30% "
                                                   "slower. Unset: on for models of 1B parameters or more.")
    packing: bool = _f(False, "Padding-free batches: the examples of a micro-batch back to back in one row, with "
                              "per-example positions and attention (no compute spent on padding).")
    seed: int = _f(42, "Seed for shuffling, the eval split and initialisation of new weights.")
    dry_run: bool = _f(False, "Read and tokenise the data, say what training would do (examples, steps, truncation), "
                              "and stop: no weights are loaded, nothing is written.")
    logps_chunk_size: int = _f(2048, "Completion tokens per chunk of the output projection (bounds logit memory).")
    use_liger: bool = _f(False, "Completion log-probs through Liger's fused linear cross-entropy (Triton, CUDA GPUs; "
                                "pip install liger-kernel) instead of the chunked projection. Checked against the "
                                "chunked computation on the first batch, values and gradients; refused if they differ.")
    # --- evaluation by generation
    eval_prompts: str | None = _f(None, "Prompts (JSONL/CSV/..., a 'prompt' per row) never trained on: after training, "
                                        "the base and the trained model answer them and --judge gives each answer a "
                                        "thumbs-up or down.", resumable=True)
    judge: str = _f("vader", "Judge for --eval-prompts: vader (positive sentiment), exact or numeric (against "
                             "--reference-field), or module:function.", resumable=True)
    reference_field: str = _f("answer", "Field of a prompt row holding the reference answer (exact/numeric judges).",
                              resumable=True)
    eval_max_new_tokens: int = _f(64, "Tokens generated per answer for --eval-prompts.", resumable=True)
    eval_temperature: float = _f(0.0, "Sampling temperature for --eval-prompts (0: greedy).", resumable=True)
    report: bool = _f(True, "Write report.html (curves, eval tables, sampled answers) into the run folder at the end.",
                      resumable=True)
    push_to_hub: bool = _f(False, "At the end, upload the model folder (or the adapter) to the Hugging Face Hub as "
                                  "--hub-model-id (log in first: hf auth login, or set HF_TOKEN).", resumable=True)
    hub_model_id: str | None = _f(None, "The Hub repository to push to, owner/name (created if missing).",
                                  resumable=True)
    hub_private: bool = _f(False, "Create the Hub repository private.", resumable=True)
    report_to: list[str] | None = _f(None, "Experiment trackers to log to, through accelerate: tensorboard (into "
                                           "OUTPUT_DIR/tracking), wandb, mlflow, trackio, or none.", resumable=True)
    skip_nonfinite: int = _f(0, "Optimizer steps with a NaN/inf loss or gradient to skip before stopping "
                                "(0: stop at the first, keeping the last good checkpoint).", resumable=True)
    # --- scale-out (handled by the CLI before training starts)
    num_processes: int = _f(1, "Processes to train with (one per GPU; on a CPU, gloo processes). Launched through "
                               "accelerate (GPU) or torch.distributed.run (CPU).", resumable=True)
    accelerate_config: str | None = _f(None, "ddp, zero2 (DeepSpeed, optimizer sharded), zero3 (DeepSpeed, weights "
                                            "sharded), fsdp (FSDP2, weights sharded) — shipped configs, on GPUs or "
                                            "CPUs — or an accelerate config file; the run is launched under it, "
                                            "with one process too (DeepSpeed offload on one GPU).", resumable=True)
    num_machines: int = _f(1, "Machines the run spans; start the same command on each, with its --machine-rank "
                              "(--num-processes then counts the processes of one machine).", resumable=True)
    machine_rank: int = _f(0, "This machine's rank, 0 … --num-machines − 1; machine 0 hosts the rendezvous and writes "
                              "the run folder (use a folder every machine sees to resume).", resumable=True)
    main_process_ip: str | None = _f(None, "Address of machine 0, reachable from every machine (multi-machine runs).",
                                     resumable=True)
    main_process_port: int = _f(29500, "Port of the rendezvous on machine 0.", resumable=True)
    rendezvous_timeout: int = _f(600, "Seconds the machines of a multi-machine run wait for each other; then one line "
                                      "says which could not be reached or did not join.", resumable=True)
    # --- logging and checkpoints
    logging_steps: int = _f(10, "Print and log metrics every N optimizer steps.", resumable=True)
    save_steps: int = _f(100, "Write a checkpoint every N optimizer steps (and at the end).", resumable=True)
    save_total_limit: int = _f(2, "Checkpoints to keep (oldest are deleted).", resumable=True)
    resume: str | None = _f(None, "Continue an interrupted run: bare --resume takes the latest checkpoint in "
                                  "--output-dir, or give a checkpoint folder.", resumable=True)
    cache_dir: str | None = _f(None, "Where converted models and reference log-probs are cached "
                                     "(default: $THUMBALIGN_CACHE or ~/.cache/thumbalign).", resumable=True)
    eval_batch_size: int = _f(16, "Examples per batch when computing reference log-probs and evaluating.",
                              resumable=True)

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("no training data: pass --data FILE (or 'data:' in the config file)")
        check_shard_size(self.save_max_shard_size)
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"eval_split must be in [0, 1), got {self.eval_split}")
        positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "max_length", "logging_steps",
                    "save_steps", "lora_r", "logps_chunk_size", "eval_batch_size", "udm_samples_per_class")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.beta <= 0 or self.learning_rate <= 0:
            raise ConfigError("beta and learning_rate must be positive")
        if (self.sft_weight or 0) < 0 or self.delta_prior <= 0 or self.delta_clusters < 1:
            raise ConfigError("sft_weight must be ≥ 0, delta_prior > 0 and delta_clusters ≥ 1")
        if (self.sft_weight or self.delta == "prompt") and self.method not in ("bco", "bco-pair"):
            raise ConfigError(f"--sft-weight and --delta prompt belong to BCO; --method {self.method} does not "
                              "use them")
        if self.aft_boundary < 0 or self.aft_sft_weight < 0:
            raise ConfigError(f"aft_boundary and aft_sft_weight must be ≥ 0, got {self.aft_boundary}, "
                              f"{self.aft_sft_weight}")
        if not 0 < self.udm_clip_min <= self.udm_clip_max:
            raise ConfigError(f"UDM clip range [{self.udm_clip_min}, {self.udm_clip_max}] is empty or not positive")
        from ..methods.registry import get_method  # here, not at import: the registry loads torch

        method = get_method(self.method)
        if self.udm and not method.uses_udm_weights:
            raise ConfigError(f"--udm weights BCO's thumbs-down losses; --method {self.method} does not use them")
        if self.save_adapter and not self.use_lora:
            raise ConfigError("--save-adapter needs --use-lora")
        check_quantized_loading(self)
        if (self.load_in_4bit or self.load_in_8bit) and method.needs.reward_tokens:
            raise ConfigError(f"--method {self.method} adds tokens, whose new embeddings would have to train inside "
                              "a quantised model: drop --load-in-4bit / --load-in-8bit")
        check_trackers(self.report_to)
        check_hub_push(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "trackio")


def check_trackers(report_to: list[str] | None) -> None:
    unknown = [t for t in report_to or [] if t not in TRACKERS]
    if unknown:
        raise ConfigError(f"--report-to {', '.join(unknown)}: not one of {', '.join(TRACKERS)}")


def check_quantized_loading(config) -> None:
    """4-/8-bit weights are frozen: only LoRA adapters can train on them, and bitsandbytes must be there."""
    import importlib.util

    if config.load_in_4bit and config.load_in_8bit:
        raise ConfigError("--load-in-4bit and --load-in-8bit exclude each other: choose one")
    flag = "--load-in-4bit" if config.load_in_4bit else "--load-in-8bit" if config.load_in_8bit else None
    if flag and not config.use_lora:
        raise ConfigError(f"{flag} freezes the base weights in low precision: add --use-lora to train adapters on "
                          "them")
    if flag and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{flag} needs bitsandbytes: pip install 'thumbalign[qlora]' (or bitsandbytes)")


def check_hub_push(config) -> None:
    if config.push_to_hub and not config.hub_model_id:
        raise ConfigError("--push-to-hub needs --hub-model-id owner/name")


def derived_config(name: str, keep: tuple[str, ...], defaults: dict, extra: list, doc: str):
    """A settings dataclass for another command, made of some of TrainConfig's fields (same flags, same help)
    with other defaults, plus fields of its own: one definition of each shared setting."""
    fields_ = []
    for f in dataclasses.fields(TrainConfig):
        if f.name in keep:
            default = defaults.get(f.name, f.default)
            fields_.append((f.name, f.type, field(default=default, metadata=f.metadata)))
    cls = dataclasses.make_dataclass(name, fields_ + extra, namespace={
        "__doc__": doc, "to_dict": lambda self: dataclasses.asdict(self)})
    cls.__module__ = __name__
    return cls


REWARD_SHARED = ("data", "eval_data", "eval_split", "skip_invalid", "output_dir", "overwrite", "model",
                 "trust_remote_code", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "udm",
                 "udm_encoder", "udm_samples_per_class", "udm_clip_min", "udm_clip_max", "udm_normalize",
                 "max_length", "learning_rate", "weight_decay", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_ratio", "lr_scheduler_type",
                 "max_grad_norm", "bf16", "gradient_checkpointing", "seed", "logging_steps", "save_steps",
                 "save_total_limit", "resume", "cache_dir", "eval_batch_size", "skip_nonfinite", "num_processes",
                 "accelerate_config", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                 "rendezvous_timeout", "revision", "save_dtype", "save_max_shard_size", "report_to", "data_config",
                 "data_split",
                 "eval_data_split", "prompt_field", "completion_field", "label_field", "push_to_hub", "hub_model_id",
                 "hub_private")

RewardConfig = derived_config(
    "RewardConfig", REWARD_SHARED,
    defaults={"output_dir": "runs/reward", "learning_rate": 2e-5, "eval_split": 0.1, "max_length": 512},
    extra=[("balance_classes", bool, _f(True, "Weight the classes so that 👍 and 👎 count equally in the loss.")),
           ("calibrate", bool, _f(True, "Fit a temperature on the held-out split so that scores are calibrated "
                                        "probabilities.")),
           ("principle_field", str | None, _f(None, "Field holding each row's principle (RLBFF): the model learns "
                                                   "whether an answer satisfies *that* principle, so one model "
                                                   "serves many; score with `reward score --principle`."))],
    doc="Settings of `thumbalign reward train` (shared settings mean what they mean for `thumbalign train`).")


def check_shard_size(size: str) -> None:
    """--save-max-shard-size as the Hub's file splitter reads it: a number and KB, MB, GB or TB."""
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", str(size), flags=re.IGNORECASE):
        raise ConfigError(f"--save-max-shard-size {size!r}: give a number and a unit, e.g. 5GB or 500MB "
                          "(units: KB, MB, GB, TB)")


def _validate_reward(self) -> None:
    if not self.data:
        raise ConfigError("no training data: pass --data FILE")
    check_shard_size(self.save_max_shard_size)
    if self.udm and self.udm_encoder == "policy":
        raise ConfigError("reward models take --udm-encoder minilm or a sentence-transformers folder, not 'policy'")
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                 "eval_batch_size"):
        if getattr(self, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
    if self.max_length <= 1:
        raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
    check_trackers(self.report_to)
    check_hub_push(self)


RewardConfig.validate = _validate_reward


ONLINE_SHARED = ("output_dir", "overwrite", "model", "trust_remote_code", "use_lora", "lora_r", "lora_alpha",
                 "lora_dropout", "lora_target_modules", "save_adapter", "load_in_4bit", "load_in_8bit",
                 "learning_rate", "weight_decay",
                 "gradient_accumulation_steps", "num_train_epochs", "max_steps", "warmup_ratio", "lr_scheduler_type",
                 "max_grad_norm", "bf16", "gradient_checkpointing", "seed", "logps_chunk_size", "use_liger",
                 "reference_field",
                 "report", "skip_nonfinite", "skip_invalid", "num_processes", "accelerate_config",
                 "num_machines", "machine_rank", "main_process_ip", "main_process_port", "rendezvous_timeout",
                 "logging_steps", "save_steps", "save_total_limit", "resume", "cache_dir", "eval_batch_size",
                 "revision", "save_dtype", "save_max_shard_size",
                 "report_to", "push_to_hub", "hub_model_id", "hub_private")

OnlineConfig = derived_config(
    "OnlineConfig", ONLINE_SHARED,
    defaults={"output_dir": "runs/online", "learning_rate": 1e-5, "warmup_ratio": 0.0, "logging_steps": 1,
              "save_steps": 20},
    extra=[
        ("prompts", str | None, _f(None, "Prompts to answer (JSONL/JSON/CSV/Parquet; a 'prompt' or 'messages' per "
                                         "row; other columns go to the rewards), required.")),
        ("eval_prompts", str | None, _f(None, "Prompts never trained on: before and after training the model "
                                              "answers each greedily and the rewards judge it (pass rate with a "
                                              "95% interval).", resumable=True)),
        ("reward", list[str] | None, _f(None, "A reward: vader, exact, numeric (against --reference-field), "
                                              "rm:PATH (a thumbalign reward model's P(👍)), or module:function (a "
                                              "judge, or TRL's f(prompts, completions, **columns)).")),
        ("reward_weights", list[float] | None, _f(None, "Weight of each --reward in the total (default: 1 each).")),
        ("pass_threshold", float, _f(0.5, "A total reward at or above this is a 👍 (the binary outcome: pass rates, "
                                          "filtering, NFT/RFT labels).")),
        ("objective", str, _f("grpo", "Online objective: grpo, dr_grpo, nft or rft (`thumbalign methods`).")),
        ("num_generations", int, _f(8, "Answers sampled per prompt (the group).")),
        ("per_device_train_batch_size", int, _f(4, "Prompts per micro-batch on each process, each with "
                                                   "--num-generations answers.")),
        ("max_new_tokens", int, _f(64, "Longest answer in tokens; longer ones are cut (their share is logged as "
                                       "clipped_ratio).")),
        ("temperature", float, _f(1.0, "Sampling temperature of the answers trained on (the whole distribution, no "
                                       "top-k / top-p).")),
        ("generation_batch_size", int, _f(64, "Answers generated together in one batch.", resumable=True)),
        ("beta", float, _f(0.0, "KL coefficient towards the starting model (k3 estimator); 0 loads no reference. "
                                "With LoRA the reference is the model with its adapter disabled.")),
        ("epsilon", float, _f(0.2, "PPO clip range of the grpo/dr_grpo ratio (inactive on-policy).")),
        ("loss_normalization", str, _f("auto", "How token terms sum to the step's loss: sequence (mean per answer, "
                                               "then over answers), token (mean over the step's tokens), constant "
                                               "(sum / (answers × max_new_tokens)); auto = the objective's own.",
                                       choices=("auto", "sequence", "token", "constant"))),
        ("nft_weighting", str, _f("dr_grpo", "NFT's prompt weight ω: dr_grpo = 1 − r̂ (the authors' default), grpo "
                                             "= √((1 − r̂)/r̂), constant = 1.",
                                  choices=("dr_grpo", "grpo", "constant"))),
        ("nft_negative_floor", float, _f(1.0, "NFT: floor ε of the implicit negative ratio, straight-through "
                                              "(value clamped, gradient kept).")),
        ("filter_prompts", str | None, _f(None, "LOW,HIGH: before training, estimate each prompt's pass rate with "
                                                "the starting model (cached) and keep those inside the band.")),
        ("retry_turns", int, _f(1, "Turns per conversation: above 1, a 👎 answer is followed by --retry-message and "
                                   "another answer, and success at turn k earns --retry-gamma^k.")),
        ("retry_message", str, _f("Incorrect. Please think again.", "The user's reply to a 👎 answer.")),
        ("retry_gamma", float, _f(0.5, "Reward of success at turn k (k = 0 first) is retry_gamma^k.")),
        ("retry_repetition_penalty", float, _f(0.5, "λ: a conversation's reward loses λ·(1 − unique answers / "
                                                    "answers) for repeating itself.")),
        ("sar_weight", float, _f(0.0, "Self-aligned reward: add w × clip((ppl(a) − ppl(a|q)) / ppl(a), −1, 1), "
                                      "favouring concise, prompt-specific answers; never used for the binary "
                                      "outcome.")),
    ],
    doc="Settings of `thumbalign online` (shared settings mean what they mean for `thumbalign train`).")


def _validate_online(self) -> None:
    if not self.prompts:
        raise ConfigError("no prompts: pass --prompts FILE")
    check_shard_size(self.save_max_shard_size)
    if not self.reward:
        raise ConfigError("no reward: pass --reward (vader, exact, numeric, rm:PATH or module:function)")
    if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
        raise ConfigError(f"--reward-weights has {len(self.reward_weights)} values for {len(self.reward)} rewards")
    for name in ("num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "max_new_tokens",
                 "logging_steps", "save_steps", "generation_batch_size", "retry_turns", "eval_batch_size"):
        if getattr(self, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_generations < 2:
        raise ConfigError("num_generations must be at least 2: a group of one carries no relative signal")
    if self.temperature <= 0:
        raise ConfigError("temperature must be positive: the answers trained on are sampled")
    if self.beta < 0 or self.learning_rate <= 0:
        raise ConfigError("beta must be ≥ 0 and learning_rate positive")
    if self.save_adapter and not self.use_lora:
        raise ConfigError("--save-adapter needs --use-lora")
    check_quantized_loading(self)
    if self.filter_prompts is not None:
        band = filter_band(self.filter_prompts)
        if not 0 <= band[0] <= band[1] <= 1:
            raise ConfigError(f"--filter-prompts {self.filter_prompts}: expected LOW,HIGH with 0 ≤ LOW ≤ HIGH ≤ 1")
    check_trackers(self.report_to)
    check_hub_push(self)
    from ..methods.registry import get_online_objective  # here, not at import: the registry loads torch

    get_online_objective(self.objective)


def filter_band(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--filter-prompts {text!r}: expected two numbers, LOW,HIGH (e.g. 0.1,0.9)") from None
    return low, high


OnlineConfig.validate = _validate_online
