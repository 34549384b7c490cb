"""Running a model without training it: batched log-probs, prompt embeddings, and generation.

The reference pass, evaluation, UDM's policy embeddings, judged generations, best-of-n and online sampling all
come through here.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.batching import collate
from ..data.tokens import Example
from .logprobs import CompletionLogps, completion_logps


@torch.no_grad()
def batched_logps(model, examples: list[Example], pad_token_id: int, batch_size: int, device, autocast=nullcontext,
                  chunk_size: int = 2048, desc: str = "log-probs", disable_bar: bool = False) -> torch.Tensor:
    """log π(y|x) for each example, in input order. Examples are sorted by length so batches carry little padding.
    `model` is a causal LM, or the engine's :class:`CompletionLogps` (a sharded model is only whole inside its
    forward)."""
    was_training = model.training
    model.eval()
    if isinstance(model, CompletionLogps):
        scorer = model
    else:
        def scorer(input_ids, attention_mask, completion_mask):
            return completion_logps(model, input_ids, attention_mask, completion_mask, chunk_size)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    out = torch.zeros(len(examples), dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=disable_bar):
        idx = order[start:start + batch_size]
        batch = collate([examples[i] for i in idx], pad_token_id)
        with autocast():
            logps = scorer(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                           batch["completion_mask"].to(device))
        out[idx] = logps.float().cpu()
    model.train(was_training)
    return out


@torch.no_grad()
def prompt_embeddings(model, examples: list[Example], pad_token_id: int, batch_size: int, device,
                      disable_bar: bool = False) -> np.ndarray:
    """The model's last hidden states, mean-pooled over each prompt's tokens, L2-normalised (UDM's 'policy'
    encoder: no extra model)."""
    was_training = model.training
    model.eval()
    decoder = model.get_decoder()
    out = []
    for start in tqdm(range(0, len(examples), batch_size), desc="embedding prompts", unit="batch",
                      disable=disable_bar):
        prompts = [Example(e.input_ids[:e.prompt_len], e.prompt_len, e.label, e.record_index)
                   for e in examples[start:start + batch_size]]
        batch = collate(prompts, pad_token_id)
        mask = batch["attention_mask"].to(device)
        hidden = decoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state.float()
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def render_prompt(tokenizer, prompt) -> str:
    """A conversation through the chat template, ready for the assistant's turn; plain text as it is."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


def with_reward_token(model, text: str, condition: str | None) -> str:
    """A rendered prompt for a model trained with reward tokens (``--method reward-token``): its saved template
    already ends a chat prompt with the 👍 token; `condition` ('up', 'down' or 'none') puts the one asked for
    there instead. Models without reward tokens, and condition None, leave the text as it is."""
    tokens = getattr(model.config, "thumbalign_reward_tokens", None)
    if not tokens or condition is None:
        return text
    for token in tokens.values():
        text = text.removesuffix(token)
    return text + tokens.get(condition, "")


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float, seed: int,
             num_return_sequences: int = 1, top_k: int | None = None, condition: str | None = None) -> list[str]:
    """One batch, left-padded, with the KV cache; greedy when temperature is 0, else seeded sampling (`top_k`:
    None keeps the model's generation config, 0 samples from the whole distribution). Returns
    `num_return_sequences` answers per prompt, prompt by prompt. `condition`: see :func:`with_reward_token`."""
    tokenizer.padding_side = "left"
    texts = [with_reward_token(model, render_prompt(tokenizer, p), condition) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not isinstance(prompts[0], list))
    enc = {k: v.to(model.device) for k, v in enc.items()}
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    if temperature > 0 and top_k is not None:
        sampling["top_k"] = top_k
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                         num_return_sequences=num_return_sequences, **sampling)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out[:, enc["input_ids"].shape[1]:]]


class RowSeededSampling:
    """A transformers logits processor that samples each row's next token from softmax(logits / temperature) with
    the row's own random generator, and leaves only that token possible (greedy decoding then takes it). An answer
    thus depends on its seed alone — not on the batch, the process or the other answers it was generated with — so
    a resumed run, or the same run on more processes, samples exactly the same answers."""

    def __init__(self, seeds: list[int], temperature: float, device):
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        chosen = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, chosen.unsqueeze(1), 0.0)


@torch.no_grad()
def sample_answers(model, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int, temperature: float,
                   pad_token_id: int, eos_token_id: int | None, synced: bool = False) -> list[list[int]]:
    """One answer per prompt (token ids), each sampled with its own seed (greedy when temperature is 0), with the
    KV cache and left padding. An answer ends with the EOS token when the model produced one. `synced`: the weights
    are sharded over the processes, so each keeps running forward passes until all of them have finished (every
    process must call this as many times as the others)."""
    from transformers import LogitsProcessorList

    width = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    processors = LogitsProcessorList([RowSeededSampling(seeds, temperature, model.device)] if temperature > 0 else [])
    out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                         max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, use_cache=True, synced_gpus=synced)
    answers = []
    for ids in out[:, width:].tolist():
        if eos_token_id is not None and eos_token_id in ids:
            ids = ids[:ids.index(eos_token_id) + 1]
        answers.append(ids)
    return answers
