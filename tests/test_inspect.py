"""`thumbalign inspect` and UDM inside training, with the real offline sentence encoder and tiny models."""

import json
import random

import pytest

from conftest import write_jsonl
from thumbalign.cli import main
from thumbalign.analysis.inspect_data import inspect_file
from thumbalign.trainers.policy import train
from test_train import _config

FOODS = ["pasta", "rice", "soup", "bread", "salad", "curry", "pancakes", "tofu", "eggs", "fish", "beans", "pie"]
VERBS = ["cook", "bake", "season", "store", "reheat", "serve"]


def cooking(i):
    return f"How do I {VERBS[i % 6]} {FOODS[(i // 6) % 12]} for {i % 5 + 2} people?"


def arithmetic(i):
    return f"What is {i * 7 % 97} times {i * 13 % 89} plus {i % 11}?"


def _file(tmp_path, shifted: bool, n=240, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2 == 0
        j = rng.randrange(10_000)  # prompt wording independent of the label
        if shifted:
            prompt = cooking(j) if label else arithmetic(j)
        else:
            prompt = cooking(j) if rng.random() < 0.5 else arithmetic(j)
        rows.append({"prompt": prompt, "completion": f"answer {i}", "label": label})
    return write_jsonl(tmp_path / ("shifted.jsonl" if shifted else "same.jsonl"), rows)


def test_prompt_shift_auc_is_chance_for_one_pool_and_high_for_two(tmp_path):
    same = inspect_file(str(_file(tmp_path, shifted=False)), progress=False)
    shifted = inspect_file(str(_file(tmp_path, shifted=True)), progress=False)
    assert abs(same["prompt_shift_auc"] - 0.5) < 0.1
    assert shifted["prompt_shift_auc"] > 0.8 and "differ strongly" in shifted["recommendation"]
    assert "--udm" in shifted["recommendation"]
    assert "not needed" in same["recommendation"]
    # a large shift over enough prompts: the reward-model route is recommended; no shift, or few prompts: not
    assert shifted["prompts"] >= 100 and "online --feedback" in shifted["route_hint"]
    assert same["route_hint"] is None
    few = inspect_file(str(_file(tmp_path, shifted=True, n=60)), progress=False)
    assert few["prompt_shift_auc"] > 0.8 and few["route_hint"] is None


def test_inspect_counts_labels_lengths_duplicates_conflicts_and_truncation(tmp_path, tokenizer):
    rows = [{"prompt": "p1", "completion": "c1", "label": True},
            {"prompt": "p1", "completion": "c1", "label": True},        # duplicate
            {"prompt": "p1", "completion": "c1", "label": False},       # conflict (and duplicate)
            {"prompt": "a long prompt", "completion": "cc", "label": False},
            {"prompt": "p", "completion": "a completion longer than ten", "label": True}]
    report = inspect_file(str(write_jsonl(tmp_path / "f.jsonl", rows)), tokenizer, max_length=10, encoder=None,
                          progress=False)
    assert (report["thumbs_up"], report["thumbs_down"], report["rows"]) == (3, 2, 5)
    assert report["duplicates"] == 2 and report["conflicting_pairs"] == 1
    # "a long prompt" (13) + "cc"+EOS (3) > 10: cut; the 29-byte completion alone exceeds 10: dropped
    assert report["truncation"] == {"prompt_cut": 1, "dropped_completion_too_long": 1}
    assert report["tokens"]["down"]["prompt"]["max"] == 13 and report["tokens"]["up"]["completion"]["min"] == 3


def test_inspect_cli_json_and_text(tmp_path, capsys, tiny_llama):
    path = _file(tmp_path, shifted=True, n=60)
    assert main(["inspect", str(path), "--model", str(tiny_llama), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 60 and report["prompt_shift_auc"] > 0.8
    assert main(["inspect", str(path), "--model", "none", "--udm-encoder", "none"]) == 0
    assert "30 👍, 30 👎" in capsys.readouterr().out


@pytest.mark.parametrize("encoder", ["minilm", "policy"])
def test_training_with_udm_logs_weights_and_reloads_the_classifier(tmp_path, tiny_llama, encoder):
    data = _file(tmp_path, shifted=True, n=32)
    config = _config(tmp_path, tiny_llama, data=str(data), eval_data=None, udm=True, udm_encoder=encoder,
                     max_steps=4, save_steps=2, logging_steps=2, save_total_limit=5)
    summary = train(config, log=lambda *a: None)
    run = tmp_path / "run"
    saved = json.loads((run / "udm_classifier.json").read_text())
    assert set(saved) >= {"coef", "intercept", "clip_min", "clip_max"}
    assert 0.5 <= summary["udm"]["min"] <= summary["udm"]["mean"] <= summary["udm"]["max"] <= 10
    metrics = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("udm_weight_mean" in m and "udm_share_clipped" in m for m in metrics)
    assert not [p for p in run.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]
    # resume reads the saved classifier instead of fitting a new one
    before = (run / "udm_classifier.json").stat().st_mtime_ns
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-000004")
    train(_config(tmp_path, tiny_llama, data=str(data), eval_data=None, udm=True, udm_encoder=encoder,
                  max_steps=4, save_steps=2, logging_steps=2, save_total_limit=5, resume="latest"),
          log=lambda *a: None)
    assert (run / "udm_classifier.json").stat().st_mtime_ns == before


def test_inspect_counts_prompts_answered_both_ways_and_hints_at_aft(tmp_path):
    # 100 prompts, each answered twice; in 60 of them one answer is 👍 and the other 👎
    rows = [{"prompt": f"q{k}?", "completion": f"a{k}-{j}", "label": j == 0 or k >= 60} for k in range(100)
            for j in range(2)]
    report = inspect_file(str(write_jsonl(tmp_path / "f.jsonl", rows)), encoder=None, progress=False)
    assert report["prompts"] == 100 and report["prompts_with_both_labels"] == 60
    assert "--method aft" in report["method_hint"]
    few = [r for r in rows if r["prompt"] not in {f"q{k}?" for k in range(20, 60)}]  # 20 of 60 prompts both ways
    report = inspect_file(str(write_jsonl(tmp_path / "g.jsonl", few)), encoder=None, progress=False)
    assert report["prompts_with_both_labels"] == 20 and report["method_hint"] is None
