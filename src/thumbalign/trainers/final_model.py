"""The last step of the data path: the run's final model folder, `OUTPUT_DIR/model`, in one place.

  trained model, whole on the main process (engine/loop.py `Engine.final_model`, gathered by the sharding backend)
  -> LoRA merged (a QLoRA adapter into its base reloaded at full precision), or the adapter alone (--save-adapter)
  -> --save-dtype -> safetensors files split at --save-max-shard-size, and the tokenizer, written aside and renamed
  into place (engine/rundir.py `RunDir.save_folder`) -> model/README.md, the model card (analysis/model_card.py)
  -> --push-to-hub.

Every trainer ends through :func:`save_policy` or :func:`save_reward_model`, then :func:`complete_model_folder` once
the run's summary is known.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..analysis.model_card import model_card
from ..data.readers import is_hub_dataset
from ..engine.models import load_causal_lm, portable_name, quantized_layers
from ..engine.rundir import RunDir
from ..errors import ThumbalignError
from ..files import write_text_atomically

FOLDER = "model"


def save_policy(run: RunDir, model, tokenizer, config, base_dir: Path) -> Path:
    """The trained language model into the run's model folder (see :func:`write_policy`); returns its path."""
    return run.save_folder(FOLDER, lambda folder: write_policy(model, tokenizer, folder, config, base_dir))


def save_reward_model(run: RunDir, model, tokenizer, config, base_dir: Path) -> Path:
    """The trained reward model (LoRA already merged: its calibration ran on the merged model) into the run's model
    folder, in --save-dtype; returns its path."""
    model.to(save_dtype(config.save_dtype, base_dir))

    def write(folder: Path) -> None:
        write_weights(model, folder, config)
        tokenizer.save_pretrained(folder)

    return run.save_folder(FOLDER, write)


def write_policy(model, tokenizer, folder: Path, config, base_dir: Path) -> None:
    """The trained model (LoRA merged) in --save-dtype, or with --save-adapter the adapter alone, whose config names
    the base model as others know it; and the tokenizer."""
    if config.use_lora and config.save_adapter:
        for adapter in model.peft_config.values():
            adapter.base_model_name_or_path = portable_name(config.model, base_dir)
        model.save_pretrained(folder)
    else:
        if config.use_lora and quantized_layers(model):
            model = merged_at_full_precision(model, base_dir, config)
        elif config.use_lora:
            # in place: training is over, and a merged copy would add a whole model to the run's peak memory
            model = model.merge_and_unload()
        model.to(save_dtype(config.save_dtype, base_dir))  # training is over: no float32 copy is needed any more
        model.config.use_cache = True
        write_weights(model, folder, config)
        model.config.use_cache = False
    tokenizer.save_pretrained(folder)


def write_weights(model, folder: Path, config) -> None:
    """safetensors only, split into files of at most --save-max-shard-size with an index, as transformers reads
    them."""
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=config.save_max_shard_size)


def merged_at_full_precision(model, base_dir: Path, config):
    """A QLoRA run's adapter merged into its base reloaded unquantised: merging into the 4-/8-bit weights would bake
    their rounding into every saved weight."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    full = get_peft_model(load_causal_lm(base_dir, config.trust_remote_code), model.peft_config["default"])
    set_peft_model_state_dict(full, get_peft_model_state_dict(model))
    return full.merge_and_unload()


def save_dtype(choice: str, base_dir: Path) -> torch.dtype:
    """--save-dtype: a name, or auto = the dtype the base model's config.json records (float32 when none)."""
    if choice == "auto":
        try:
            recorded = json.loads((Path(base_dir) / "config.json").read_text())
        except (OSError, ValueError):
            recorded = {}
        choice = recorded.get("dtype") or recorded.get("torch_dtype") or "float32"
    return getattr(torch, choice) if isinstance(getattr(torch, choice, None), torch.dtype) else torch.float32


def complete_model_folder(run: RunDir, summary: dict, config, base_dir: Path) -> None:
    """model/README.md: the Hub's metadata (base model, library, tags) and what the run measured; then, with
    --push-to-hub, the folder goes to the Hub."""
    adapter = bool(getattr(config, "save_adapter", False) and config.use_lora)
    hub_data = [p for p in (getattr(config, "data", None), getattr(config, "prompts", None)) if p and is_hub_dataset(p)]
    card = model_card(summary, portable_name(config.model, base_dir), adapter, hub_data)
    write_text_atomically(run.path / FOLDER / "README.md", card, "the model card")
    if config.push_to_hub:
        push_folder(run.path / FOLDER, config.hub_model_id, config.hub_private,
                    f"thumbalign: {summary.get('method') or summary.get('kind')} on {config.model}")


def push_folder(folder: Path, repo_id: str, private: bool, message: str) -> str:
    """Create the Hub repository if missing and upload the folder in one commit; one line on failure."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalTokenNotFoundError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    except LocalTokenNotFoundError:
        raise ThumbalignError(f"--push-to-hub {repo_id}: not logged in to the Hub (hf auth login, or set HF_TOKEN); "
                              f"the model is saved in {folder}") from None
    except Exception as err:  # the Hub's HTTP errors, the network's, the HTTP client's: the run itself succeeded
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ThumbalignError(f"--push-to-hub {repo_id}: {reason}; the model is saved in {folder}") from None
    return str(commit)
