"""Sharded training on this machine's CPU: two gloo processes under FSDP2 or DeepSpeed ZeRO-3, each holding half of
every weight, gradient and optimizer moment (ZeRO-2: of every optimizer moment). They must train as one process
does, write sharded checkpoints that survive SIGKILL, and resume with another number of processes or another engine
(the checkpoint's pieces are redistributed on load)."""

import json
import os
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_feedback, write_jsonl
from test_faults import _one_line
from thumbalign.engine import checkpoint as ckpt

FSDP = ("--num-processes", 2, "--accelerate-config", "fsdp")
# DeepSpeed is installed beside the virtual environment (the Makefile), for the processes that use it only
DEEPSPEED_SITE = Path(__file__).resolve().parents[1] / ".venv" / "ds-site"
DEEPSPEED = {"PYTHONPATH": os.pathsep.join(filter(None, [str(DEEPSPEED_SITE), os.environ.get("PYTHONPATH")]))}


def _args(command, data, model, out, *extra):
    return [*command, "--data", str(data), "--model", str(model), "--output-dir", str(out), "--learning-rate", "1e-3",
            "--bf16", "false", "--warmup-ratio", "0", "--logging-steps", "1", *map(str, extra)]


def _start(args, tmp_path, log_name, env=None):
    """A run, its output in a file (a pipe nobody reads could fill and stall it)."""
    log = open(tmp_path / log_name, "w")
    env = {**os.environ, "THUMBALIGN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "thumbalign", *args], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=env)
    proc.log = tmp_path / log_name
    return proc


def _finish(proc, timeout=300):
    assert proc.wait(timeout=timeout) == 0, proc.log.read_text()[-4000:]
    return proc.log.read_text()


def _kill_all(proc):
    """SIGKILL to the launcher and every process under it (torchrun starts its workers in sessions of their own),
    as when the machine dies; returns once all are gone."""
    import psutil

    root = psutil.Process(proc.pid)
    everyone = [root, *root.children(recursive=True)]
    for p in everyone:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(everyone, timeout=30)


def _weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.endswith("}")]


def _close(a: dict, b: dict, atol: float, rtol: float = 0.0):
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=atol, rtol=rtol), (key, (a[key] - b[key]).abs().max())


def _same_losses(one, two):
    for x, y in zip(_metrics(one), _metrics(two), strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], abs=1e-5)


def _sharded_state(checkpoint):
    """Every tensor of a sharded checkpoint, whole (read the way a one-process resume reads it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    reader = HuggingFaceStorageReader(str(checkpoint / ckpt.SHARDED_DIR))
    meta = reader.read_metadata().state_dict_metadata
    state = {name: torch.empty(tuple(m.size), dtype=m.properties.dtype) for name, m in meta.items()}
    dcp.load(state, storage_reader=reader)
    return state


STEPS = ("--max-steps", 6, "--gradient-accumulation-steps", 2, "--save-steps", 2)
# 16 rows, 5 held out: 11 examples, 8 per step; UDM's prompt classifier runs on the policy's own embeddings
SETTINGS = (*STEPS, "--eval-split", "0.3", "--udm", "--udm-encoder", "policy")
ONE, TWO = ("--per-device-train-batch-size", 4), ("--per-device-train-batch-size", 2, *FSDP)
ZERO3 = ("--per-device-train-batch-size", 2, "--num-processes", 2, "--accelerate-config", "zero3")
ZERO2 = ("--per-device-train-batch-size", 2, "--num-processes", 2, "--accelerate-config", "zero2")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama):
    """The same 6 steps in one process, in two FSDP processes and in two DeepSpeed ZeRO-3 and ZeRO-2 processes,
    uninterrupted: the yardsticks of this file."""
    root = tmp_path_factory.mktemp("straight")
    data = write_jsonl(root / "f.jsonl", toy_feedback(16))
    # 5 held-out prompts answered by the trained and the base model: sharded, 3 on one process and 2 (and a
    # stand-in) on the other, while the weights stay sharded
    # (the tiny model repeats a prompt's last character or so: prompts that end differently get different answers)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in ("Tell me a story about cats.", "what is 2+2",
                                                                         "q0?", "hello there", "q2?")])
    judged = ("--eval-prompts", prompts, "--judge", "vader", "--eval-max-new-tokens", 6, "--eval-batch-size", 2)
    for name, processes, env in (("one", ONE, None), ("two", TWO, None), ("zero3", ZERO3, DEEPSPEED),
                                 ("zero2", ZERO2, DEEPSPEED)):
        _finish(_start(_args(["train"], data, tiny_llama, root / name, *SETTINGS, *judged, *processes), root,
                       f"{name}.log", env))
    return root


def _same_judged_answers(one, run):
    """The same answers and verdicts for every held-out prompt, of the trained and the base model."""
    def records(r):
        rows = [json.loads(line) for line in (r / "generations.jsonl").read_text().splitlines()]
        return sorted((row["model"], row["i"], row["answer"], row["verdict"]) for row in rows)

    answer = {(model, i): text for model, i, text, _ in records(one)}
    assert len(answer) == 10 and len(set(answer.values())) >= 4
    assert any(answer["trained", i] != answer["base", i] for i in range(5))  # which model answered shows
    assert records(run) == records(one)
    a, b = (json.loads((r / "summary.json").read_text())["judged"] for r in (one, run))
    assert a == b


def test_two_fsdp_processes_train_like_one(straight):
    """Full fine-tuning (tied input and output embeddings), with UDM and a held-out evaluation before and after."""
    one, two = straight / "one", straight / "two"
    _close(_weights(one), _weights(two), atol=1e-5)
    _same_losses(one, two)
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert s2["world_size"] == 2
    for when in ("eval_before", "eval_after"):  # the held-out evaluation ran on the sharded model
        assert s2[when]["accuracy"] == s1[when]["accuracy"]
        assert s2[when]["auc"] == pytest.approx(s1[when]["auc"], abs=1e-6)
    _same_judged_answers(one, two)  # generated on the shards, against the one process's from the saved folders
    checkpoint = two / "checkpoints" / "step-000006"
    shards = sorted(p.name for p in (checkpoint / ckpt.SHARDED_DIR).glob("*.safetensors"))
    assert len(shards) == 2 and not (checkpoint / "weights.safetensors").exists()  # each process wrote its own
    unsharded = load_file(str(one / "checkpoints" / "step-000006" / "weights.safetensors"))
    restored = {k.removeprefix("model/"): v for k, v in _sharded_state(checkpoint).items() if k.startswith("model/")}
    _close(unsharded, restored, atol=1e-5)  # the shards put together are the one-process checkpoint's weights


def test_two_deepspeed_processes_train_like_one(straight):
    """DeepSpeed on CPU processes (gloo): ZeRO-3 shards the weights, ZeRO-2 the optimizer's master weights and
    moments. Both train as one process does, with UDM and the held-out evaluation before and after."""
    one = straight / "one"
    s1 = json.loads((one / "summary.json").read_text())
    for name in ("zero3", "zero2"):
        run = straight / name
        _close(_weights(one), _weights(run), atol=1e-5)
        _same_losses(one, run)
        summary = json.loads((run / "summary.json").read_text())
        assert summary["world_size"] == 2
        for when in ("eval_before", "eval_after"):  # under ZeRO-3 the evaluation ran on the sharded model
            assert summary[when]["accuracy"] == s1[when]["accuracy"]
            assert summary[when]["auc"] == pytest.approx(s1[when]["auc"], abs=1e-6)
        _same_judged_answers(one, run)  # ZeRO-3: generated on the shards; ZeRO-2: from the saved folders
    last = "checkpoints/step-000006"
    unsharded = load_file(str(one / last / "weights.safetensors"))
    # ZeRO-3: each process wrote its own shard (the flattened parameter's half); put together, they are the weights
    shards = sorted((straight / "zero3" / last / ckpt.SHARDED_DIR).glob("*.safetensors"))
    assert len(shards) == 2 and not (straight / "zero3" / last / "weights.safetensors").exists()
    flat = {k.removeprefix("model/"): v for k, v in _sharded_state(straight / "zero3" / last).items()
            if k.startswith("model/")}
    _close({k: v.reshape(-1) for k, v in unsharded.items()}, flat, atol=1e-5)
    # ZeRO-2: the pieces of the master weights and Adam moments, gathered, are the one-process checkpoint's
    _close(unsharded, load_file(str(straight / "zero2" / last / "weights.safetensors")), atol=1e-5)
    _close(load_file(str(one / last / "optimizer.safetensors")),
           load_file(str(straight / "zero2" / last / "optimizer.safetensors")), atol=1e-9, rtol=1e-3)


def test_two_sharded_processes_train_a_lora_reward_model_like_one(tmp_path, tiny_llama):
    """LoRA under FSDP and under ZeRO-3: frozen and trained weights share each sharded unit."""
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(13))
    common = ("--max-steps", 3, "--gradient-accumulation-steps", 2, "--eval-split", "0.3", "--use-lora",
              "--learning-rate", "1e-2")
    for name, processes, env in (("one", ONE, None), ("two", TWO, None), ("zero3", ZERO3, DEEPSPEED)):
        _finish(_start(_args(["reward", "train"], data, tiny_llama, tmp_path / name, *common, *processes), tmp_path,
                       f"{name}.log", env))
    base = load_file(str(tiny_llama / "model.safetensors"))
    one = _weights(tmp_path / "one")
    assert any(not torch.equal(one[k], base[k]) for k in base if k in one)  # the merged adapters moved weights
    s1 = json.loads((tmp_path / "one" / "summary.json").read_text())
    for name in ("two", "zero3"):
        _close(one, _weights(tmp_path / name), atol=1e-5)
        s2 = json.loads((tmp_path / name / "summary.json").read_text())
        assert s2["eval"]["auc"] == pytest.approx(s1["eval"]["auc"], abs=1e-6)


def test_a_method_that_adds_tokens_grows_the_empty_model_of_the_other_processes_alike(tmp_path, tiny_llama):
    """--method reward-token adds two tokens: the first process grows its embeddings (each new row the mean of its
    meaning's words), the second grows its empty model to the same shape and receives the rows under ZeRO-3."""
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(12))
    common = ("--max-steps", 2, "--gradient-accumulation-steps", 2, "--method", "reward-token")
    for name, processes, env in (("one", ONE, None), ("zero3", ZERO3, DEEPSPEED)):
        _finish(_start(_args(["train"], data, tiny_llama, tmp_path / name, *common, *processes), tmp_path,
                       f"{name}.log", env))
    one, zero3 = _weights(tmp_path / "one"), _weights(tmp_path / "zero3")
    base = load_file(str(tiny_llama / "model.safetensors"))
    key = "model.embed_tokens.weight"
    assert one[key].shape[0] == base[key].shape[0] + 2
    _close(one, zero3, atol=1e-5)


def _steps_done(run):
    return [int(p.name.split("-")[1]) for p in ckpt.list_checkpoints(run / "checkpoints")]


def _wait_for(predicate, proc, timeout=180):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before the kill point: {proc.log.read_text()[-3000:]}"
        assert time.time() < deadline, "the kill point was never reached"
        time.sleep(0.01)


def test_sigkill_inside_a_sharded_save_then_resumes_by_other_process_counts_equal_an_uninterrupted_run(
        tmp_path, tiny_llama, straight):
    """2 FSDP processes, SIGKILLed inside their step-4 save (both shards written, the folder not yet in place);
    resumed by 1 process from step 2 and killed once it has saved step 4; finished by 2 FSDP processes. The
    checkpoints change hands between sharded and unsharded both ways, and the end is the uninterrupted run's."""
    _kill_resume_finish(tmp_path, tiny_llama, straight, TWO, ONE, TWO)
    _same_end(straight / "two", tmp_path / "run")


def test_sigkill_inside_a_zero3_save_then_resumes_by_zero2_and_zero3_equal_an_uninterrupted_run(
        tmp_path, tiny_llama, straight):
    """Two ZeRO-3 processes, SIGKILLed inside their step-4 save (both shards written, the folder not yet in place);
    resumed from step 2 by two ZeRO-2 processes (the flattened shards put back into whole weights) and killed once
    they have saved step 4 (the optimizer's pieces gathered into an unsharded checkpoint); finished by two ZeRO-3
    processes, which cut the whole tensors into their shards. The end is the uninterrupted ZeRO-3 run's."""
    _kill_resume_finish(tmp_path, tiny_llama, straight, ZERO3, ZERO2, ZERO3)
    _same_end(straight / "zero3", tmp_path / "run")


def _kill_resume_finish(tmp_path, tiny_llama, straight, first, second, last):
    """`first` processes SIGKILLed inside their step-4 save (both shards written, the folder not yet in place);
    `second` resumes from step 2 and is killed once it reports step 4 saved (unsharded: every `second` here writes
    unsharded checkpoints); `last` resumes from step 4 and finishes."""
    data, run = straight / "f.jsonl", tmp_path / "run"
    slow = {"THUMBALIGN_TEST_CHECKPOINT_PAUSE": "2", **DEEPSPEED}
    killed = _start(_args(["train"], data, tiny_llama, run, *SETTINGS, *first), tmp_path, "first.log", env=slow)

    def inside_the_step_4_save():  # step 2 is complete, and both processes have written their shards of step 4
        staging = list((run / "checkpoints").glob(".staging-step-000004-*"))
        return _steps_done(run) == [2] and staging and len(list(staging[0].rglob("*.safetensors"))) == 2

    _wait_for(inside_the_step_4_save, killed)
    _kill_all(killed)
    assert _steps_done(run) == [2]  # the interrupted save left no checkpoint under a real name
    killed = _start(_args(["train"], data, tiny_llama, run, *SETTINGS, *second, "--resume"), tmp_path, "second.log",
                    env=slow)
    _wait_for(lambda: max(_steps_done(run), default=0) == 4, killed)  # the run reports step 4 saved
    _kill_all(killed)
    assert (run / "checkpoints" / "step-000004" / "weights.safetensors").exists()  # written unsharded
    resumed = _start(_args(["train"], data, tiny_llama, run, *SETTINGS, *last, "--resume"), tmp_path, "last.log",
                     env=DEEPSPEED)
    assert "Resumed from" in _finish(resumed) and _steps_done(run)[-1] == 6


def test_zero3_shards_of_two_processes_resume_in_four(tmp_path, tiny_llama, straight):
    """Four ZeRO-3 processes continue two processes' step-4 checkpoint: DCP hands each its quarter of every flattened
    parameter, cut from the writers' halves (parameters whose size 4 does not divide end in padding)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight / "zero3", run)
    for written_later in (run / "checkpoints" / "step-000006", run / "model"):
        shutil.rmtree(written_later)
    four = ("--per-device-train-batch-size", 1, "--num-processes", 4, "--accelerate-config", "zero3")
    resumed = _start(_args(["train"], straight / "f.jsonl", tiny_llama, run, *SETTINGS, *four, "--resume"), tmp_path,
                     "four.log", env=DEEPSPEED)
    assert "Resumed from" in _finish(resumed)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 4
    _same_end(straight / "zero3", run)


def test_one_process_under_zero3_is_launched_under_it_and_continues_two(tmp_path, tiny_llama, straight):
    """--accelerate-config with one process (DeepSpeed's offload on one GPU is a reason to ask) runs under that
    config, not silently without it: one ZeRO-3 process continues two processes' step-4 checkpoint, writes a sharded
    checkpoint of one shard, and ends where the two-process run ends."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(straight / "zero3", run)
    for written_later in (run / "checkpoints" / "step-000006", run / "model"):
        shutil.rmtree(written_later)
    one = ("--per-device-train-batch-size", 4, "--num-processes", 1, "--accelerate-config", "zero3")
    log = _finish(_start(_args(["train"], straight / "f.jsonl", tiny_llama, run, *SETTINGS, *one, "--resume"),
                         tmp_path, "one.log", env=DEEPSPEED))
    assert "Launching 1 process:" in log and "Resumed from" in log
    shards = list((run / "checkpoints" / "step-000006" / ckpt.SHARDED_DIR).glob("*.safetensors"))
    assert len(shards) == 1
    _same_end(straight / "zero3", run)


def _same_end(uninterrupted, run):
    """Weights, the Adam moments shard by shard, scheduler, optimizer settings, δ and every metrics line."""
    last = "checkpoints/step-000006"
    _close(_weights(uninterrupted), _weights(run), atol=1e-5)
    # the moments are tiny, so they are compared relatively
    _close(_sharded_state(uninterrupted / last), _sharded_state(run / last), atol=1e-9, rtol=1e-3)
    for name in ("scheduler.json", "optimizer.json"):
        assert json.loads((run / last / name).read_text()) == json.loads((uninterrupted / last / name).read_text())
    a, b = (json.loads((r / "summary.json").read_text()) for r in (uninterrupted, run))
    shift_a, shift_b = a["reward_shift"]["reward_shift"], b["reward_shift"]["reward_shift"]  # δ's running mean
    assert shift_b["count"] == shift_a["count"] and shift_b["mean"] == pytest.approx(shift_a["mean"], abs=1e-6)
    _same_losses(uninterrupted, run)


def _user_config(tmp_path, text):
    path = tmp_path / "accelerate.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make_config,message", [
    # this test process runs without the DeepSpeed folder the launched processes get (DEEPSPEED)
    (lambda tmp: "zero2", "--accelerate-config zero2: distributed_type DEEPSPEED needs DeepSpeed (pip install deepspeed)"),
    (lambda tmp: _user_config(tmp, "distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n"
                                   "  offload_param_device: nvme\n"), "offload_param_device: nvme is not supported"),
    (lambda tmp: _user_config(tmp, "distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n"),
     "fsdp_version 1 is not supported; set fsdp_version: 2"),
    (lambda tmp: _user_config(tmp, "distributed_type: XLA\n"), "distributed_type XLA is not supported"),
    (lambda tmp: _user_config(tmp, "distributed_type: [FSDP\n"), "is not valid YAML"),
    (lambda tmp: str(tmp / "missing.yaml"), "missing.yaml (No such file or directory)"),
])
def test_an_accelerate_config_that_cannot_run_here_is_one_line_before_any_process_starts(tmp_path, tiny_llama, capsys,
                                                                                         make_config, message):
    from thumbalign.cli import main

    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    args = _args(["train"], data, tiny_llama, tmp_path / "run", "--num-processes", 2, "--accelerate-config",
                 make_config(tmp_path))
    assert main(args) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything was launched or written


def test_a_config_file_naming_a_single_process_accelerate_config_launches_once(tmp_path, tiny_llama):
    """accelerate runs `distributed_type: NO` through its single-process launcher, which sets no WORLD_SIZE, and
    the launched process reads the same --config file naming the accelerate config: it must train, not launch
    again."""
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    accelerate = _user_config(tmp_path, "distributed_type: 'NO'\nnum_processes: 1\nuse_cpu: true\n")
    (tmp_path / "run.yaml").write_text(f"accelerate_config: {accelerate}\n")
    proc = _start(["train", "--config", tmp_path / "run.yaml",
                   *_args([], data, tiny_llama, tmp_path / "run", "--max-steps", 1, "--per-device-train-batch-size", 4)],
                  tmp_path, "run.log")
    try:
        log = _finish(proc, timeout=120)
    finally:
        _kill_all(proc) if proc.poll() is None else None
    assert log.count("Launching 1 process:") == 1
    assert (tmp_path / "run" / "model" / "config.json").exists()


def test_an_empty_model_samples_with_the_folder_s_generation_settings(tmp_path, tiny_llama):
    """The processes that build the model empty read generation_config.json as from_pretrained does: a repetition
    penalty that the first process samples with, the others sample with too."""
    import shutil

    from transformers import AutoModelForCausalLM, GenerationConfig

    from thumbalign.engine.models import empty_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    GenerationConfig(repetition_penalty=1.3, no_repeat_ngram_size=3).save_pretrained(folder)
    loaded, empty = AutoModelForCausalLM.from_pretrained(folder), empty_model(folder)
    assert all(p.is_meta for p in empty.parameters())
    for name in ("repetition_penalty", "no_repeat_ngram_size", "eos_token_id"):
        assert getattr(empty.generation_config, name) == getattr(loaded.generation_config, name), name
