"""Hard failures: several processes, SIGKILL at any moment, NaN, a full disk, and fuzzed input files."""

import errno
import json
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


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    one = _run(_args(data, tiny_llama, tmp_path / "one", "--max-steps", 4, "--per-device-train-batch-size", 4),
               tmp_path / "cache1")
    out1, _ = one.communicate(timeout=300)
    assert one.returncode == 0, out1
    two = _run(_args(data, tiny_llama, tmp_path / "two", "--max-steps", 4, "--per-device-train-batch-size", 2,
                     "--num-processes", 2), tmp_path / "cache2")
    out2, _ = two.communicate(timeout=300)
    assert two.returncode == 0, out2
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["examples_per_process"] == [8, 8] and summary["examples_on_several_processes"] == 0
    assert json.loads((tmp_path / "one" / "summary.json").read_text())["world_size"] == 1
    _same(_weights(tmp_path / "one"), _weights(tmp_path / "two"), atol=1e-5)
    # δ saw the rewards of both processes
    d1 = json.loads((tmp_path / "one" / "summary.json").read_text())["threshold"]
    assert summary["threshold"] == pytest.approx(d1, abs=1e-6)


def _wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended before the kill point: {proc.stdout.read()}")
        if time.time() - start > timeout:
            raise AssertionError("kill point never reached")
        time.sleep(0.01)


def test_sigkill_at_three_points_then_resume_gives_the_uninterrupted_weights(tmp_path, tiny_llama):
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

    # 3: killed at an arbitrary moment of the next resumed run
    proc = _run(_args(data, tiny_llama, run, *common, "--resume"), tmp_path / "cache")
    time.sleep(4.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    final = _run(_args(data, tiny_llama, run, *common, "--resume"), tmp_path / "cache")
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0, out
    _same(_weights(tmp_path / "straight"), _weights(run), atol=1e-6)


def _config(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    values = dict(data=str(data), model=str(model), output_dir=str(tmp_path / "run"), learning_rate=1e-3,
                  max_steps=6, per_device_train_batch_size=4, bf16="false", save_steps=1, logging_steps=1,
                  report=False)
    values.update(kw)
    return TrainConfig(**values)


def _nan_on_call(monkeypatch, which: int):
    import thumbalign.engine.logprobs as train_module  # the policy forward inside the training engine

    real, calls = train_module.completion_logps, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == which else out

    monkeypatch.setattr(train_module, "completion_logps", flaky)


def test_nan_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_llama, monkeypatch):
    _nan_on_call(monkeypatch, 3)  # the third micro-batch = step 3
    with pytest.raises(ThumbalignError, match=r"step 3: the loss or the gradient is not finite.*step-000002"):
        train(_config(tmp_path, tiny_llama), log=lambda *a: None)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")][-1] == "step-000002"
    assert not (tmp_path / "run" / "model").exists()


def test_skip_nonfinite_tolerates_bad_steps_without_poisoning_delta(tmp_path, tiny_llama, monkeypatch):
    _nan_on_call(monkeypatch, 3)
    summary = train(_config(tmp_path, tiny_llama, skip_nonfinite=1), log=lambda *a: None)
    metrics = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["skipped_nonfinite_steps"] == 1
    assert all(m["loss"] == m["loss"] for m in metrics)  # the bad step's numbers are not logged
    assert summary["threshold"] == summary["threshold"]  # δ is not NaN


def test_full_disk_while_saving_fails_cleanly(tmp_path, tiny_llama, monkeypatch):
    real, calls = ckpt.save_file, {"n": 0}

    def disk_full(tensors, path):
        calls["n"] += 1
        if calls["n"] > 4:  # the second checkpoint (four tensor files per checkpoint)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(ThumbalignError, match=r"step 2 \(No space left on device\).*intact"):
        train(_config(tmp_path, tiny_llama), log=lambda *a: None)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(checkpoints)] == ["step-000001"]
    assert not list(checkpoints.glob(".staging-*"))
    load_file(str(checkpoints / "step-000001" / "weights.safetensors"))
