"""Fitting the ecosystem: Hub model ids (through a Hub cache laid out by huggingface_hub itself, from a loopback Hub),
TRL-style configs and flags, the saved precision, the model card, TensorBoard, `thumbalign config` and `env`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import make_model, make_tokenizer, toy_feedback, write_jsonl
from hub_server import commit_of, serve
from thumbalign.cli import main

REPO = "acme/tiny-llama"


def _thumbalign(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "thumbalign", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def _tiny_repo(folder: Path, seed: int) -> Path:
    tokenizer = make_tokenizer()
    make_model("llama", len(tokenizer), seed=seed).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def hub(tmp_path):
    """A loopback Hub holding acme/tiny-llama at revisions main and v2 (different weights), and the environment that
    points huggingface_hub at it with an empty HF_HOME."""
    server = serve(models={REPO: {"main": _tiny_repo(tmp_path / "main", 0), "v2": _tiny_repo(tmp_path / "v2", 1)}})
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "THUMBALIGN_CACHE": str(tmp_path / "cache")}
    yield server, env
    server.shutdown()
    server.server_close()


def _train_args(tmp_path, out, *extra):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    return ["train", "--data", data, "--output-dir", tmp_path / out, "--max-steps", 1, "--per-device-train-batch-size",
            4, "--bf16", "false", "--no-report", *extra]


def test_a_hub_model_id_downloads_once_then_trains_offline(tmp_path, hub):
    server, env = hub
    first = _thumbalign(*_train_args(tmp_path, "online-run", "--model", REPO), env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-llama" / "snapshots" / commit_of(REPO, "main")
    assert (snapshot / "model.safetensors").exists()  # laid out by huggingface_hub, as any HF library expects
    summary = json.loads((tmp_path / "online-run" / "summary.json").read_text())
    assert summary["model_dir"] == str(snapshot)
    server.shutdown()  # the Hub is gone: the cache alone serves the same id
    offline = _thumbalign(*_train_args(tmp_path, "offline-run", "--model", REPO), env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr[-2000:]
    missing = _thumbalign(*_train_args(tmp_path, "missing", "--model", "acme/not-there"),
                          env={**env, "HF_HUB_OFFLINE": "1"})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    line = missing.stderr.strip().splitlines()[-1]
    assert "acme/not-there: not in the Hub cache" in line and "HF_HUB_OFFLINE" in line


def test_revision_picks_the_weights_and_unknown_repos_are_one_line(tmp_path, hub):
    _, env = hub
    done = _thumbalign(*_train_args(tmp_path, "run-v2", "--model", REPO, "--revision", "v2"), env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    snapshot = Path(json.loads((tmp_path / "run-v2" / "summary.json").read_text())["model_dir"])
    assert snapshot.name == commit_of(REPO, "v2")
    served = load_file(str(snapshot / "model.safetensors"))
    v2, main_ = (load_file(str(tmp_path / rev / "model.safetensors")) for rev in ("v2", "main"))
    assert all(torch.equal(served[k], v2[k]) for k in served)
    assert not all(torch.equal(served[k], main_[k]) for k in served)
    unknown = _thumbalign(*_train_args(tmp_path, "x", "--model", "acme/unknown"), env=env)
    assert unknown.returncode == 2
    assert "acme/unknown: no such model on the Hub" in unknown.stderr.strip().splitlines()[-1]


def test_missing_data_is_reported_before_any_model_is_touched(tmp_path, hub):
    server, env = hub
    result = _thumbalign("train", "--data", tmp_path / "nope.jsonl", "--model", REPO, env=env)
    assert result.returncode == 2 and "nope.jsonl: no such file or folder" in result.stderr
    assert not server.RequestHandlerClass.requests  # no model was looked up, let alone downloaded
    assert not (tmp_path / "hf").exists()


TRL_KTO_YAML = """\
model_name_or_path: {model}
dataset_name: {data}
learning_rate: 5.0e-7
num_train_epochs: 1
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
gradient_checkpointing: true
logging_steps: 1
eval_strategy: steps
eval_steps: 50
output_dir: {out}
warmup_ratio: 0.1
report_to: none
bf16: false
logging_first_step: true
use_peft: true
lora_r: 4
max_steps: 2
"""


def test_a_trl_kto_yaml_runs_with_its_method_line_changed(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    config = tmp_path / "kto.yaml"
    config.write_text("method: kto\n" + TRL_KTO_YAML.format(model=tiny_llama, data=data, out=tmp_path / "run"))
    assert main(["train", "--config", str(config), "--no-report"]) == 0
    err = capsys.readouterr().err
    assert "TRL settings with no meaning here, ignored: eval_strategy" in err and "logging_first_step" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    settings = summary["settings"]
    assert summary["method"] == "kto" and settings["use_lora"] is True and settings["model"] == str(tiny_llama)
    assert settings["learning_rate"] == 5e-7 and settings["gradient_checkpointing"] is True


def test_underscore_and_trl_flag_spellings(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    assert main(["train", "--dataset_name", str(data), "--model_name_or_path", str(tiny_llama), "--output_dir",
                 str(tmp_path / "run"), "--learning_rate", "1e-3", "--max_steps", "1", "--per_device_train_batch_size",
                 "4", "--bf16", "false", "--use_peft", "--lora-r", "4", "--no-report"]) == 0
    settings = json.loads((tmp_path / "run" / "summary.json").read_text())["settings"]
    assert settings["learning_rate"] == 1e-3 and settings["use_lora"] and settings["data"] == str(data)
    (tmp_path / "twice.yaml").write_text(f"model: {tiny_llama}\nmodel_name_or_path: {tiny_llama}\n")
    result = _thumbalign("train", "--config", tmp_path / "twice.yaml", "--data", data)
    assert result.returncode == 2 and "given twice" in result.stderr


@pytest.mark.parametrize("choice,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                             ("auto", torch.bfloat16)])
def test_save_dtype(tmp_path, choice, expected):
    base = _tiny_repo(tmp_path / "base", 0)
    config = json.loads((base / "config.json").read_text())
    config["dtype"] = "bfloat16"  # what the base records: what auto saves in
    (base / "config.json").write_text(json.dumps(config))
    assert main([str(a) for a in _train_args(tmp_path, "run", "--model", base, "--save-dtype", choice)]) == 0
    weights = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {expected}


def test_a_model_above_save_max_shard_size_is_split_into_files_transformers_loads(tmp_path, tiny_llama, capsys):
    from transformers import AutoModelForCausalLM

    args = _train_args(tmp_path, "run", "--model", tiny_llama, "--save-steps", 1)
    whole = sum(t.numel() * t.element_size() for t in load_file(str(tiny_llama / "model.safetensors")).values())
    limit = f"{whole // 3 // 1000}KB"  # about a third of the model
    assert main([str(a) for a in args] + ["--save-max-shard-size", limit]) == 0
    folder = tmp_path / "run" / "model"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and not (folder / "model.safetensors").exists()
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "step-000001" / "weights.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    for name, tensor in trained.items():  # the final weights, every one, read back through the index
        assert torch.equal(loaded[name], tensor), name
    assert main([str(a) for a in _train_args(tmp_path, "bad", "--model", tiny_llama, "--save-max-shard-size",
                                             "5 gigs")]) == 2
    assert "--save-max-shard-size '5 gigs'" in capsys.readouterr().err


def test_model_card_and_portable_adapter_config(tmp_path, tiny_llama, hub):
    from huggingface_hub import ModelCard

    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    assert main(["train", "--data", str(data), "--eval-data", str(data), "--model", str(tiny_llama), "--output-dir",
                 str(tmp_path / "run"), "--max-steps", "2", "--per-device-train-batch-size", "4", "--bf16", "false",
                 "--no-report", "--method", "kto"]) == 0
    card = ModelCard.load(tmp_path / "run" / "model" / "README.md")
    assert card.data.base_model == str(tiny_llama) and card.data.library_name == "transformers"
    assert {"thumbalign", "kto", "binary-feedback"} <= set(card.data.tags)
    assert "before training" in card.text and "arXiv 2402.01306" in card.text  # held-out table and citation
    _, env = hub
    adapter = _thumbalign(*_train_args(tmp_path, "adapter", "--model", REPO, "--use-lora", "--lora-r", "4",
                                       "--save-adapter"), env=env)
    assert adapter.returncode == 0, adapter.stderr[-2000:]
    config = json.loads((tmp_path / "adapter" / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == REPO  # not the cache path on this machine
    assert ModelCard.load(tmp_path / "adapter" / "model" / "README.md").data.library_name == "peft"


def test_tensorboard_receives_every_logged_step_and_the_results(tmp_path, tiny_llama):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    assert main(["train", "--data", str(data), "--eval-data", str(data), "--model", str(tiny_llama), "--output-dir",
                 str(tmp_path / "run"), "--max-steps", "3", "--per-device-train-batch-size", "4", "--bf16", "false",
                 "--logging-steps", "1", "--no-report", "--report-to", "tensorboard"]) == 0
    folders = {p.parent for p in (tmp_path / "run" / "tracking").rglob("events.out.tfevents.*")}
    scalars = {}
    for folder in folders:
        events = EventAccumulator(str(folder))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in events.Scalars(tag)]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss"]] == pytest.approx([m["loss"] for m in metrics])
    assert scalars["eval_after/accuracy"][0][0] == 3  # the closing results, at the last step
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert scalars["eval_after/accuracy"][0][1] == pytest.approx(summary["eval_after"]["accuracy"])


def test_config_command_writes_a_starter_that_trains(tmp_path, tiny_llama, capsys):
    assert main(["config", "--method", "kto"]) == 0
    text = capsys.readouterr().out
    starter = yaml.safe_load(text)
    assert starter["method"] == "kto" and starter["learning_rate"] == 5e-6 and text.count("\n# ") > 40
    starter.update(data=str(write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))), model=str(tiny_llama),
                   output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, bf16="false",
                   report=False)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(starter))
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0


def test_env_command_names_versions_and_hardware(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"- torch: {torch.__version__}" in out and "- thumbalign: " in out and "cores" in out


@pytest.fixture
def hub_dataset(tmp_path):
    """A loopback Hub holding acme/feedback: a train and a test split whose columns are named otherwise."""
    repo = tmp_path / "dataset"
    (repo / "data").mkdir(parents=True)
    rows = [{"question": r["prompt"], "answer": r["completion"], "thumb": "up" if r["label"] else "down"}
            for r in toy_feedback(12)]
    write_jsonl(repo / "data" / "train.jsonl", rows[:8])
    write_jsonl(repo / "data" / "test.jsonl", rows[8:])
    (repo / "README.md").write_text("---\nlicense: mit\n---\n# feedback\n")
    server = serve(datasets={"acme/feedback": {"main": repo}})
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "THUMBALIGN_CACHE": str(tmp_path / "cache")}
    yield server, env
    server.shutdown()
    server.server_close()


def test_a_hub_dataset_trains_with_its_splits_and_mapped_columns_then_offline(tmp_path, tiny_llama, hub_dataset):
    server, env = hub_dataset
    args = ["train", "--data", "acme/feedback", "--eval-data-split", "test", "--prompt-field", "question",
            "--completion-field", "answer", "--label-field", "thumb", "--model", tiny_llama, "--max-steps", 1,
            "--per-device-train-batch-size", 4, "--bf16", "false", "--no-report"]
    first = _thumbalign(*args, "--output-dir", tmp_path / "run", env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    data = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]
    assert data["train_examples"] == {"total": 8, "thumbs_up": 4, "thumbs_down": 4} and data["eval_examples"] == 4
    assert data["train_file"]["path"] == "acme/feedback [train]"
    from huggingface_hub import ModelCard

    assert ModelCard.load(tmp_path / "run" / "model" / "README.md").data.datasets == ["acme/feedback"]
    unknown = _thumbalign(*args, "--data", "acme/none", "--output-dir", tmp_path / "bad", env=env)
    assert unknown.returncode == 2
    assert "acme/none [train]: no such file or folder, nor a dataset on the Hub" in unknown.stderr.splitlines()[-1]
    server.shutdown()  # the datasets cache alone serves it now
    offline = _thumbalign(*args, "--output-dir", tmp_path / "again", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr[-2000:]
    for bad, message in ((["--data", "acme/none"], "acme/none [train]: not in the datasets cache and the Hub cannot "
                                                   "be reached (HF_HUB_OFFLINE is set"),
                         (["--data-split", "nope"], "acme/feedback [nope]: ")):
        result = _thumbalign(*args, *bad, "--output-dir", tmp_path / "bad", env={**env, "HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert message in result.stderr.strip().splitlines()[-1]


def test_push_to_hub_uploads_the_model_folder_with_its_card(tmp_path, tiny_llama):
    server = serve(upload_root=tmp_path / "hub-side")
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_local_test_token", "THUMBALIGN_CACHE": str(tmp_path / "cache")}
    try:
        done = _thumbalign(*_train_args(tmp_path, "run", "--model", tiny_llama, "--push-to-hub", "--hub-model-id",
                                        "me/trained", "--hub-private"), env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        created = server.RequestHandlerClass.created
    finally:
        server.shutdown()
        server.server_close()  # the port is closed: a connection is refused at once
    assert created == [{"repo_id": "me/trained", "name": "trained", "organization": "me", "visibility": "private"}]
    local = {p.name: p.read_bytes() for p in (tmp_path / "run" / "model").iterdir()}
    pushed = {p.name: p.read_bytes() for p in (tmp_path / "hub-side" / "me" / "trained").iterdir()}
    assert pushed == local and "README.md" in pushed and "model.safetensors" in pushed
    missing = _thumbalign(*_train_args(tmp_path, "run2", "--model", tiny_llama, "--push-to-hub"))
    assert missing.returncode == 2 and "--push-to-hub needs --hub-model-id" in missing.stderr
    down = _thumbalign(*_train_args(tmp_path, "run3", "--model", tiny_llama, "--push-to-hub", "--hub-model-id",
                                    "me/trained"), env=env)  # the Hub is gone: the run succeeded, the push did not
    assert down.returncode == 2 and "Traceback" not in down.stderr
    line = down.stderr.strip().splitlines()[-1]
    assert line.startswith("thumbalign: error: --push-to-hub me/trained: ") and "the model is saved in" in line
    assert (tmp_path / "run3" / "model" / "model.safetensors").exists()
