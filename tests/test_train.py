"""End-to-end training runs with tiny real models, in-process and through the real console script."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_feedback, write_jsonl
from thumbalign.cli import main
from thumbalign.trainers.config import TrainConfig
from thumbalign.trainers.policy import train


def _config(tmp_path, model, **overrides):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "feedback.jsonl", toy_feedback(16))
    values = dict(data=str(data), eval_data=str(data), model=str(model), output_dir=str(tmp_path / "run"),
                  learning_rate=1e-3, max_steps=30, per_device_train_batch_size=4, logging_steps=5, bf16="false",
                  save_steps=10, warmup_ratio=0.0)
    values.update(overrides)
    config = TrainConfig(**values)
    config.validate()
    return config


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2"])
def test_tiny_model_overfits_a_small_file(tmp_path, model_fixture, request):
    summary = train(_config(tmp_path, request.getfixturevalue(model_fixture)), log=lambda *a: None)
    assert summary["eval_before"]["accuracy"] == 0.5  # policy == reference: every reward ties at 0
    after = summary["eval_after"]
    assert after["accuracy"] >= 0.9
    # the gradient pushed 👍 log-probs up and 👎 down relative to the reference
    assert after["mean_score_up"] > 0 > after["mean_score_down"]
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [5, 10, 15, 20, 25, 30]
    assert all(k in lines[-1] for k in ("loss", "rewards_up", "rewards_down", "margin", "delta", "accuracy", "lr",
                                        "samples_per_s", "tokens_per_s"))


def test_final_model_folder_loads_with_transformers(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train(_config(tmp_path, tiny_llama, max_steps=3), log=lambda *a: None)
    folder = tmp_path / "run" / "model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["train_examples"] == {"total": 16, "thumbs_up": 8, "thumbs_down": 8}
    assert summary["steps"] == 3 and "final_metrics" in summary


def test_resumed_run_ends_with_the_same_weights(tmp_path, tiny_llama):
    quiet = lambda *a: None  # noqa: E731
    straight = _config(tmp_path / "a", tiny_llama, max_steps=12, save_steps=4, save_total_limit=5,
                       gradient_accumulation_steps=2, per_device_train_batch_size=3)
    reference = train(straight, log=quiet)

    interrupted = _config(tmp_path / "b", tiny_llama, max_steps=12, save_steps=4, save_total_limit=5,
                          gradient_accumulation_steps=2, per_device_train_batch_size=3)
    train(interrupted, log=quiet)
    # throw away everything after step 4, as if the run had died there
    run = tmp_path / "b" / "run"
    for name in ("step-000008", "step-000012"):
        shutil.rmtree(run / "checkpoints" / name)
    resumed = _config(tmp_path / "b", tiny_llama, max_steps=12, save_steps=4, save_total_limit=5,
                      gradient_accumulation_steps=2, per_device_train_batch_size=3, resume="latest")
    summary = train(resumed, log=quiet)
    a = load_file(str(tmp_path / "a" / "run" / "model" / "model.safetensors"))
    b = load_file(str(run / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert summary["reward_shift"] == reference["reward_shift"]  # δ was restored, not restarted
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no step logged twice


def test_reference_log_probs_are_cached_between_runs(tmp_path, tiny_llama):
    first = train(_config(tmp_path, tiny_llama, max_steps=1), log=lambda *a: None)
    second = train(_config(tmp_path, tiny_llama, max_steps=1, output_dir=str(tmp_path / "run2")),
                   log=lambda *a: None)
    assert first["reference_logps_from_cache"] is False and second["reference_logps_from_cache"] is True
    files = list((tmp_path / "cache" / "reflogps").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"


def test_micro_batches_of_one_class_train_without_nan(tmp_path, tiny_llama):
    summary = train(_config(tmp_path, tiny_llama, per_device_train_batch_size=1, max_steps=8, logging_steps=1,
                            delta="balanced"), log=lambda *a: None)
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    for m in lines:
        assert all(v is None or v == v for v in m.values())  # no NaN anywhere
        assert (m["rewards_up"] is None) != (m["rewards_down"] is None)  # each step saw one class
    assert summary["final_metrics"]["loss"] > 0


def test_lora_run_saves_a_merged_model_or_the_adapter(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    train(_config(tmp_path, tiny_llama, use_lora=True, lora_r=4, max_steps=3), log=lambda *a: None)
    merged = tmp_path / "run" / "model"
    assert not (merged / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(merged)
    train(_config(tmp_path, tiny_llama, use_lora=True, lora_r=4, max_steps=3, save_adapter=True,
                  output_dir=str(tmp_path / "run2")), log=lambda *a: None)
    assert (tmp_path / "run2" / "model" / "adapter_config.json").exists()
    saved = load_file(str(tmp_path / "run2" / "checkpoints" / "step-000003" / "weights.safetensors"))
    assert saved and all("lora_" in k for k in saved)  # checkpoints hold only the adapter


def test_existing_run_folder_is_refused_without_overwrite(tmp_path, tiny_llama):
    train(_config(tmp_path, tiny_llama, max_steps=1), log=lambda *a: None)
    with pytest.raises(Exception, match="already holds a run"):
        train(_config(tmp_path, tiny_llama, max_steps=1), log=lambda *a: None)
    train(_config(tmp_path, tiny_llama, max_steps=1, overwrite=True), log=lambda *a: None)


def test_no_pickle_in_the_run_folder(tmp_path, tiny_llama):
    train(_config(tmp_path, tiny_llama, max_steps=2, save_steps=1), log=lambda *a: None)
    suffixes = {p.suffix for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert not suffixes & {".pt", ".pth", ".bin", ".pkl", ".pickle"}, suffixes


# --------------------------------------------------------------------------- command line

def _cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "thumbalign", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_malformed_file_exits_nonzero_with_one_line(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c", "label": true}\n{"prompt": "p", "completion": "c", "label": "meh"}\n')
    result = _cli("train", "--data", str(bad), "--model", str(tiny_llama), "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(bad) in lines[0] and "line 2" in lines[0] and "field 'label'" in lines[0]


def test_yaml_config_with_flag_override(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    (tmp_path / "run.yaml").write_text(
        f"data: {data}\nmodel: {tiny_llama}\noutput_dir: {tmp_path / 'run'}\nlearning_rate: 1e-3\nmax_steps: 2\n"
        "per_device_train_batch_size: 4\nbf16: false\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--max-steps", "3"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["settings"]["learning_rate"] == 1e-3
    # and the same file continues the run
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--max-steps", "3", "--resume"]) == 0


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    (tmp_path / "run.yaml").write_text("data: x.jsonl\nlearning_rat: 1e-3\n")
    result = _cli("train", "--config", str(tmp_path / "run.yaml"))
    assert result.returncode == 2 and "unknown setting 'learning_rat'" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_explains_every_flag():
    result = _cli("train", "--help")
    assert result.returncode == 0
    for flag in ("--data", "--output-dir", "--resume", "--config", "--beta", "--delta", "--use-lora",
                 "--learning-rate", "--gradient-accumulation-steps", "--max-length", "--save-adapter"):
        assert flag in result.stdout


def test_packed_training_matches_padded_training(tmp_path, tiny_llama):
    quiet = lambda *a: None  # noqa: E731
    train(_config(tmp_path / "padded", tiny_llama, max_steps=6), log=quiet)
    train(_config(tmp_path / "packed", tiny_llama, max_steps=6, packing=True), log=quiet)
    a = load_file(str(tmp_path / "padded" / "run" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "packed" / "run" / "model" / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
