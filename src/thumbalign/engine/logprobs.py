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


def _target_logps(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def liger_target_logps(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """The same as the chunked projection, by Liger's fused linear cross-entropy kernel (log π = −CE per token). Its
    backward scales stored gradients by the upstream gradient, which some Liger versions do for a single number only:
    :func:`check_liger` compares it with the chunked computation before a run trusts it."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    loss = liger_fused_linear_cross_entropy(hidden, weight, targets, bias, reduction="none")
    loss = getattr(loss, "loss", loss[0] if isinstance(loss, tuple) else loss)
    return -loss.float()


def _flat_completion_logps(model, input_ids, attention_mask, completion_mask, chunk_size, position_ids,
                           fused: bool = False):
    """log π of every completion token, flattened in row-major order, and the mask of where they sit. `fused`:
    through Liger's kernel instead of the chunked projection."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    # position t predicts token t+1
    mask = completion_mask[:, 1:]
    states = hidden[:, :-1][mask]
    targets = input_ids[:, 1:][mask]
    head = model.get_output_embeddings()
    if fused and states.shape[0]:
        return liger_target_logps(states, targets, head.weight, head.bias), mask
    token_logps = []
    for start in range(0, states.shape[0], chunk_size):
        args = (states[start:start + chunk_size], targets[start:start + chunk_size], head.weight, head.bias)
        if torch.is_grad_enabled():
            token_logps.append(checkpoint(_target_logps, *args, use_reentrant=False))
        else:
            token_logps.append(_target_logps(*args))
    flat = torch.cat(token_logps) if token_logps else hidden.new_zeros(0, dtype=torch.float32)
    return flat, mask


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     completion_mask: torch.Tensor, chunk_size: int = 2048, position_ids=None,
                     sequence_ids=None, fused: bool = False) -> torch.Tensor:
    """Sum of completion-token log-probs per sequence, shape [sequences], in float32.

    Takes a right-padded batch (`collate`) or a packed one (`collate_packed`: `position_ids` and `sequence_ids`
    given; a packed example's first token is a prompt token, so no log-prob crosses from one example to the next).
    Works for decoder-only transformers models (and peft wrappers of them) whose logits are
    ``lm_head(decoder(x))`` with no extra scaling; models with logit soft-capping are not supported.
    """
    flat, mask = _flat_completion_logps(model, input_ids, attention_mask, completion_mask, chunk_size, position_ids,
                                        fused)
    if sequence_ids is None:
        rows, n_rows = mask.nonzero(as_tuple=True)[0], input_ids.shape[0]
    else:
        rows, n_rows = sequence_ids[:, 1:][mask], int(sequence_ids.max()) + 1
    return torch.zeros(n_rows, dtype=torch.float32, device=flat.device).index_add(0, rows, flat)


def completion_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           completion_mask: torch.Tensor, chunk_size: int = 2048, fused: bool = False) -> torch.Tensor:
    """Per-token log-probs of a right-padded batch, shape [batch, length − 1], float32: entry t is
    log π(input_ids[t+1] | input_ids[≤t]) where token t+1 is a completion token, and 0 elsewhere. The same chunked
    computation as :func:`completion_logps`, for losses that weigh tokens one by one (online objectives)."""
    flat, mask = _flat_completion_logps(model, input_ids, attention_mask, completion_mask, chunk_size, None, fused)
    return torch.zeros(mask.shape, dtype=torch.float32, device=flat.device).masked_scatter(mask, flat)


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

    def __init__(self, model, chunk_size: int = 2048, fused: bool = False):
        super().__init__()
        self.model, self.chunk_size, self.fused = model, chunk_size, fused

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None, sequence_ids=None,
                per_token: bool = False):
        if per_token:
            return completion_token_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size,
                                          self.fused)
        return completion_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size,
                                position_ids, sequence_ids, self.fused)


def check_liger(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                chunk_size: int = 2048, tolerance: float = 2e-2) -> float:
    """Liger's log-probs against the chunked computation on one batch: the values, and the gradients of a sum that
    weighs every sequence differently (as the losses do). Returns the largest relative difference; raises
    ValueError above `tolerance`."""
    weights = torch.linspace(-1.0, 2.0, input_ids.shape[0], device=input_ids.device)
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        logps = completion_logps(model, input_ids, attention_mask, completion_mask, chunk_size, fused=fused)
        (logps * weights).sum().backward()
        grads = [p.grad.detach().float().clone() for p in model.parameters() if p.grad is not None]
        results.append((logps.detach().float(), grads))
    model.zero_grad(set_to_none=True)
    (plain, plain_grads), (fused, fused_grads) = results

    def relative(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp(min=1e-6))

    worst = max([relative(fused, plain)] + [relative(f, p) for f, p in zip(fused_grads, plain_grads)])
    if len(fused_grads) != len(plain_grads) or worst > tolerance:
        raise ValueError(f"the installed liger-kernel's log-probs or gradients differ from thumbalign's own by up to "
                         f"{worst:.2g} (relative)")
    return worst
