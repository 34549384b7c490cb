"""QLoRA on this CPU (bitsandbytes >= 0.46 has CPU kernels): a base held in 4 or 8 bits, LoRA trained on top, the
adapter merged into the full-precision base at the end. And gradient checkpointing switched on by model size."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_feedback, write_jsonl
from thumbalign.cli import main
from thumbalign.engine.logprobs import completion_logps
from thumbalign.engine.models import load_causal_lm, quantized_layers, wants_gradient_checkpointing
from thumbalign.trainers.model_setup import make_trainable

pytest.importorskip("bitsandbytes")


def _lora_settings(**kw):
    values = dict(use_lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear",
                  gradient_checkpointing=False)
    values.update(kw)
    return SimpleNamespace(**values)


def test_qlora_gradients_are_those_of_lora_on_the_dequantised_weights(tiny_llama_wide):
    """The 4-bit layers must pass gradients through to the adapters: the same LoRA weights on a float model holding
    exactly the dequantised 4-bit weights give the same loss and (to bitsandbytes' internal precision) gradients."""
    check_qlora_gradients(tiny_llama_wide, "cpu")


def check_qlora_gradients(model_dir, device: str):
    import bitsandbytes.functional as bnbf

    quantised = load_causal_lm(model_dir, bits=4, device=device)
    assert quantized_layers(quantised) == 14  # 2 blocks × (q, k, v, o, gate, up, down)
    dequantised = {f"{name}.weight": bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                   for name, m in quantised.named_modules() if type(m).__name__ == "Linear4bit"}
    plain = load_causal_lm(model_dir).to(device)
    plain.load_state_dict({**plain.state_dict(), **dequantised})
    qlora, lora = make_trainable(quantised, _lora_settings()), make_trainable(plain, _lora_settings())
    with torch.no_grad():  # the same, non-zero adapters on both (B starts at zero, which would hide A's gradient)
        torch.manual_seed(0)
        for (name, p), (other, q) in zip(qlora.named_parameters(), lora.named_parameters(), strict=True):
            assert name == other
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
                q.copy_(p)
    ids = torch.randint(0, 200, (2, 9), device=device)
    mask, completion = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 5:] = True
    with torch.no_grad():  # as the trainer's reference pass does first: in eval mode, without gradients
        completion_logps(qlora.eval(), ids, mask, completion)
    qlora.train()
    losses = [-completion_logps(m, ids, mask, completion).sum() for m in (qlora, lora)]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-4)
    for loss in losses:
        loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (qlora, lora)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    worst = 0.0
    for name, g in grads[1].items():
        assert grads[0][name] is not None and g.norm() > 0, name
        # bitsandbytes' CPU kernels compute in reduced precision: about 1% apart, where a gradient lost in a 4-bit
        # layer (or one of the wrong sign) would be 100% or more apart
        worst = max(worst, float((grads[0][name] - g).norm() / g.norm()))
        assert torch.nn.functional.cosine_similarity(grads[0][name].flatten(), g.flatten(), dim=0) > 0.999, name
    assert worst < 0.05


@pytest.mark.parametrize("bits", [4, 8])
def test_train_with_a_quantised_base_saves_the_adapter_merged_into_full_precision(tmp_path, tiny_llama_wide, bits):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", str(tiny_llama_wide), "--output-dir", str(out),
                 "--learning-rate", "1e-2", "--bf16", "false", "--max-steps", "3", "--per-device-train-batch-size",
                 "4", "--no-report", "--use-lora", "--lora-target-modules", "q_proj,v_proj",
                 f"--load-in-{bits}bit"]) == 0
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "model" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, as transformers loads any other
    base, trained = load_file(str(tiny_llama_wide / "model.safetensors")), load_file(
        str(out / "model" / "model.safetensors"))
    for name, weight in base.items():
        if "q_proj" in name or "v_proj" in name:  # the merged adapter moved these
            assert not torch.equal(trained[name], weight), name
        else:  # untouched weights are the base's own, not their 4-/8-bit rounding
            assert torch.equal(trained[name], weight), name
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("flags,message", [
    (("--load-in-4bit",), "--load-in-4bit freezes the base weights in low precision: add --use-lora"),
    (("--load-in-4bit", "--load-in-8bit", "--use-lora"), "--load-in-4bit and --load-in-8bit exclude each other"),
    (("--load-in-4bit", "--use-lora", "--method", "reward-token"), "--method reward-token adds tokens"),
])
def test_quantised_loading_that_cannot_work_is_one_line(tmp_path, tiny_llama_wide, capsys, flags, message):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    assert main(["train", "--data", str(data), "--model", str(tiny_llama_wide), "--output-dir", str(tmp_path / "r"),
                 *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err[-2000:]


def test_gradient_checkpointing_is_on_by_default_from_one_billion_parameters():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # shapes only: no memory for a 1B model
        big = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4))
        small = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=576, intermediate_size=1536,
                                             num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3))
    assert big.num_parameters() >= 1e9 > small.num_parameters()
    assert wants_gradient_checkpointing(big, None) and not wants_gradient_checkpointing(small, None)
    assert not wants_gradient_checkpointing(big, False) and wants_gradient_checkpointing(small, True)
