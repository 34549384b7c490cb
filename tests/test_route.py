"""`thumbalign online --feedback`: thumbs → reward model → online policy in one command, each stage resumed exactly
after a kill; and the guards that watch the reward model while the policy learns against it."""

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
from thumbalign.trainers.config import OnlineConfig
from thumbalign.trainers.reward_watch import RewardWatch


def _thumbs(tmp_path, n=40):
    """10 prompts, each with a cheerful 👍 answer and a gloomy 👎 one (a reward model learns it in a few steps)."""
    rows = [{"prompt": f"question {i % 10}?", "completion": "yay great!" if i % 2 == 0 else "no.",
             "label": i % 2 == 0, "kind": f"k{i % 10}"} for i in range(n)]
    return write_jsonl(tmp_path / "thumbs.jsonl", rows)


def _route_args(thumbs, model, out, *extra):
    return ["online", "--feedback", str(thumbs), "--model", str(model), "--output-dir", str(out), "--bf16", "false",
            "--reward-model-learning-rate", "1e-3", "--reward-model-epochs", "2", "--learning-rate", "1e-3",
            "--max-steps", "6", "--num-generations", "4", "--max-new-tokens", "5", "--per-device-train-batch-size",
            "2", "--save-steps", "2", "--logging-steps", "2", "--save-total-limit", "10", "--feedback-eval-share",
            "0.2", "--no-report",
            *map(str, extra)]


def _start(args, tmp_path, log):
    env = {**os.environ, "THUMBALIGN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "thumbalign", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def _metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _kill_after_step(proc, run, step, log):
    """SIGKILL once the stage in `run` has reported `step` (its metrics line), not after a fixed time."""
    deadline = time.time() + 240
    while not any(m["step"] >= step for m in _metrics(run)):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, f"step {step} of {run} was never reported"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _same_tensors(a: dict, b: dict, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())


def test_one_command_trains_both_stages_and_resumes_each_exactly(tmp_path, tiny_llama):
    thumbs = _thumbs(tmp_path)
    straight = tmp_path / "straight"
    proc = _start(_route_args(thumbs, tiny_llama, straight), tmp_path, tmp_path / "straight.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]

    # both models, both reports' data and both stages' settings in one folder
    for stage in ("reward", "policy"):
        assert (straight / stage / "model" / "config.json").is_file()
        assert (straight / stage / "run_config.yaml").is_file() and (straight / stage / "summary.json").is_file()
    rows = [json.loads(line) for line in (straight / "prompts" / "train.jsonl").read_text().splitlines()]
    assert all(row["kind"] == f"k{row['prompt'].split()[1][:-1]}" for row in rows)  # other columns go to rewards
    train = [row["prompt"] for row in rows]
    held = [json.loads(line)["prompt"] for line in (straight / "prompts" / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 8 and len(held) == 2 and not set(train) & set(held)  # 10 distinct prompts, 20% apart
    assert sorted(train + held) == sorted({f"question {i}?" for i in range(10)})
    rm_eval = json.loads((straight / "reward" / "summary.json").read_text())["eval"]
    metrics = _metrics(straight / "policy")
    assert [m["step"] for m in metrics] == [2, 4, 6]
    # the reward model's scale (its held-out 👍 / 👎 answers) is logged next to its score of the policy's answers
    assert all(m["rm_held_out_up"] == rm_eval["p_up_of_up"] and m["rm_held_out_down"] == rm_eval["p_up_of_down"]
               for m in metrics)
    assert rm_eval["p_up_of_up"] > rm_eval["p_up_of_down"]  # it learned the thumbs
    assert all(m["rm_score"] == pytest.approx(m["reward_mean"]) for m in metrics)  # the only reward
    assert metrics[0]["length_drift"] == 0.0
    route = json.loads((straight / "summary.json").read_text())
    assert route["reward_model"] == str(straight / "reward" / "model") and route["judged"]["prompts"] == 2

    # killed in stage 1, resumed; killed in stage 2, resumed: every number ends as in the uninterrupted route
    run = tmp_path / "killed"
    proc = _start(_route_args(thumbs, tiny_llama, run), tmp_path, tmp_path / "k1.log")
    _kill_after_step(proc, run / "reward", 5, tmp_path / "k1.log")
    assert not (run / "reward" / "model").exists() and not (run / "policy").exists()
    proc = _start(_route_args(thumbs, tiny_llama, run, "--resume"), tmp_path, tmp_path / "k2.log")
    _kill_after_step(proc, run / "policy", 3, tmp_path / "k2.log")
    first_resume = (tmp_path / "k2.log").read_text()
    assert "Resumed from" in first_resume and str(run / "reward" / "checkpoints" / "step-") in first_resume
    assert not (run / "policy" / "model").exists()
    proc = _start(_route_args(thumbs, tiny_llama, run, "--resume"), tmp_path, tmp_path / "k3.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "k3.log").read_text()[-3000:]
    second_resume = (tmp_path / "k3.log").read_text()
    assert "trained by this route earlier; reused" in second_resume
    assert f"Resumed from {run / 'policy' / 'checkpoints' / 'step-'}" in second_resume

    for stage in ("reward", "policy"):
        _same_tensors(load_file(str(straight / stage / "model" / "model.safetensors")),
                      load_file(str(run / stage / "model" / "model.safetensors")))
        a, b = _metrics(straight / stage), _metrics(run / stage)
        assert [m["step"] for m in a] == [m["step"] for m in b]
        for x, y in zip(a, b):
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
            for key in ("reward_mean", "rm_score", "pass_rate", "answer_length", "length_drift", "accuracy"):
                assert x.get(key) == y.get(key), (stage, x["step"], key)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (straight / "prompts" / name).read_bytes() == (run / "prompts" / name).read_bytes()
    assert json.loads((run / "summary.json").read_text())["judged"] == route["judged"]


def test_a_reward_model_is_reused_and_the_route_refuses_what_it_cannot_do(tmp_path, tiny_llama, capsys):
    thumbs = _thumbs(tmp_path)
    first = tmp_path / "first"
    assert main(_route_args(thumbs, tiny_llama, first, "--max-steps", "1")) == 0
    # a fresh route into a folder that holds one is refused, naming the stage's folder; --overwrite trains again
    assert main(_route_args(thumbs, tiny_llama, first, "--max-steps", "1")) == 2
    assert f"{first / 'reward'} already holds a run" in capsys.readouterr().err
    before = (first / "reward" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(_route_args(thumbs, tiny_llama, first, "--max-steps", "1", "--overwrite")) == 0
    assert (first / "reward" / "model" / "model.safetensors").stat().st_mtime_ns != before
    reused = tmp_path / "reused"
    assert main(_route_args(thumbs, tiny_llama, reused, "--max-steps", "1", "--reward",
                            f"rm:{first / 'reward' / 'model'}")) == 0
    assert not (reused / "reward").exists()  # no second reward model
    assert json.loads((reused / "summary.json").read_text())["reward_model"] == str(first / "reward" / "model")
    for extra, message in [(("--prompts", thumbs), "drop --prompts"),
                           (("--reward", "vader"), "--reward can only be one rm:PATH"),
                           (("--feedback-eval-share", "1.5"), "feedback_eval_share must be in [0, 1)"),
                           (("--reward-weights", "2"), "drop --reward-weights")]:
        assert main(_route_args(thumbs, tiny_llama, tmp_path / "x", *extra)) == 2
        assert message in capsys.readouterr().err
    # thumbs the answers cannot explain (each prompt and answer got both labels): the reward model ranks nothing
    # and the route says so before the policy's stage (the first route's, which learned, said nothing)
    assert "ranks its held-out thumbs little better than chance" not in capsys.readouterr().out
    flat = write_jsonl(tmp_path / "flat.jsonl", [{"prompt": f"question {i % 10}?", "completion": "ok.",
                                                  "label": (i // 10) % 2 == 0} for i in range(60)])
    assert main(_route_args(flat, tiny_llama, tmp_path / "flat", "--max-steps", "1")) == 0
    assert "ranks its held-out thumbs little better than chance (ROC AUC" in capsys.readouterr().out
    # all prompts held out: nothing to train on, said before any model is trained
    one_prompt = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p", "completion": c, "label": c == "a"}
                                                       for c in "ab"])
    assert main(_route_args(one_prompt, tiny_llama, tmp_path / "y", "--feedback-eval-share", "0.9")) == 2
    assert "none would be left to train on" in capsys.readouterr().err and not (tmp_path / "y" / "reward").exists()
    # a folder holding a plain online run is not the route's (both default to runs/online)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "metrics.jsonl").write_text("{}\n")
    assert main(_route_args(thumbs, tiny_llama, plain, "--overwrite")) == 2
    assert "not an `online --feedback` route" in capsys.readouterr().err and not (plain / "reward").exists()
    # the reward model trained again (its calibration differs): the finished policy is stale, and its checkpoint is
    # not continued against the new reward model
    config = first / "reward" / "model" / "config.json"
    settings = json.loads(config.read_text())
    settings["thumbalign_temperature"] *= 2
    config.write_text(json.dumps(settings))
    assert main(_route_args(thumbs, tiny_llama, first, "--max-steps", "1", "--resume")) == 2
    out, err = capsys.readouterr()
    assert "finished already" not in out and "changed: reward models" in err


def _watch(check="vader"):
    config = OnlineConfig(prompts="p.jsonl", reward=["vader"], check_judge=check)
    said = []
    return RewardWatch(None, config, said.append), said


def test_the_watch_warns_once_when_reward_rises_while_agreement_falls():
    watch, _ = _watch()
    lines = []
    # (reward, [(check verdict, reward outcome)]): agreement 1.0, then the reward rises while agreement falls
    for reward, checks in [(0.40, [(True, True), (False, False)] * 2), (0.44, [(True, True), (False, False)] * 2),
                           (0.60, [(False, True), (True, True), (False, False), (False, False)]),
                           (0.70, [(False, True), (False, True), (False, False), (True, True)]),
                           (0.80, [(False, True)] * 4)]:
        line = {"reward_mean": reward, **watch.measure([], checks, 10.0)}
        watch.warn(line)
        lines.append(line)
    assert [line["check_agreement"] for line in lines] == [1.0, 1.0, 0.75, 0.5, 0.0]
    # step 3: +0.20 reward, −0.25 agreement: warned; not again at steps 4 and 5
    assert ["reward_warning" in line for line in lines] == [False, False, True, False, False]
    assert "rose from 0.400 to 0.600" in lines[2]["reward_warning"] and "fell from 1.000 to 0.750" in \
        lines[2]["reward_warning"]


def test_the_watch_is_quiet_when_reward_and_agreement_rise_together_and_its_state_resumes():
    watch, _ = _watch()
    line = {"reward_mean": 0.3, **watch.measure([], [(True, True), (False, True)], 8.0)}
    watch.warn(line)
    resumed, _ = _watch()
    resumed.load_state_dict(json.loads(json.dumps(watch.state_dict())))  # as a checkpoint holds it
    for w in (watch, resumed):
        later = {"reward_mean": 0.9, **w.measure([], [(True, True), (True, True)], 12.0)}
        w.warn(later)
        assert "reward_warning" not in later and later["length_drift"] == pytest.approx(0.5)


def test_the_route_under_two_processes_launches_each_stage(tmp_path, tiny_llama):
    """A launched process group serves one run: the reward model's stage and the policy's are launched in turn."""
    thumbs = _thumbs(tmp_path)
    out = tmp_path / "two"
    args = _route_args(thumbs, tiny_llama, out, "--max-steps", "2", "--per-device-train-batch-size", "1",
                       "--num-processes", "2")
    proc = _start(args, tmp_path, tmp_path / "two.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "two.log").read_text()[-3000:]
    for stage in ("reward", "policy"):
        assert json.loads((out / stage / "summary.json").read_text())["world_size"] == 2
    assert (out / "summary.json").is_file() and (out / "policy" / "model" / "config.json").is_file()
    proc = _start([*args, "--resume"], tmp_path, tmp_path / "again.log")  # finished: both stages are skipped
    assert proc.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-3000:]
    log = (tmp_path / "again.log").read_text()
    assert log.count("trained by this route earlier; reused") == 1 and "The policy stage has finished already" in log
