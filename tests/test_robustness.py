"""Hard failures: several processes, SIGKILL at any moment, NaN, a full disk, and fuzzed input files."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_feedback, write_jsonl
from thumbalign.engine import checkpoint as ckpt
from thumbalign.trainers.config import TrainConfig
from thumbalign.errors import ThumbalignError
from thumbalign.trainers.policy import train


def _args(data, model, out, *extra):
    return ["train", "--data", str(data), "--model", str(model), "--output-dir", str(out), "--learning-rate", "1e-3",
            "--bf16", "false", "--warmup-ratio", "0", "--logging-steps", "1", "--no-report", *map(str, extra)]


def _run(args, cache, **kw):
    env = {**os.environ, "THUMBALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "thumbalign", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def _same(a, b, atol):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol), (key, (a[key] - b[key]).abs().max())


def _wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the kill point: {proc.stdout.read()}")
        if time.time() - start > timeout:
            raise AssertionError("kill point never reached")
        time.sleep(0.01)


def _metrics(run):
    path = run / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.endswith("}")] if path.exists() else []


def test_sigkill_at_three_points_then_resume_gives_the_uninterrupted_run(tmp_path, tiny_llama):
    """Kill points chosen from the run's own progress; after the last resume every piece of state matches the
    uninterrupted run: weights, optimizer, δ, and every metrics line."""
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    common = ("--max-steps", 8, "--per-device-train-batch-size", 4, "--save-steps", 1, "--save-total-limit", 3)
    straight = _run(_args(data, tiny_llama, tmp_path / "straight", *common), tmp_path / "cache")
    assert straight.wait(timeout=300) == 0

    run = tmp_path / "killed"
    checkpoints = run / "checkpoints"
    slow = {"env": {"THUMBALIGN_TEST_CHECKPOINT_PAUSE": "0.3"}}

    def steps_done():
        return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(checkpoints)]

    # 1: killed inside a checkpoint write (the staging folder exists, weights written, the rest not yet)
    proc = _run(_args(data, tiny_llama, run, *common), tmp_path / "cache", **slow)
    _wait_for(lambda: steps_done() and any(checkpoints.glob(".staging-*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = steps_done()
    assert before, "a complete checkpoint precedes the interrupted one"
    latest = ckpt.list_checkpoints(checkpoints)[-1]
    load_file(str(latest / "weights.safetensors"))  # the previous checkpoint is intact and loadable
    json.loads((latest / ckpt.STATE_FILE).read_text())

    # 2: killed right after a later checkpoint completed
    proc = _run(_args(data, tiny_llama, run, *common, "--resume"), tmp_path / "cache", **slow)
    _wait_for(lambda: max(steps_done(), default=0) >= before[-1] + 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    second = max(steps_done())

    # 3: killed in the middle of a step: the run has logged a step beyond its last checkpoint
    proc = _run(_args(data, tiny_llama, run, *common, "--resume"), tmp_path / "cache", **slow)
    _wait_for(lambda: any(m["step"] > second for m in _metrics(run)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model").exists() and max(steps_done()) < 8

    final = _run(_args(data, tiny_llama, run, *common, "--resume"), tmp_path / "cache")
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out
    _same(_weights(tmp_path / "straight"), _weights(run), atol=1e-6)
    last = "checkpoints/step-000008"
    _same(load_file(str(tmp_path / "straight" / last / "optimizer.safetensors")),
          load_file(str(run / last / "optimizer.safetensors")), atol=1e-6)
    a, b = (json.loads((r / "summary.json").read_text()) for r in (tmp_path / "straight", run))
    shift_a, shift_b = a["reward_shift"]["reward_shift"], b["reward_shift"]["reward_shift"]  # δ's running means
    assert shift_b["count"] == shift_a["count"] and shift_b["mean"] == pytest.approx(shift_a["mean"], abs=1e-7)
    assert b["threshold"] == pytest.approx(a["threshold"], abs=1e-7)
    ma, mb = _metrics(tmp_path / "straight"), _metrics(run)
    assert [m["step"] for m in mb] == list(range(1, 9))
    for x, y in zip(ma, mb):
        for key in ("loss", "rewards_up", "rewards_down", "delta", "accuracy", "lr"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)


def _config(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    values = dict(data=str(data), model=str(model), output_dir=str(tmp_path / "run"), learning_rate=1e-3,
                  max_steps=6, per_device_train_batch_size=4, bf16="false", save_steps=1, logging_steps=1,
                  report=False)
    values.update(kw)
    return TrainConfig(**values)


def _bad_on_call(monkeypatch, which: int, value: float):
    import thumbalign.engine.logprobs as train_module  # the policy forward inside the training engine

    real, calls = train_module.completion_logps, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * value if calls["n"] == which else out

    monkeypatch.setattr(train_module, "completion_logps", flaky)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama, monkeypatch,
                                                                                 value):
    _bad_on_call(monkeypatch, 3, value)  # the third micro-batch = step 3
    with pytest.raises(ThumbalignError, match=r"step 3: the loss or the gradient is not finite.*step-000002"):
        train(_config(tmp_path, tiny_llama), log=lambda *a: None)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step-000002"
    assert not (tmp_path / "run" / "model").exists()


def test_a_bad_gradient_with_a_finite_loss_is_caught_too(tmp_path, tiny_llama, monkeypatch):
    """The loss is finite but one gradient is not (an overflow in the backward pass)."""
    import thumbalign.engine.loop as loop

    real, calls = loop.Engine._optimizer_step, {"n": 0}

    def poisoned(self, task, run, step, window):
        calls["n"] += 1
        if calls["n"] == 3:  # one parameter's gradient goes infinite during step 3's backward
            handle = self.params[0].register_hook(lambda grad: grad * float("inf"))
            try:
                return real(self, task, run, step, window)
            finally:
                handle.remove()
        return real(self, task, run, step, window)

    monkeypatch.setattr(loop.Engine, "_optimizer_step", poisoned)
    with pytest.raises(ThumbalignError, match=r"step 3: the loss or the gradient is not finite"):
        train(_config(tmp_path, tiny_llama), log=lambda *a: None)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_skip_nonfinite_leaves_weights_and_delta_as_they_were(tmp_path, tiny_llama, monkeypatch, value):
    _bad_on_call(monkeypatch, 3, value)
    summary = train(_config(tmp_path, tiny_llama, skip_nonfinite=1, save_total_limit=10), log=lambda *a: None)
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_nonfinite_steps"] for m in metrics] == [0, 0, 1, 1, 1, 1]
    assert metrics[2]["loss"] is None and all(m["loss"] is None or math.isfinite(m["loss"]) for m in metrics)
    ckpts = tmp_path / "run" / "checkpoints"
    w2, w3, w4 = (load_file(str(ckpts / f"step-00000{k}" / "weights.safetensors")) for k in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # the skipped step moved no weight
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # the next step did
    d2, d3 = (json.loads((ckpts / f"step-00000{k}" / "trainer_state.json").read_text())["task"]["objective"]
              for k in (2, 3))
    assert d2 == d3  # δ did not absorb the bad step's rewards: it counts steps 1 and 2, 4 rewards each
    assert d3["reward_shift"]["count"]["all"] == 8 and math.isfinite(summary["threshold"])


@pytest.mark.parametrize("failing_call", [4, 5, 6])
def test_full_disk_while_saving_fails_cleanly(tmp_path, tiny_llama, monkeypatch, failing_call):
    """A checkpoint writes three tensor files (weights, optimizer, RNG); the disk fills up at each of the second
    checkpoint's."""
    real, calls = ckpt.save_file, {"n": 0}

    def disk_full(tensors, path):
        calls["n"] += 1
        if calls["n"] == failing_call:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(ThumbalignError, match=r"step 2 \(No space left on device\).*intact"):
        train(_config(tmp_path, tiny_llama), log=lambda *a: None)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step-000001"]
    assert not list(checkpoints.glob(".staging-*"))
    load_file(str(checkpoints / "step-000001" / "weights.safetensors"))
