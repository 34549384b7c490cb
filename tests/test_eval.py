"""Evaluation: metrics by hand, judges, judged generations (resumable, failure-safe), the eval command, the report."""

import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import toy_feedback, write_jsonl
from thumbalign.cli import main
from thumbalign.trainers.config import TrainConfig
from thumbalign.errors import ThumbalignError
from thumbalign.analysis.metrics import bootstrap_interval, classifier_metrics, expected_calibration_error
from thumbalign.analysis.judged import judged_generations
from thumbalign.analysis.judges import load_judge
from thumbalign.trainers.policy import train


def test_accuracy_and_auc_by_hand():
    m = classifier_metrics(torch.tensor([2.0, -1.0, 0.0, 0.5]), torch.tensor([True, False, True, False]))
    # right, right, tie (half), wrong
    assert m["accuracy"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    # (pos, neg) pairs ordered right: (2,-1) (2,0.5) (0,-1); wrong: (0,0.5)
    assert m["auc"] == pytest.approx(3 / 4)
    assert m["accuracy_up"] == pytest.approx(0.75) and m["accuracy_down"] == pytest.approx(0.5)


def test_ece_by_hand():
    probs = torch.tensor([0.1, 0.4, 0.8, 0.9, 0.85])
    labels = torch.tensor([False, True, True, True, False])
    # bins: 0.1 -> 1, 0.4 -> 4, 0.8 & 0.85 -> 8, 0.9 -> 9
    expected = (1 / 5) * 0.1 + (1 / 5) * 0.6 + (2 / 5) * abs(0.825 - 0.5) + (1 / 5) * 0.1
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([True, False])) == 0.0


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_data():
    small = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1]
    point, lo, hi = bootstrap_interval(small)
    assert point == pytest.approx(0.7) and lo <= point <= hi
    _, lo_big, hi_big = bootstrap_interval(small * 20)
    assert lo_big <= 0.7 <= hi_big and (hi_big - lo_big) < (hi - lo)


def test_builtin_judges():
    vader = load_judge("vader")
    assert vader("I love this, it is wonderful and great!", {}) is True
    assert vader("This is terrible and awful.", {}) is False
    numeric = load_judge("numeric")
    assert numeric("So the answer is 0.5", {"answer": "1/2"}) is True
    assert numeric("It is 3", {"answer": "4"}) is False
    assert numeric("1 * 7 = 007", {"answer": "7"}) is True  # leading zeros are still the number
    assert numeric("5/0", {"answer": "7"}) is False and numeric("= 2/4", {"answer": "0.5"}) is True
    assert numeric("about 1.41", {"answer": "sqrt(2)"}) is False
    with pytest.raises(Exception, match="cannot read the reference 'abc'"):
        numeric("7", {"answer": "abc"})
    assert load_judge("exact")(" 42 ", {"answer": "42"}) is True


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    (tmp_path / "myjudges.py").write_text(
        "calls = []\n"
        "def nonempty(text):\n    return len(text) > 0\n"
        "def score(text, row):\n    return 0.9\n"
        "def flaky(text):\n    calls.append(text)\n    if len(calls) == 3:\n        raise RuntimeError('judge down')\n"
        "    return True\n"
        "def wrong(text):\n    return 'yes'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myjudges"


def _prompts(tmp_path, n=5):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"q{i}?"} for i in range(n)])


def test_module_function_judge_and_resumable_generations(tmp_path, tiny_llama, judge_module):
    prompts, out = _prompts(tmp_path), tmp_path / "gen.jsonl"
    judge = load_judge(f"{judge_module}:score")  # a number: compared with the 0.5 threshold
    result = judged_generations({"a": tiny_llama, "b": tiny_llama}, str(prompts), judge, out, max_new_tokens=4,
                                batch_size=2, progress=False)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 10 and all(r["verdict"] is True for r in rows)
    assert result["models"]["a"]["thumbs_up_rate"] == 1.0
    assert result["difference"]["ties"] == 5 and result["difference"]["mean"] == 0.0
    # same model, greedy: identical answers for both names
    assert [r["answer"] for r in rows if r["model"] == "a"] == [r["answer"] for r in rows if r["model"] == "b"]
    # a second call finds everything done and generates nothing new
    judged_generations({"a": tiny_llama, "b": tiny_llama}, str(prompts), judge, out, max_new_tokens=4,
                       progress=False)
    assert len(out.read_text().splitlines()) == 10


def test_failing_judge_names_the_prompt_and_keeps_verdicts(tmp_path, tiny_llama, judge_module):
    prompts, out = _prompts(tmp_path), tmp_path / "gen.jsonl"
    with pytest.raises(ThumbalignError, match=r"prompts\.jsonl, line 3 \(a\): the judge raised RuntimeError: judge down"):
        judged_generations({"a": tiny_llama}, str(prompts), load_judge(f"{judge_module}:flaky"), out,
                           max_new_tokens=4, batch_size=5, progress=False)
    assert len(out.read_text().splitlines()) == 2  # the two verdicts before the failure are kept
    with pytest.raises(ThumbalignError, match="returned str"):
        judged_generations({"a": tiny_llama}, str(prompts), load_judge(f"{judge_module}:wrong"), out,
                           max_new_tokens=4, progress=False)
    judged_generations({"a": tiny_llama}, str(prompts), load_judge(f"{judge_module}:nonempty"), out,
                       max_new_tokens=4, progress=False)
    assert sorted(json.loads(l)["i"] for l in out.read_text().splitlines()) == [0, 1, 2, 3, 4]


def test_eval_command_scores_held_out_feedback(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    config = TrainConfig(data=str(data), model=str(tiny_llama), output_dir=str(tmp_path / "run"), learning_rate=1e-3,
                         max_steps=20, per_device_train_batch_size=4, bf16="false", report=False)
    train(config, log=lambda *a: None)
    code = main(["eval", "--model", str(tmp_path / "run" / "model"), "--ref", str(tiny_llama), "--data", str(data),
                 "--output-dir", str(tmp_path / "ev")])
    assert code == 0
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())["feedback"]
    assert result["n"] == 16 and result["accuracy"] >= 0.9 and 0 <= result["ece"] <= 1
    assert "accuracy" in capsys.readouterr().out


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_has_every_plot_and_renders_in_a_headless_browser(tmp_path, tiny_llama, judge_module):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    config = TrainConfig(data=str(data), eval_split=0.25, model=str(tiny_llama), output_dir=str(tmp_path / "run"),
                         learning_rate=1e-3, max_steps=6, per_device_train_batch_size=4, bf16="false",
                         logging_steps=2, udm=True, udm_encoder="policy", eval_prompts=str(_prompts(tmp_path)),
                         judge=f"{judge_module}:nonempty", eval_max_new_tokens=4)
    summary = train(config, log=lambda *a: None)
    page = tmp_path / "run" / "report.html"
    text = page.read_text()
    n_images = text.count("<img ")
    assert n_images == 7  # loss, rewards, margin, δ, lr, accuracy, UDM histogram
    assert "before training" in text and "after training" in text and "Sampled answers" in text
    assert summary["judged"]["models"]["trained"]["thumbs_up_rate"] == 1.0
    browser = _chromium()
    if browser is None:
        if os.environ.get("THUMBALIGN_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed, and THUMBALIGN_REQUIRE_BROWSER (set by .ci/run) requires it")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert f'data-images-loaded="{n_images}/{n_images}"' in dom
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000
