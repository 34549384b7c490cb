"""Checks that need a CUDA GPU (marked `gpu`, skipped elsewhere); `benchmarks/gpu_check.sh` runs them. They repeat,
on the GPU, what the CPU tests establish: bf16 training moves the weights sanely, and QLoRA's gradients are those of
LoRA on the dequantised weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_feedback, write_jsonl
from thumbalign.cli import main

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("lora", [False, True])
def test_bf16_training_on_the_gpu_learns_and_saves_a_float_folder(tmp_path, tiny_llama, lora):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(32))
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--model", str(tiny_llama), "--output-dir", str(out), "--bf16", "true",
                 "--learning-rate", "1e-3", "--max-steps", "8", "--per-device-train-batch-size", "4",
                 "--logging-steps", "1", "--no-report", *(["--use-lora"] if lora else [])]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert lines[-1]["accuracy"] >= lines[0]["accuracy"]
    trained, base = load_file(str(out / "model" / "model.safetensors")), load_file(
        str(tiny_llama / "model.safetensors"))
    assert any(not torch.equal(trained[k], base[k]) for k in base)  # bf16 updates were not rounded away


def test_qlora_gradients_on_the_gpu(tiny_llama_wide):
    from test_qlora import check_qlora_gradients

    check_qlora_gradients(tiny_llama_wide, "cuda")


def test_liger_log_probs_and_gradients_equal_the_chunked_ones_on_the_gpu(tokenizer):
    """The installed liger-kernel against thumbalign's own computation (what --use-liger checks at start-up)."""
    pytest.importorskip("liger_kernel")
    from conftest import make_model
    from test_logprobs import _batch
    from thumbalign.engine.logprobs import check_liger

    model = make_model("llama", len(tokenizer)).cuda()
    batch, _ = _batch(tokenizer)
    assert check_liger(model, *(batch[k].cuda() for k in ("input_ids", "attention_mask", "completion_mask"))) < 2e-2


@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_engines_place_the_model_on_the_gpu_and_train_like_a_plain_run(tmp_path, tiny_llama, engine):
    """One CUDA process under FSDP2 and under ZeRO-3 (launched under the config): the model waits in CPU memory and
    reaches the GPU a unit (FSDP) or a parameter (ZeRO-3) at a time, buffers included. Both end where the plain GPU
    run ends."""
    from test_sharded import DEEPSPEED, DEEPSPEED_SITE, _args, _close, _finish, _start, _weights

    if engine == "zero3" and not (DEEPSPEED_SITE / "deepspeed").is_dir():
        pytest.skip("DeepSpeed is not installed beside the virtual environment (make install)")
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    common = ("--max-steps", 4, "--per-device-train-batch-size", 4, "--eval-split", "0.3", "--udm", "--udm-encoder",
              "policy")
    _finish(_start(_args(["train"], data, tiny_llama, tmp_path / "plain", *common), tmp_path, "plain.log"))
    _finish(_start(_args(["train"], data, tiny_llama, tmp_path / engine, *common, "--num-processes", 1,
                         "--accelerate-config", engine), tmp_path, f"{engine}.log", DEEPSPEED))
    _close(_weights(tmp_path / "plain"), _weights(tmp_path / engine), atol=1e-4)


def test_judged_answers_on_the_gpu_equal_those_on_the_cpu(tmp_path, tiny_llama):
    """The judged comparison (`thumbalign eval`, --eval-prompts) runs on the GPU where there is one: greedy answers
    in float32 there are the CPU's."""
    from thumbalign.analysis.judged import judged_generations
    from thumbalign.analysis.judges import load_judge

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ("q0?", "what is 2+2", "hello there")])
    answers = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.jsonl"
        judged_generations({"m": tiny_llama}, str(prompts), load_judge("vader"), out, max_new_tokens=6,
                           progress=False, device=device)
        answers[device] = [json.loads(line)["answer"] for line in out.read_text().splitlines()]
    assert answers["cuda"] == answers["cpu"]
