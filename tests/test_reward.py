"""The binary reward model: learns, calibrates, saves as a standard folder, judges, picks the best of n."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from thumbalign.cli import main
from thumbalign.data.records import Record
from thumbalign.analysis.metrics import expected_calibration_error, fit_temperature
from thumbalign.engine.reward_model import RewardModel, RewardScores, load_reward_model
from thumbalign.trainers.config import RewardConfig
from thumbalign.errors import ThumbalignError
from thumbalign.trainers.reward import train_reward_model


def _property_file(tmp_path, n=96):
    # the label depends only on the last word of the answer
    rows = [{"prompt": f"Tell me about item {i}.", "completion": f"Item {i} is {'great' if i % 2 else 'awful'}",
             "label": bool(i % 2)} for i in range(n)]
    return write_jsonl(tmp_path / "f.jsonl", rows)


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("rm")
    config = RewardConfig(data=str(_property_file(tmp)), model=str(tiny_llama), output_dir=str(tmp / "run"),
                          eval_split=0.25, learning_rate=2e-3, max_steps=80, per_device_train_batch_size=8,
                          bf16="false", logging_steps=20, save_steps=40, warmup_ratio=0.0, cache_dir=str(tmp / "c"))
    summary = train_reward_model(config, log=lambda *a: None)
    return tmp / "run", summary


def test_reward_model_ranks_held_out_answers(trained_rm):
    run, summary = trained_rm
    held = summary["eval"]
    assert held["n"] == 24 and held["auc"] >= 0.9
    assert "reliability diagram" in (run / "report.html").read_text()
    config = json.loads((run / "model" / "config.json").read_text())
    assert len(config["id2label"]) == 1 and config["architectures"] == ["LlamaForSequenceClassification"]
    assert held["temperature"] > 0 and 0 <= held["ece"] <= 1


def test_saved_folder_scores_identically_after_reload_and_in_transformers(tmp_path, tiny_llama, tokenizer):
    from transformers import AutoModelForSequenceClassification

    model = load_reward_model(tiny_llama)
    model.config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    records = [Record("Is it good?", "Yes, very good.", True), Record("Hi", "no", False)]
    reloaded = RewardModel(tmp_path / "rm")
    before = torch.tensor([float(RewardScores(model.eval())(
        torch.tensor([reloaded.encode(r).input_ids]), torch.ones(1, len(reloaded.encode(r).input_ids),
                                                                 dtype=torch.long))) for r in records])
    after = torch.logit(torch.tensor(reloaded.probabilities(records), dtype=torch.float64)).float()
    assert torch.allclose(before, after, atol=1e-4)
    # a plain transformers user gets the same score from the saved folder
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    for r, expected in zip(records, before):
        ids = torch.tensor([reloaded.encode(r).input_ids])
        assert plain(input_ids=ids).logits.item() == pytest.approx(expected.item(), abs=1e-4)


def test_temperature_scaling_reduces_ece_of_an_overconfident_model():
    torch.manual_seed(0)
    true_logits = torch.randn(4000) * 1.5
    labels = torch.rand(4000) < torch.sigmoid(true_logits)
    overconfident = true_logits * 4
    temperature = fit_temperature(overconfident, labels)
    assert temperature == pytest.approx(4.0, rel=0.15)
    before = expected_calibration_error(torch.sigmoid(overconfident), labels)
    after = expected_calibration_error(torch.sigmoid(overconfident / temperature), labels)
    assert after < before / 2


def test_temperature_stays_bounded_when_held_out_scores_rank_worse_than_chance():
    """Unbounded, anti-ranked held-out logits push T to ~1e5 and every P(👍) to 0.5 ± 1e-6; bounded, the scores
    keep a spread an online reward can use, and the ranking (hence the AUC) is unchanged."""
    torch.manual_seed(0)
    logits = torch.randn(200) * 2
    labels = logits < 0  # the model ranks them backwards
    temperature = fit_temperature(logits, labels)
    assert temperature == 20.0
    assert torch.sigmoid(logits / temperature).std() > 0.01


def test_reward_score_command(trained_rm, tmp_path, capsys):
    run, _ = trained_rm
    data = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Tell me about item 500.", "completion": "Item 500 is great"},
                                              {"prompt": "Tell me about item 501.", "completion": "Item 501 is awful"}])
    assert main(["reward", "score", "--model", str(run / "model"), "--data", str(data), "-o",
                 str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["p_up"] > rows[1]["p_up"] and all(0 < r["p_up"] < 1 for r in rows)


def test_reward_model_as_judge_and_in_best_of_n(trained_rm, tmp_path, tiny_llama):
    run, _ = trained_rm
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"Tell me about item {i}."} for i in range(3)])
    assert main(["eval", "--model", str(tiny_llama), "--baseline", str(tiny_llama), "--prompts", str(prompts),
                 "--judge", f"rm:{run / 'model'}", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "ev")]) == 0
    judged = json.loads((tmp_path / "ev" / "eval.json").read_text())["judged"]
    assert judged["prompts"] == 3 and set(judged["models"]) == {"model", "baseline"}
    out = tmp_path / "best.jsonl"
    assert main(["best-of-n", "--model", str(tiny_llama), "--rm", str(run / "model"), "--prompts", str(prompts),
                 "--n", "3", "--max-new-tokens", "4", "-o", str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["label"] is True and 1 <= r["n"] <= 3 for r in rows)
    rm = RewardModel(run / "model")
    for r in rows:  # the recorded score is the reward model's score of the kept answer
        assert rm.probabilities([Record(r["prompt"], r["completion"], True)])[0] == pytest.approx(r["p_up"], abs=1e-5)


# --------------------------------------------------------------------------- the shared engine, for reward models

def _reward_args(data, model, out, *extra):
    return ["reward", "train", "--data", str(data), "--model", str(model), "--output-dir", str(out),
            "--learning-rate", "2e-3", "--bf16", "false", "--warmup-ratio", "0", "--logging-steps", "1",
            "--eval-split", "0", "--per-device-train-batch-size", "4", *map(str, extra)]


def _popen(args, cache):
    env = {**os.environ, "THUMBALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "thumbalign", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_tensors(a: dict, b: dict, atol: float):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())


def test_reward_model_killed_then_resumed_ends_where_an_uninterrupted_run_ends(tmp_path, tiny_llama):
    data = _property_file(tmp_path, n=32)
    common = ("--max-steps", 10, "--save-steps", 1, "--save-total-limit", 2)
    straight = _popen(_reward_args(data, tiny_llama, tmp_path / "straight", *common), tmp_path / "cache")
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out

    run = tmp_path / "killed"
    proc = _popen(_reward_args(data, tiny_llama, run, *common), tmp_path / "cache")
    deadline = time.time() + 240
    # the kill point is one the run reports: its metrics line for step 6
    while not ((run / "metrics.jsonl").exists() and any(m["step"] >= 6 for m in _metrics(run))):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "step 6 was never reported"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists()  # it really was cut short
    resumed = _popen(_reward_args(data, tiny_llama, run, *common, "--resume"), tmp_path / "cache")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0 and "Resumed from" in out, out

    a, b = tmp_path / "straight", run
    _same_tensors(load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors")),
                  atol=1e-6)
    last = "checkpoints/step-000010"
    _same_tensors(load_file(str(a / last / "optimizer.safetensors")), load_file(str(b / last / "optimizer.safetensors")),
                  atol=1e-6)
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in mb] == list(range(1, 11))  # every step logged once
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["accuracy"] == y["accuracy"]


def _nan_on_call(monkeypatch, which: int):
    from thumbalign.engine import reward_model

    real, calls = reward_model.RewardScores.forward, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == which else out

    monkeypatch.setattr(reward_model.RewardScores, "forward", flaky)


def _small_config(tmp_path, model, **kw):
    values = dict(data=str(_property_file(tmp_path, n=32)), model=str(model), output_dir=str(tmp_path / "run"),
                  eval_split=0.0, learning_rate=2e-3, max_steps=6, per_device_train_batch_size=4, bf16="false",
                  logging_steps=1, save_steps=1, warmup_ratio=0.0)
    values.update(kw)
    return RewardConfig(**values)


def test_reward_model_stops_at_a_nonfinite_step_keeping_the_last_checkpoint(tmp_path, tiny_llama, monkeypatch):
    _nan_on_call(monkeypatch, 3)  # the third micro-batch = step 3
    with pytest.raises(ThumbalignError, match=r"step 3: the loss or the gradient is not finite.*step-000002"):
        train_reward_model(_small_config(tmp_path, tiny_llama), log=lambda *a: None)
    assert not (tmp_path / "run" / "model").exists()


def test_reward_model_skips_a_nonfinite_step_when_allowed(tmp_path, tiny_llama, monkeypatch):
    _nan_on_call(monkeypatch, 3)
    train_reward_model(_small_config(tmp_path, tiny_llama, skip_nonfinite=1, save_total_limit=10),
                       log=lambda *a: None)
    metrics = _metrics(tmp_path / "run")
    assert [m["skipped_nonfinite_steps"] for m in metrics] == [0, 0, 1, 1, 1, 1]
    assert metrics[2]["loss"] is None and all(m["loss"] == m["loss"] for m in metrics)  # nothing NaN is logged
    ckpts = tmp_path / "run" / "checkpoints"
    weights = {k: load_file(str(ckpts / f"step-00000{k}" / "weights.safetensors")) for k in (2, 3, 4)}
    _same_tensors(weights[2], weights[3], atol=0)  # the skipped step changed no weight
    assert any(not torch.equal(weights[3][k], weights[4][k]) for k in weights[3])  # the next one did
    assert json.loads((ckpts / "step-000006" / "trainer_state.json").read_text())["nonfinite"] == 1


def test_two_gloo_processes_train_the_reward_model_like_one(tmp_path, tiny_llama):
    data = _property_file(tmp_path, n=32)
    one = _popen(_reward_args(data, tiny_llama, tmp_path / "one", "--max-steps", 4), tmp_path / "c1")
    out1, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out1
    two = _popen(_reward_args(data, tiny_llama, tmp_path / "two", "--max-steps", 4, "--per-device-train-batch-size", 2,
                              "--num-processes", 2), tmp_path / "c2")
    out2, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out2
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    _same_tensors(load_file(str(tmp_path / "one" / "model" / "model.safetensors")),
                  load_file(str(tmp_path / "two" / "model" / "model.safetensors")), atol=1e-5)
    for x, y in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "two")):  # logged over both processes
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["accuracy"] == y["accuracy"]
