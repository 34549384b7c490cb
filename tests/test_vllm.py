"""vLLM as the engine that writes the answers: the importance correction by hand, LoRA merged exactly for the
push, and — in the vLLM environment the Makefile builds (.venv/vllm, its own transformers) — the weights staying in
step after every optimizer step, a resumed run sampling what the uninterrupted one sampled, and the server mode
serving a trainer from the project's own environment."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model, make_tokenizer, save_tiny_model, write_jsonl
from thumbalign.engine.vllm_engine import checkpoint_weights
from thumbalign.methods.online_base import truncated_importance_weights

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv" / "vllm" / "bin" / "python"
needs_vllm = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment: make install-vllm")


# --------------------------------------------------------------------------- by hand, no vLLM needed

def test_truncated_importance_weights_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]], requires_grad=True)
    sampled = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -1.2, 0.0]])
    known = torch.tensor([[True, True, True], [True, True, False]])
    weights, difference = truncated_importance_weights(logps, sampled, known, cap=1.5)
    # w = min(exp(log π_θ − log π_vLLM), C): exp(0.5) = 1.65 is cut to 1.5; exp(−1), exp(0), exp(−2), exp(0.2)
    assert weights.flatten().tolist() == pytest.approx([1.5, math.exp(-1.0), 1.0, math.exp(-2.0), math.exp(0.2), 1.0])
    assert difference.flatten().tolist() == pytest.approx([0.5, 1.0, 0.0, 2.0, 0.2, 0.0])
    assert not weights.requires_grad  # a weight on the loss, never a path for its gradient
    # the weighted policy-gradient term: its gradient is the weight times the unweighted one, sign kept
    (-(weights * logps)).sum().backward()
    assert logps.grad.flatten().tolist() == pytest.approx((-weights).flatten().tolist())
    off, _ = truncated_importance_weights(logps, sampled, known, cap=0.0)
    assert off.tolist() == [[1.0] * 3] * 2  # cap 0: only logged


def test_the_pushed_weights_are_the_lora_model_merged_exactly():
    from peft import LoraConfig, get_peft_model

    tokenizer = make_tokenizer()
    model = get_peft_model(make_model("llama", len(tokenizer), seed=1),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():  # a trained adapter: B is 0 at the start, which would make any merge look right
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    weights = dict(checkpoint_weights(model))
    assert not any("lora" in name or "base_layer" in name for name in weights)
    assert "lm_head.weight" not in weights  # tied to the embeddings: vLLM ties it itself
    plain = make_model("llama", len(tokenizer), seed=99)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    plain.tie_weights()
    ids = torch.tensor([tokenizer("a question, and its answer")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
    # the base weights were not merged into and unmerged (that leaves rounding): untouched, bit for bit
    for k, v in model.get_base_model().state_dict().items():
        assert torch.equal(v, base_before[k]), k


def test_use_vllm_without_vllm_is_one_line(tmp_path, tiny_llama):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this environment")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}] * 4)
    proc = subprocess.run([sys.executable, "-m", "thumbalign", "online", "--model", str(tiny_llama), "--prompts",
                           str(prompts), "--reward", "vader", "--use-vllm", "--output-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "vLLM is not installed" in lines[0] and "pip install" in lines[0] and "vllm-serve" in lines[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- in the vLLM environment

def vllm_model(path: Path, talkative: bool = False) -> Path:
    """A tiny Llama vLLM's CPU attention runs (head size 64: 256 wide, 4 heads). `talkative`: the embeddings (tied
    to the output layer) of the special and the blank tokens zeroed, so that a greedy answer is text (the random
    model's favourite is a newline, which the answers' strip() would leave empty)."""
    save_tiny_model(path, "llama", hidden=256)
    if talkative:
        from safetensors.torch import save_file

        weights = load_file(path / "model.safetensors")
        tokenizer = make_tokenizer()
        for token in range(len(tokenizer)):
            if token in tokenizer.all_special_ids or not tokenizer.decode([token]).strip():
                weights["model.embed_tokens.weight"][token] = 0.0
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def run_vllm_env(args: list[str], timeout: int = 600, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([str(VLLM_PYTHON), *args], capture_output=True, text=True, timeout=timeout, env=env, **kw)


SYNC_CHECK = r'''
import json, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from thumbalign.engine.vllm_engine import EngineSettings, LocalEngine, checkpoint_weights
from thumbalign.engine.logprobs import completion_token_logps

def main(path, lora):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"]))
    engine = LocalEngine(EngineSettings(model_dir=path, dtype="float32", seed=0, max_model_len=128, max_num_seqs=8,
                                        gpu_memory_utilization=0.3))
    prompt, answer = list(range(5, 20)), list(range(40, 52))
    ids = torch.tensor([prompt + answer])
    completion = torch.tensor([[False] * len(prompt) + [True] * len(answer)])
    def trainer_logps():
        with torch.no_grad():
            out = completion_token_logps(model, ids, torch.ones_like(ids), completion)
        return out[0, len(prompt) - 1:].tolist()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    steps = []
    for step in range(3):
        optimizer.zero_grad()
        logps = completion_token_logps(model, ids, torch.ones_like(ids), completion)
        (-logps.sum()).backward()  # a real optimizer step: raise the fixed answer's log-prob
        optimizer.step()
        stale = engine.logps(prompt, answer)
        engine.load_weights(checkpoint_weights(model))
        synced = engine.logps(prompt, answer)
        mine = trainer_logps()
        steps.append({"stale": max(abs(a - b) for a, b in zip(stale, mine)),
                      "synced": max(abs(a - b) for a, b in zip(synced, mine))})
    engine.close()
    print("RESULT " + json.dumps(steps))

if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] == "lora")
'''


@needs_vllm
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_vllm_answers_with_the_weights_of_every_optimizer_step(tmp_path, kind):
    """After each push vLLM's log-probs of a fixed answer are the trainer's (within 1e-4, float32); before it they
    are the previous step's, far off."""
    model = vllm_model(tmp_path / "model")
    script = tmp_path / "sync_check.py"
    script.write_text(SYNC_CHECK)
    proc = run_vllm_env([str(script), str(model), kind])
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result, proc.stderr[-3000:]
    steps = json.loads(result[0][7:])
    assert len(steps) == 3
    for step in steps:
        assert step["synced"] < 1e-4, steps
        assert step["stale"] > 1e-2, steps


MANY_PROMPTS = r'''
import json, sys
from thumbalign.engine.vllm_engine import EngineSettings, LocalEngine

if __name__ == "__main__":
    engine = LocalEngine(EngineSettings(model_dir=sys.argv[1], dtype="float32", seed=0, max_model_len=160,
                                        max_num_seqs=64, gpu_memory_utilization=0.3))
    prompts = [[(7 * i + k) % 250 for k in range(120)] for i in range(64)]  # 7680 prompt tokens at once
    first, _ = engine.generate(prompts, list(range(64)), 1.0, 8, None)
    again, _ = engine.generate(prompts[:3], [0, 1, 2], 1.0, 8, None)
    engine.close()
    print("RESULT " + json.dumps({"answers": len(first), "same": first[:3] == again}))
'''


@needs_vllm
def test_many_long_seeded_prompts_at_once(tmp_path):
    """More prompt tokens than one engine step takes: vLLM would cut a prompt across two steps and then rewind that
    request's random generator, which a CPU generator cannot do (it crashed); prompts are prefilled whole. An answer
    is still a function of its seed: the same with 63 other requests beside it as with 2."""
    model = vllm_model(tmp_path / "model")
    script = tmp_path / "many.py"
    script.write_text(MANY_PROMPTS)
    proc = run_vllm_env([str(script), str(model)])
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result, proc.stderr[-3000:]
    assert json.loads(result[0][7:]) == {"answers": 64, "same": True}


def online_args(model, prompts, out, *extra):
    return ["-m", "thumbalign", "online", "--model", str(model), "--prompts", str(prompts), "--reward",
            "rewards_for_vllm:first_low", "--output-dir", str(out), "--max-steps", "4", "--num-generations", "4",
            "--per-device-train-batch-size", "2", "--max-new-tokens", "8", "--learning-rate", "5e-3",
            "--logging-steps", "1", "--save-steps", "2", "--bf16", "false", "--use-vllm", *extra]


REWARD = '''
def first_low(text):
    return bool(text) and ord(text[0]) < 128
'''


@pytest.fixture
def online_inputs(tmp_path):
    model = vllm_model(tmp_path / "model")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(8)])
    (tmp_path / "rewards_for_vllm.py").write_text(REWARD)
    return model, prompts


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _training_lines(run: Path) -> list[dict]:
    return [m for m in _metrics(run) if "reward_mean" in m]


def _same_lines(one: list[dict], two: list[dict]) -> None:
    volatile = {"samples_per_s", "tokens_per_s", "sampling_s", "sampling_answers_per_s"}  # timings
    assert len(one) == len(two)
    for a, b in zip(one, two):
        for key in a:
            if key in volatile:
                continue
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
            else:
                assert b[key] == a[key], key


@needs_vllm
def test_a_resumed_vllm_run_samples_and_trains_what_the_uninterrupted_one_did(tmp_path, online_inputs):
    model, prompts = online_inputs
    straight = tmp_path / "straight"
    proc = run_vllm_env(online_args(model, prompts, straight), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _training_lines(straight)
    assert len(lines) == 4 and all(m["sampler_logp_diff"] < 1e-4 for m in lines), lines

    # killed once the run has reported step 3 (its step-2 checkpoint is written by then), then resumed
    cut = tmp_path / "cut"
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([str(VLLM_PYTHON), *online_args(model, prompts, cut)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ((cut / "metrics.jsonl").exists() and any(m.get("step", 0) >= 3 for m in _metrics(cut))):
        assert proc.poll() is None, "the run ended before step 3"
        assert time.time() < deadline, "step 3 was never reported"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (cut / "model").exists()
    assert (cut / "checkpoints").exists()
    proc = run_vllm_env(online_args(model, prompts, cut, "--resume", "latest"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_lines(lines, _training_lines(cut))
    a, b = load_file(straight / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


@needs_vllm
@pytest.mark.parametrize("processes", ["one", "fsdp"])
def test_server_mode_serves_a_trainer_from_the_projects_own_environment(tmp_path, online_inputs, processes):
    """The server runs in the vLLM environment, the trainer in this one (another transformers). One process with
    LoRA; two FSDP processes fine-tuning every weight, whose shards are gathered once per step onto the main
    process, which pushes them while the other waits. After every push the server's log-probs are the trainer's."""
    model, prompts = online_inputs
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", "PYTHONPATH": str(ROOT / "src")}
    server = subprocess.Popen([str(VLLM_PYTHON), "-m", "thumbalign", "vllm-serve", "--model", str(model),
                               "--port", "0", "--max-model-len", "128", "--max-num-seqs", "16"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        url = None
        for line in server.stdout:
            if " at http://" in line:
                url = line.rsplit(" at ", 1)[1].strip()
                break
        assert url, "the server never said where it listens"
        run = tmp_path / "run"
        how = (["--use-lora", "--learning-rate", "5e-2"] if processes == "one" else
               ["--num-processes", "2", "--accelerate-config", "fsdp", "--per-device-train-batch-size", "1"])
        proc = subprocess.run([sys.executable, *online_args(model, prompts, run, "--vllm-mode", "server",
                                                            "--vllm-server-base-url", url, *how)],
                              capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = _training_lines(run)
        # the weights move every step (lr 5e-2 LoRA, 5e-3 full): without the pushes the server would answer with
        # the starting weights and these differences would be large
        assert len(lines) == 4 and all(m["sampler_logp_diff"] < 1e-4 for m in lines), lines
        assert json.loads((run / "summary.json").read_text())["world_size"] == (1 if processes == "one" else 2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@needs_vllm
def test_eval_answers_with_vllm_as_with_transformers(tmp_path):
    """Greedy answers of a float32 model are its argmax tokens, whichever engine computes them: `eval --use-vllm`
    judges the same answers as `eval`."""
    model = vllm_model(tmp_path / "model", talkative=True)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"question {i}"}]}
                                                       for i in range(6)])
    (tmp_path / "judge_for_vllm.py").write_text("def low(text, row=None):\n    return bool(text) and ord(text[0]) < 128\n")
    runs = {}
    for name, extra in (("plain", []), ("vllm", ["--use-vllm"])):
        proc = run_vllm_env(["-m", "thumbalign", "eval", "--model", str(model), "--baseline", str(model), "--prompts",
                             str(prompts), "--judge", "judge_for_vllm:low", "--max-new-tokens", "12",
                             "--output-dir", str(tmp_path / name), *extra], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = sorted((r["model"], r["i"], r["answer"], r["verdict"]) for r in map(
            json.loads, (tmp_path / name / "generations.jsonl").read_text().splitlines()))
    assert len(runs["plain"]) == 12 and any(answer for _, _, answer, _ in runs["plain"])
    assert runs["vllm"] == runs["plain"]


@needs_vllm
def test_train_eval_prompts_answered_by_vllm_as_by_transformers(tmp_path):
    """`train --eval-prompts --use-vllm`: the trained and the base model answer the held-out prompts through vLLM,
    greedily, and the answers (and verdicts) are those transformers gives."""
    model = vllm_model(tmp_path / "model", talkative=True)
    data = write_jsonl(tmp_path / "thumbs.jsonl", [{"prompt": f"item {i}", "completion": "yes" if i % 2 else "no",
                                                    "label": bool(i % 2)} for i in range(16)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": f"question {i}"} for i in range(4)])
    (tmp_path / "judge_for_vllm.py").write_text("def low(text, row=None):\n    return bool(text) and ord(text[0]) < 128\n")
    answers = {}
    for name, extra in (("plain", []), ("vllm", ["--use-vllm"])):
        run = tmp_path / name
        proc = run_vllm_env(["-m", "thumbalign", "train", "--data", str(data), "--model", str(model), "--output-dir",
                             str(run), "--max-steps", "2", "--per-device-train-batch-size", "4", "--bf16", "false",
                             "--learning-rate", "1e-2", "--eval-prompts", str(held), "--judge", "judge_for_vllm:low",
                             "--eval-max-new-tokens", "8", "--no-report", *extra], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[name] = sorted((r["model"], r["i"], r["answer"], r["verdict"]) for r in map(
            json.loads, (run / "generations.jsonl").read_text().splitlines()))
    assert len(answers["plain"]) == 8 and answers["vllm"] == answers["plain"]
    trained = [a for m, _, a, _ in answers["plain"] if m == "trained"]
    assert trained != [a for m, _, a, _ in answers["plain"] if m == "base"]  # training changed the answers


@needs_vllm
def test_best_of_n_with_vllm_writes_the_same_scored_rows_twice(tmp_path):
    """`best-of-n --use-vllm`: every prompt gets its n answers from vLLM, seeded (the same file twice), and each
    row kept carries the reward model's P(👍) of its answer."""
    from thumbalign.engine.reward_model import RewardModel
    from thumbalign.data.records import Record
    from thumbalign.trainers.config import RewardConfig
    from thumbalign.trainers.reward import train_reward_model

    model = vllm_model(tmp_path / "model", talkative=True)
    thumbs = write_jsonl(tmp_path / "thumbs.jsonl", [{"prompt": f"item {i}", "completion": "yes" if i % 2 else "no",
                                                      "label": bool(i % 2)} for i in range(16)])
    train_reward_model(RewardConfig(data=str(thumbs), model=str(model), output_dir=str(tmp_path / "rm"),
                                    eval_split=0.25, max_steps=2, per_device_train_batch_size=4, bf16="false",
                                    save_steps=100), log=lambda *a: None)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(3)])
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        proc = run_vllm_env(["-m", "thumbalign", "best-of-n", "--model", str(model), "--rm", str(tmp_path / "rm" / "model"),
                             "--prompts", str(prompts), "-o", str(out), "--n", "4", "--max-new-tokens", "8",
                             "--use-vllm"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(out.read_text())
    assert outputs[0] == outputs[1]
    rows = [json.loads(line) for line in outputs[0].splitlines()]
    assert len(rows) == 3 and all(r["n"] >= 1 and r["completion"] for r in rows)
    scorer = RewardModel(str(tmp_path / "rm" / "model"))
    for row in rows:
        p = scorer.probabilities([Record(row["prompt"], row["completion"], True)])[0]
        assert p == pytest.approx(row["p_up"], abs=1e-4)
