import pytest
import torch

from conftest import make_model
from thumbalign.data.records import Record
from thumbalign.data.batching import collate
from thumbalign.engine.logprobs import completion_logps, naive_completion_logps
from thumbalign.data.tokens import tokenize_records


def _batch(tokenizer, max_length=64):
    records = [Record("short", "a", True), Record("a much longer prompt here", "and a longer completion", False),
               Record([{"role": "user", "content": "chat?"}], [{"role": "assistant", "content": "yes"}], True),
               Record("x" * 40, "kept whole", False)]
    examples, report = tokenize_records(tokenizer, records, max_length=max_length)
    return collate(examples, tokenizer.pad_token_id), report


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("max_length", [64, 20])  # 20: the last prompt is truncated
def test_chunked_completion_logps_equal_full_logits(tokenizer, kind, max_length):
    model = make_model(kind, len(tokenizer))
    batch, report = _batch(tokenizer, max_length)
    assert (report.prompt_truncated > 0) == (max_length == 20)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    naive = naive_completion_logps(model, *args)
    for chunk in (3, 2048):
        with torch.no_grad():
            assert torch.allclose(completion_logps(model, *args, chunk_size=chunk), naive.detach(), atol=1e-5)
    # gradients agree too (the chunked path is checkpointed)
    chunked = completion_logps(model, *args, chunk_size=5)
    g1 = torch.autograd.grad(chunked.sum(), model.model.embed_tokens.weight)[0]
    g2 = torch.autograd.grad(naive_completion_logps(model, *args).sum(), model.model.embed_tokens.weight)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_padding_does_not_change_a_sequence_log_prob(tokenizer):
    model = make_model("llama", len(tokenizer))
    batch, _ = _batch(tokenizer)
    with torch.no_grad():
        together = completion_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            alone = completion_logps(model, batch["input_ids"][row:row + 1, :n],
                                     batch["attention_mask"][row:row + 1, :n], batch["completion_mask"][row:row + 1, :n])
            assert alone.item() == pytest.approx(together[row].item(), abs=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("max_length", [64, 20])
def test_packed_batches_give_the_same_log_probs(tokenizer, kind, max_length):
    from thumbalign.data.batching import collate_packed

    model = make_model(kind, len(tokenizer))
    records = [Record("short", "a", True), Record("a much longer prompt here", "and a longer completion", False),
               Record([{"role": "user", "content": "chat?"}], [{"role": "assistant", "content": "yes"}], True),
               Record("x" * 40, "kept whole", False)]
    examples, _ = tokenize_records(tokenizer, records, max_length=max_length)
    padded = collate(examples, tokenizer.pad_token_id)
    packed = collate_packed(examples)
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))  # not a pad token in it
    naive = naive_completion_logps(model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"])
    got = completion_logps(model, packed["input_ids"], packed["attention_mask"], packed["completion_mask"],
                           chunk_size=7, position_ids=packed["position_ids"], sequence_ids=packed["sequence_ids"])
    assert got.shape == naive.shape and torch.allclose(got, naive.detach(), atol=1e-5)


# --------------------------------------------------------------------------- --use-liger's guard

class _ScalarUpstreamLinearCE(torch.autograd.Function):
    """A fused linear cross-entropy whose backward scales every token's gradient by the first upstream value: the
    fault of Liger versions whose backward multiplies stored gradients by a single number."""

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        with torch.enable_grad():
            h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
            logits = h @ w.T
            loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
            grad_h, grad_w = torch.autograd.grad(loss.sum(), (h, w))
        ctx.save_for_backward(grad_h, grad_w)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_output[0], grad_w * grad_output[0], None


@pytest.mark.parametrize("faulty", [False, True])
def test_the_liger_check_passes_a_faithful_kernel_and_refuses_one_with_scalar_upstream_gradients(
        tokenizer, monkeypatch, faulty):
    """Liger itself needs a CUDA GPU; the check that guards --use-liger is tested here with stand-ins for its kernel:
    the chunked computation itself (must pass) and a kernel with the scalar-upstream fault (must be refused)."""
    from thumbalign.engine import logprobs

    def stand_in(hidden, targets, weight, bias):
        if faulty:
            return -_ScalarUpstreamLinearCE.apply(hidden, weight, targets)
        return logprobs._target_logps(hidden, targets, weight, bias)

    monkeypatch.setattr(logprobs, "liger_target_logps", stand_in)
    model = make_model("llama", len(tokenizer))
    batch, _ = _batch(tokenizer)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    if faulty:
        with pytest.raises(ValueError, match="differ from thumbalign's own"):
            logprobs.check_liger(model, *args)
    else:
        assert logprobs.check_liger(model, *args) < 1e-5
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradients behind


def test_use_liger_without_the_package_or_a_gpu_is_one_line(tmp_path, tiny_llama, capsys):
    from conftest import toy_feedback, write_jsonl
    from test_faults import _one_line
    from thumbalign.cli import main

    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    assert main(["train", "--data", str(data), "--model", str(tiny_llama), "--output-dir", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-report", "--use-liger"]) == 2
    line = _one_line(capsys)
    assert "--use-liger: liger-kernel is not installed" in line or "Triton kernels for CUDA GPUs" in line
