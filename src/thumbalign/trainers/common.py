"""Set-up steps every trainer takes the same way: the model folder, the step count, adapters, UDM weights."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..analysis.judged import format_comparison, judge_answers, judged_generations
from ..data.prepare import PreparedData
from ..data.readers import Source, is_hub_dataset, load_hub_dataset
from ..data.tokens import Example, examples_digest
from ..engine.inference import prompt_embeddings, sample_answers
from ..engine.loop import Engine
from ..engine.models import (add_lora, cache_root, empty_model, load_causal_lm, load_tokenizer,
                             quantized_layers, resolve_model, wants_gradient_checkpointing)
from ..engine.rundir import RunDir
from ..errors import ConfigError, DataError
from ..files import content_digest
from ..methods.udm import DensityRatio, embed_texts, fit_density_ratio, weigh_examples


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


def load_policy(model_dir: Path, config, engine: Engine, shard_first: bool = False):
    """The model to train: float32 weights, or with --load-in-4bit / --load-in-8bit a base whose linear layers
    bitsandbytes holds in 4 or 8 bits (QLoRA). `shard_first`: the trainer shards the model (FSDP, ZeRO-3) before it
    runs anything on it. Then only the first process reads the weights; the others build the architecture empty and
    receive their shards from it (a method's new tokens grow their empty tables to the same shape), and the model
    stays in CPU memory: sharding moves each weight to the device on its own, so the device never holds the whole
    model.
    Otherwise the model goes to the device whole."""
    bits = 4 if getattr(config, "load_in_4bit", False) else 8 if getattr(config, "load_in_8bit", False) else None
    sharded_first = shard_first and not bits and engine.sharded
    if sharded_first and not engine.is_main:
        return empty_model(model_dir, config.trust_remote_code)
    model = load_causal_lm(model_dir, config.trust_remote_code, bits, engine.device,
                           torch.bfloat16 if engine.bf16 else torch.float32)
    if bits:
        engine.say(f"Loaded {quantized_layers(model)} linear layers in {bits} bits (bitsandbytes); LoRA trains on "
                   "top of them")
        return model  # placed on the device by the loader; a quantised model refuses .to()
    return model if sharded_first else model.to(engine.device)


def check_use_liger(config, engine: Engine, model, sequences: list[tuple[list[int], list[bool]]], pad_token_id: int):
    """--use-liger: the package and a CUDA GPU are there, and Liger's log-probs and gradients agree with the chunked
    computation on the first few sequences (token ids and which of them are completion tokens) of this run."""
    if not getattr(config, "use_liger", False):
        return
    import importlib.util

    from ..data.batching import collate_masked
    from ..engine.logprobs import check_liger

    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("--use-liger: liger-kernel is not installed (pip install liger-kernel), or drop --use-liger")
    if engine.sharded:
        raise ConfigError("--use-liger is not checked with sharded weights (FSDP, ZeRO-3) yet; use it with one "
                          "process, DDP or ZeRO-2")
    if engine.device.type != "cuda":
        raise ConfigError(f"--use-liger: Liger's kernels are Triton kernels for CUDA GPUs, and this run is on "
                          f"{engine.device.type}; drop --use-liger")
    batch = collate_masked([t for t, _ in sequences[:4]], [m for _, m in sequences[:4]], pad_token_id)
    try:
        with engine.autocast():
            worst = check_liger(model, *(batch[k].to(engine.device) for k in
                                         ("input_ids", "attention_mask", "completion_mask")), config.logps_chunk_size)
    except ValueError as err:
        raise ConfigError(f"--use-liger: {err}; upgrade liger-kernel, or drop --use-liger") from None
    engine.say(f"--use-liger: Liger's log-probs and gradients agree with the chunked computation on "
               f"{min(4, len(sequences))} sequences (largest relative difference {worst:.1e})")


def make_trainable(model, config, task_type: str = "CAUSAL_LM"):
    """LoRA adapters (when asked) and gradient checkpointing (asked, or by model size); returns the model to
    train. A quantised base is first prepared as peft prescribes (norms in float32, inputs that carry gradients)."""
    checkpointing = wants_gradient_checkpointing(model, config.gradient_checkpointing)
    if quantized_layers(model):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpointing = False  # switched on just now, if wanted
    if config.use_lora:
        model = add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules,
                         task_type)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@dataclass
class UDMWeights:
    weights: torch.Tensor   # [examples] the density-ratio weight of each training example (used on 👎 only)
    clipped: torch.Tensor   # [examples] bool: the weight sits at a clip bound
    stats: dict             # min / mean / max / share clipped of the 👎 weights, and their histogram


def training_prompt_embeddings(config, engine: Engine, data: PreparedData, model, tokenizer) -> np.ndarray:
    """One embedding per training example's prompt, by --udm-encoder (a sentence encoder, or the policy itself)."""
    if config.udm_encoder == "policy":
        return prompt_embeddings(model, data.train, tokenizer.pad_token_id, config.eval_batch_size, engine.device,
                                 disable_bar=engine.quiet)
    return embed_texts(data.train_prompts, config.udm_encoder, cache_dir=cache_root(config.cache_dir),
                       disable_bar=engine.quiet)


def prompt_clusters(config, engine: Engine, data: PreparedData, model, tokenizer) -> torch.Tensor:
    """--delta prompt: the k-means cluster of each training example's prompt (seeded, so every process and every
    resume computes the same clusters from the same data)."""
    from sklearn.cluster import KMeans

    embeddings = np.asarray(training_prompt_embeddings(config, engine, data, model, tokenizer), dtype=np.float64)
    distinct = len({tuple(np.round(e, 6)) for e in embeddings})
    k = max(1, min(config.delta_clusters, distinct))
    clusters = KMeans(n_clusters=k, random_state=config.seed, n_init=10).fit_predict(embeddings)
    sizes = np.bincount(clusters, minlength=k)
    engine.say(f"--delta prompt: {k} prompt clusters ({config.udm_encoder} embeddings), sizes {sizes.min()}–"
               f"{sizes.max()}; δ(x) = the cluster's running mean reward, shrunk towards δ by κ = {config.delta_prior}")
    return torch.tensor(clusters, dtype=torch.long)


def fit_udm(config, engine: Engine, run: RunDir, data: PreparedData, model, tokenizer) -> UDMWeights:
    """Fit (or, on resume, reload) the prompt density-ratio classifier and weigh every training example. The main
    process fits and saves the classifier as JSON; the others read its file."""
    embeddings = training_prompt_embeddings(config, engine, data, model, tokenizer)
    labels = np.array([e.label for e in data.train])
    path = run.path / "udm_classifier.json"
    resuming = run.resume_from is not None
    if engine.is_main and not (resuming and path.exists()):
        ratio = fit_density_ratio(embeddings, labels, per_class=config.udm_samples_per_class, seed=config.seed,
                                  clip_min=config.udm_clip_min, clip_max=config.udm_clip_max,
                                  normalize=config.udm_normalize)
        ratio.save(path)
        engine.say(f"UDM: fitted the prompt classifier on up to {config.udm_samples_per_class} prompts per class "
                   f"({config.udm_encoder} embeddings), saved to {path}")
    elif resuming:
        engine.say(f"UDM: reloaded the prompt classifier from {path}")
    engine.wait()
    ratio = DensityRatio.load(path)
    weights, clipped, stats = weigh_examples(ratio, embeddings, labels)
    engine.say(f"UDM weights of the 👎 examples: min {stats['min']:.3f}, mean {stats['mean']:.3f}, max "
               f"{stats['max']:.3f}, {stats['share_clipped']:.1%} clipped to [{ratio.clip_min}, {ratio.clip_max}]")
    return UDMWeights(torch.tensor(weights, dtype=torch.float32), torch.tensor(clipped), stats)


def udm_window_stats(stats: dict[str, torch.Tensor]) -> dict:
    """Weights of the 👎 examples seen since the last log line (from the window's 'udm_weight' and 'udm_clipped')."""
    if "udm_weight" not in stats:
        return {}
    down = ~stats["label"]
    w, clipped = stats["udm_weight"][down], stats["udm_clipped"][down]
    if not len(w):
        return {}
    return {"udm_weight_min": float(w.min()), "udm_weight_mean": float(w.mean()), "udm_weight_max": float(w.max()),
            "udm_share_clipped": float(clipped.float().mean())}


def compare_with_base(config, run: RunDir, base_dir: Path, prompts_file: str, judge, max_new_tokens: int,
                      say, answers: dict[str, list[str]] | None = None) -> dict:
    """The trained model (the run's model folder) and the base answer held-out prompts greedily, in float32 (on the GPU
    where there is one), the same way `thumbalign eval` does; the judge decides; bootstrap intervals. Answers go to
    generations.jsonl. `answers`: the two models' answers, already generated on sharded weights
    (:func:`answers_on_shards`)."""
    if config.use_lora and config.save_adapter:
        say("Generation eval skipped: the run saved an adapter only (drop --save-adapter to compare)")
        return {}
    out_file = run.path / "generations.jsonl"
    if answers is not None:
        result = judge_answers(answers, prompts_file, judge, out_file)
    else:
        result = judged_generations({"trained": run.path / "model", "base": base_dir}, prompts_file, judge, out_file,
                                    max_new_tokens=max_new_tokens,
                                    temperature=getattr(config, "eval_temperature", 0.0), seed=config.seed,
                                    batch_size=config.eval_batch_size)
    say(f"Held-out prompts answered by both models, judged:\n{format_comparison(result)}")
    return result


def answers_on_shards(config, engine: Engine, model, tokenizer, base_dir: Path, max_new_tokens: int,
                      base=None) -> dict[str, list[str]] | None:
    """--eval-prompts with sharded weights (FSDP, ZeRO-3): the trained model, still sharded, and the base model,
    sharded the same way (read on the first process only), answer the held-out prompts. Each process answers a share
    of them, every process in step; the main process gets every answer (the others None). The same prompts, rendered
    and decoded as :func:`compare_with_base` does them, greedy or seeded per prompt, in the run's precision. `base`:
    the base model already sharded by `Engine.frozen` and run once (online's KL reference), not loaded again."""
    from ..data.prompts import load_prompts
    from ..engine.inference import render_prompt
    from ..engine.logprobs import CompletionLogps

    if config.use_lora and config.save_adapter:  # compare_with_base skips the comparison
        return None
    prompts = load_prompts(config.eval_prompts)
    mine = list(range(engine.rank, len(prompts), engine.world))
    temperature = getattr(config, "eval_temperature", 0.0)
    base_tokenizer = load_tokenizer(base_dir, config.trust_remote_code)
    if base is None:
        base = (load_causal_lm(base_dir, config.trust_remote_code) if engine.is_main
                else empty_model(base_dir, config.trust_remote_code))
        engine.settle_root(base_tokenizer.eos_token_id,
                           engine.frozen(CompletionLogps(base, config.logps_chunk_size), base))
    answers = {}
    for name, generator, tok in (("trained", model, tokenizer), ("base", base, base_tokenizer)):
        ids = [tok(render_prompt(tok, prompts[i].prompt), add_special_tokens=not isinstance(prompts[i].prompt, list))
               ["input_ids"] for i in mine]
        was_training = generator.training
        generator.eval()
        out = sample_in_step(engine, generator, ids, [config.seed + i for i in mine], config.eval_batch_size,
                             max_new_tokens, temperature, tok.pad_token_id, None, tok.eos_token_id)
        generator.train(was_training)
        answers[name] = dict(zip(mine, (tok.decode(a, skip_special_tokens=True).strip() for a in out)))
    gathered = engine.gather_objects(answers)
    if not engine.is_main:
        return None
    return {name: [next(part[name][i] for part in gathered if i in part[name]) for i in range(len(prompts))]
            for name in answers}


def sample_in_step(engine: Engine, model, prompt_ids: list[list[int]], seeds: list[int], batch_size: int,
                   max_new_tokens: int, temperature: float, pad_token_id: int, eos_token_id: int | None,
                   stand_in_token: int) -> list[list[int]]:
    """Answers (token ids) to `prompt_ids` in batches, under the run's autocast. With sharded weights every process
    must call this as often as the others, and each runs as many batches as the busiest one, with a one-token
    stand-in prompt where it has none of its own (its answer is dropped). `eos_token_id` None: the model's own."""
    synced = engine.sharded
    windows = [slice(start, start + batch_size) for start in range(0, len(prompt_ids), batch_size)]
    out: list[list[int]] = []
    with engine.autocast():
        for window, own in engine.in_lockstep(windows):
            prompts, prompt_seeds = (prompt_ids[window], seeds[window]) if own else ([[stand_in_token]], [0])
            answers = sample_answers(model, prompts, prompt_seeds, max_new_tokens, temperature, pad_token_id,
                                     eos_token_id, synced)
            out += answers if own else []
    return out


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
