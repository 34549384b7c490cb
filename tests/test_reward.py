"""The binary reward model: learns, calibrates, saves as a standard folder, judges, picks the best of n."""

import json

import pytest
import torch

from conftest import write_jsonl
from thumbalign.cli import main
from thumbalign.data import Record
from thumbalign.evaluate import expected_calibration_error
from thumbalign.reward import (RewardConfig, RewardModel, RewardScores, fit_temperature, load_reward_model,
                               train_reward_model)


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
