"""Where tokens become log-probs.

``completion_logps`` returns log π(y|x) = Σ_t log π(y_t | x, y_<t) over completion tokens only. It never builds the
[batch, length, vocab] logits tensor: the decoder's hidden states are gathered at the completion positions, and the
output projection + log-softmax run on those rows in chunks. With gradients on, each chunk is checkpointed, so its
logits are recomputed in the backward pass instead of being kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .tokens import Example


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors; ``completion_mask`` marks the tokens the loss sees."""
    length = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    completion_mask = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        attention_mask[row, :n] = 1
        completion_mask[row, e.prompt_len:n] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        **_per_example(examples),
    }


def _per_example(examples: list[Example]) -> dict[str, torch.Tensor]:
    return {
        "labels": torch.tensor([e.label for e in examples], dtype=torch.bool),
        "index": torch.tensor([e.index for e in examples], dtype=torch.long),
        "completion_lengths": torch.tensor([e.completion_len for e in examples], dtype=torch.long),
        "n_tokens": torch.tensor(sum(len(e.input_ids) for e in examples)),
    }


def collate_packed(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Padding-free: every example of the micro-batch in one row, back to back. Positions restart at each example
    and a block-diagonal causal mask ([1, 1, T, T], True = may attend) keeps each example's attention to itself, so
    every log-prob equals the unpacked one. `sequence_ids` says which example each token belongs to."""
    input_ids = torch.tensor([t for e in examples for t in e.input_ids]).unsqueeze(0)
    sequence = torch.cat([torch.full((len(e.input_ids),), k) for k, e in enumerate(examples)])
    positions = torch.cat([torch.arange(len(e.input_ids)) for e in examples]).unsqueeze(0)
    completion = torch.cat([torch.arange(len(e.input_ids)) >= e.prompt_len for e in examples]).unsqueeze(0)
    length = input_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (causal & (sequence[:, None] == sequence[None, :]))[None, None]
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions, "completion_mask": completion,
            "sequence_ids": sequence.unsqueeze(0), **_per_example(examples)}


def _target_logps(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor, chunk_size: int = 2048, position_ids=None,
                     sequence_ids=None) -> torch.Tensor:
    """Sum of completion-token log-probs per sequence, shape [sequences], in float32.

    Takes a right-padded batch (`collate`) or a packed one (`collate_packed`: `position_ids` and `sequence_ids`
    given; a packed example's first token is a prompt token, so no log-prob crosses from one example to the next).
    Works for decoder-only transformers models (and peft wrappers of them) whose logits are
    ``lm_head(decoder(x))`` with no extra scaling; models with logit soft-capping are not supported.
    """
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    # position t predicts token t+1
    mask = completion_mask[:, 1:]
    if sequence_ids is None:
        rows, n_rows = mask.nonzero(as_tuple=True)[0], input_ids.shape[0]
    else:
        rows, n_rows = sequence_ids[:, 1:][mask], int(sequence_ids.max()) + 1
    states = hidden[:, :-1][mask]
    targets = input_ids[:, 1:][mask]
    head = model.get_output_embeddings()
    token_logps = []
    for start in range(0, states.shape[0], chunk_size):
        args = (states[start:start + chunk_size], targets[start:start + chunk_size], head.weight, head.bias)
        if torch.is_grad_enabled():
            token_logps.append(checkpoint(_target_logps, *args, use_reentrant=False))
        else:
            token_logps.append(_target_logps(*args))
    flat = torch.cat(token_logps) if token_logps else hidden.new_zeros(0, dtype=torch.float32)
    return torch.zeros(n_rows, dtype=torch.float32, device=flat.device).index_add(0, rows, flat)


def naive_completion_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """The plain full-logits computation; kept as the yardstick the chunked version is tested against."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    logps = logits.log_softmax(-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (logps * completion_mask[:, 1:]).sum(-1)


class CompletionLogps(torch.nn.Module):
    """The policy as the engine sees it: forward(batch) = completion log-probs.

    Distributed engines (DDP, DeepSpeed, FSDP) hook into the forward of the module they wrap; calling the decoder
    and the output projection of an unwrapped model would silently skip their gradient synchronisation. Wrapping
    this module instead keeps the memory-saving log-prob computation *inside* the engine's forward.
    """

    def __init__(self, model, chunk_size: int = 2048):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None, sequence_ids=None):
        return completion_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size,
                                position_ids, sequence_ids)
