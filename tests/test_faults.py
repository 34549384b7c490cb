"""Where real users break it: a second run on a live folder, changed data on resume, file-system failures at every
write, uneven data over several processes, and fuzzed input at the command line. Every failure is one line."""

import errno
import json
import shutil
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import toy_feedback, write_jsonl
from thumbalign.cli import main
from thumbalign.trainers.config import TrainConfig
from thumbalign.trainers.policy import train


def _args(data, model, out, *extra):
    return ["train", "--data", str(data), "--model", str(model), "--output-dir", str(out), "--learning-rate", "1e-3",
            "--bf16", "false", "--warmup-ratio", "0", "--logging-steps", "1", "--no-report", *map(str, extra)]


def _popen(args, cache, env=None):
    return subprocess.Popen([sys.executable, "-m", "thumbalign", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "THUMBALIGN_CACHE": str(cache), "PYTHONUNBUFFERED": "1", **(env or {})})


def _metrics(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _config(tmp_path, model, **kw):
    values = dict(data=str(write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))), model=str(model),
                  output_dir=str(tmp_path / "run"), learning_rate=1e-3, max_steps=4, per_device_train_batch_size=4,
                  bf16="false", save_steps=2, logging_steps=1, report=False)
    values.update(kw)
    return TrainConfig(**values)


def _one_line(capsys) -> str:
    """The error a user reads: one line (progress bars aside), never a traceback."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("thumbalign: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


# --------------------------------------------------------------------------- concurrent runs, changed data

def test_a_second_run_on_a_live_folder_is_refused_naming_the_first(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    first = _popen(_args(data, tiny_llama, tmp_path / "run", "--max-steps", 6, "--save-steps", 1),
                   tmp_path / "cache", env={"THUMBALIGN_TEST_CHECKPOINT_PAUSE": "0.4"})
    deadline = time.time() + 120
    while not _metrics(tmp_path / "run"):  # the first run has reported a step: it is live
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    second = _popen(_args(data, tiny_llama, tmp_path / "run", "--max-steps", 2, "--overwrite"), tmp_path / "cache")
    _, err = second.communicate(timeout=120)
    assert second.returncode == 2
    assert err.strip().splitlines() == [f"thumbalign: error: {tmp_path / 'run'} is in use by another thumbalign run "
                                        f"(PID {first.pid}); wait for it to end or choose another --output-dir"]
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err  # nothing of the first run was touched
    assert (tmp_path / "run" / "model").exists() and [m["step"] for m in _metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]


def test_a_run_resumed_between_two_log_lines_logs_what_the_uninterrupted_run_logged(tmp_path, tiny_llama):
    """--save-steps 2, --logging-steps 3: the run is interrupted after the checkpoint of step 4, between two log
    lines; resumed, every metrics line (losses, rewards, δ) equals the uninterrupted run's."""
    straight = tmp_path / "straight"
    train(_config(tmp_path, tiny_llama, output_dir=str(straight), max_steps=6, logging_steps=3, save_steps=2,
                  per_device_train_batch_size=2), log=lambda *a: None)
    # what a kill right after step 4's checkpoint leaves: checkpoints up to step 4, no model, no summary
    run = tmp_path / "run"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns("step-000006", "model", "summary.json"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004"]
    train(_config(tmp_path, tiny_llama, output_dir=str(run), max_steps=6, logging_steps=3, save_steps=2,
                  per_device_train_batch_size=2, resume="latest"), log=lambda *a: None)
    strip = ("samples_per_s", "tokens_per_s")
    a = [{k: v for k, v in m.items() if k not in strip} for m in _metrics(straight)]
    b = [{k: v for k, v in m.items() if k not in strip} for m in _metrics(run)]
    assert [m["step"] for m in a] == [2, 3, 4, 6] and a == b


def test_resume_with_changed_data_is_refused(tmp_path, tiny_llama, capsys):
    config = _config(tmp_path, tiny_llama, max_steps=4, save_steps=2)
    train(config, log=lambda *a: None)
    rows = toy_feedback(16)
    rows[3]["label"] = not rows[3]["label"]  # the same file, one label edited
    write_jsonl(Path(config.data), rows)
    code = main(["train", "--data", config.data, "--model", str(tiny_llama), "--output-dir", config.output_dir,
                 "--learning-rate", "1e-3", "--max-steps", "4", "--per-device-train-batch-size", "4", "--bf16",
                 "false", "--save-steps", "2", "--logging-steps", "1", "--no-report", "--resume"])
    assert code == 2
    assert "the training data changed since the interrupted run (changed: data file, tokenised examples)" in \
        _one_line(capsys)


# --------------------------------------------------------------------------- file-system failures

POINTS = {  # where a write fails -> (the file whose write fails, what the one line says)
    "run settings": ("run_config.yaml", "cannot write the run's settings"),
    "metrics": ("metrics.jsonl", "cannot append to"),
    "reference cache": (".safetensors", "cannot write the reference log-probs cache"),
    "summary": ("summary.json", "cannot write the run summary"),
    "model folder": ("model", "cannot write the model folder"),
}


def _inject(monkeypatch, point: str, errno_: int):
    import builtins

    import thumbalign.engine.rundir as rundir
    import thumbalign.files as files

    name = POINTS[point][0]

    def refuse(*args, **kwargs):
        raise OSError(errno_, os.strerror(errno_))

    if point == "model folder":
        monkeypatch.setattr("thumbalign.trainers.final_model.write_policy", refuse)
    elif point == "metrics":  # appending is done with open(..., "a") in rundir
        monkeypatch.setattr(rundir, "open", lambda path, mode="r", *a, **k: refuse() if str(path).endswith(name)
                            and "a" in mode else builtins.open(path, mode, *a, **k), raising=False)
    else:  # the rename that completes an atomic write
        real = files.os.replace
        monkeypatch.setattr(files.os, "replace", lambda src, dst: refuse() if str(dst).endswith(name)
                            else real(src, dst))


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.parametrize("errno_", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_failing_write_is_one_line_and_leaves_nothing_half_written(tmp_path, tiny_llama, monkeypatch, capsys,
                                                                      point, errno_):
    _inject(monkeypatch, point, errno_)
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    code = main(_args(data, tiny_llama, tmp_path / "run", "--max-steps", "2", "--save-steps", "1"))
    line = _one_line(capsys)
    assert code == 2 and POINTS[point][1] in line and os.strerror(errno_) in line, line
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith((".staging", ".partial"))]
    assert not leftovers, leftovers
    if point in ("model folder", "summary"):  # the earlier outputs are intact: both checkpoints load
        for step in ("step-000001", "step-000002"):
            load_file(str(tmp_path / "run" / "checkpoints" / step / "weights.safetensors"))


def test_import_creates_the_output_folder_reads_utf16_and_leaves_no_partial_file(tmp_path, capsys):
    export = tmp_path / "export.json"
    export.write_bytes("\ufeff".encode("utf-16-le") + json.dumps(
        [{"q": "Café?", "a": "oui", "thumb": "up"}, {"q": "Tea?", "a": "non", "thumb": "down"}]).encode("utf-16-le"))
    out = tmp_path / "new" / "folder" / "feedback.jsonl"
    assert main(["import", str(export), "--from", "generic", "--prompt-field", "q", "--completion-field", "a",
                 "--label-field", "thumb", "-o", str(out)]) == 0
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["Café?", "Tea?"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"q": "a", "a": "b", "thumb": "up"}\n{"q": \n')
    capsys.readouterr()
    assert main(["import", str(broken), "--from", "generic", "--prompt-field", "q", "--completion-field", "a",
                 "--label-field", "thumb", "-o", str(tmp_path / "out.jsonl")]) == 2
    assert "broken.jsonl, line 2" in _one_line(capsys)
    assert not list(tmp_path.glob("*out.jsonl*"))  # neither the output nor a partial file


# --------------------------------------------------------------------------- several processes, uneven data

def _weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


@pytest.mark.parametrize("extra,engine", [
    (("--method", "bco"), ()),
    # KTO's mismatched pairs are one more forward pass per micro-batch: with sharded weights, every process's
    (("--method", "kto"), ("--accelerate-config", "zero3")),
    (("--method", "bco", "--udm", "--udm-encoder", "policy"), ()),
    (("--method", "bco", "--delta", "prompt", "--delta-clusters", "2", "--udm-encoder", "policy"), ()),
])
def test_two_processes_equal_one_with_uneven_data_and_accumulation(tmp_path, tiny_llama, extra, engine):
    """13 examples, 8 per step: every epoch ends with a step of 5, which two processes share unevenly."""
    from test_sharded import DEEPSPEED

    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(13))
    common = ("--max-steps", 4, "--gradient-accumulation-steps", 2, *extra)
    one = _popen(_args(data, tiny_llama, tmp_path / "one", "--per-device-train-batch-size", 4, *common),
                 tmp_path / "c1")
    two = None
    out, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    two = _popen(_args(data, tiny_llama, tmp_path / "two", "--per-device-train-batch-size", 2, "--num-processes", 2,
                       *common, *engine), tmp_path / "c2", DEEPSPEED)
    out, err = two.communicate(timeout=300)
    assert two.returncode == 0, err
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "two"))
    assert s2["world_size"] == 2 and s2["examples_on_several_processes"] == 0
    assert sum(s2["examples_per_process"]) == s1["examples_per_process"][0] == 8 + 5 + 8 + 5  # nothing repeated
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())
    assert s2["threshold"] == pytest.approx(s1["threshold"], abs=1e-6)  # δ or z_ref saw the same rewards
    for x, y in zip(_metrics(tmp_path / "one"), _metrics(tmp_path / "two")):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5) and x["accuracy"] == y["accuracy"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_machines_train_like_two_processes_on_one(tmp_path, tiny_llama):
    """--num-machines 2: the same command started twice (here both "machines" are this host, over loopback), one
    process each, must train exactly as two processes on one machine."""
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(13))
    common = ("--max-steps", 3, "--per-device-train-batch-size", 2, "--gradient-accumulation-steps", 2)
    one = _popen(_args(data, tiny_llama, tmp_path / "one", "--num-processes", 2, *common), tmp_path / "c1")
    _, err = one.communicate(timeout=300)
    assert one.returncode == 0, err
    port = _free_port()
    machines = [_popen(_args(data, tiny_llama, tmp_path / "two", "--num-machines", 2, "--machine-rank", rank,
                             "--main-process-ip", "127.0.0.1", "--main-process-port", port, *common), tmp_path / "c2")
                for rank in (0, 1)]
    for machine in machines:
        out, err = machine.communicate(timeout=300)
        assert machine.returncode == 0, err
    assert "on machine 1 of 2" in out
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["examples_on_several_processes"] == 0
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key


@pytest.mark.parametrize("rank,message", [
    (1, "machine 1 could not reach machine 0 at 127.0.0.1:{port} within 3 s (--rendezvous-timeout): start the same "
        "command there with --machine-rank 0"),
    (0, "only 1 of 2 machines joined the rendezvous at 127.0.0.1:{port} within 3 s (--rendezvous-timeout): start the "
        "same command on every machine, each with its own --machine-rank"),
])
def test_a_machine_left_alone_at_the_rendezvous_says_so_in_one_line(tmp_path, tiny_llama, rank, message):
    """Only one of two machines is started: after --rendezvous-timeout it ends with one line saying who is missing."""
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    port = _free_port()
    alone = _popen(_args(data, tiny_llama, tmp_path / "run", "--num-machines", 2, "--machine-rank", rank,
                         "--main-process-ip", "127.0.0.1", "--main-process-port", port, "--rendezvous-timeout", 3),
                   tmp_path / "cache")
    _, err = alone.communicate(timeout=120)
    assert alone.returncode == 2
    assert err.strip().splitlines()[-1].startswith("thumbalign: error: " + message.format(port=port)), err[-3000:]


@pytest.mark.parametrize("flags,message", [
    (("--num-machines", "2"), "needs --main-process-ip"),
    (("--num-machines", "2", "--machine-rank", "2", "--main-process-ip", "10.0.0.1"), "--machine-rank 2 is not"),
])
def test_a_multi_machine_run_names_what_it_lacks(tmp_path, tiny_llama, capsys, flags, message):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(4))
    assert main(_args(data, tiny_llama, tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- fuzzing at the command line

def _fuzz_file(tmp_path, kind, payload) -> Path:
    if kind == "parquet-bytes":
        path = tmp_path / "f.parquet"
        path.write_bytes(payload)
    elif kind == "jsonl-bytes":
        path = tmp_path / "f.jsonl"
        path.write_bytes(payload)
    elif kind == "csv-bytes":
        path = tmp_path / "f.csv"
        path.write_bytes(payload)
    else:
        path = tmp_path / "f.json"
        path.write_bytes(payload)
    return path


ROW_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=300),
                       st.lists(st.dictionaries(st.sampled_from(["role", "content", "x"]),
                                                st.one_of(st.text(max_size=50), st.integers()), max_size=3),
                                max_size=3))
ROWS = st.lists(st.dictionaries(st.sampled_from(["prompt", "completion", "label", "messages", "chosen", "rejected"]),
                                ROW_VALUES, max_size=5), min_size=0, max_size=6)


def _payloads():
    structured = ROWS.map(lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode())
    return st.tuples(st.sampled_from(["jsonl-bytes", "csv-bytes", "json-bytes", "parquet-bytes"]),
                     st.one_of(st.binary(max_size=400), structured))


@pytest.mark.parametrize("command", ["inspect", "import", "train --dry-run"])
def test_cli_fuzz_every_failure_is_one_line(tmp_path_factory, tiny_llama, command):
    counter = {"runs": 0}

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(_payloads())
    def check(case):
        kind, payload = case
        tmp = tmp_path_factory.mktemp("fuzz")
        path = _fuzz_file(tmp, kind, payload)
        argv = {"inspect": ["inspect", str(path), "--model", "none", "--udm-encoder", "none", "--json"],
                "import": ["import", str(path), "--from", "generic", "-o", str(tmp / "out.jsonl")],
                "train --dry-run": ["train", "--data", str(path), "--model", str(tiny_llama), "--dry-run"]}[command]
        import contextlib
        import io

        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(argv)  # an exception escaping here is a traceback for the user: the test fails
        lines = err.getvalue().strip().splitlines()
        assert code in (0, 2)
        if code == 2:
            assert len([line for line in lines if line.startswith("thumbalign: error:")]) == 1, lines
        counter["runs"] += 1

    check()
    assert counter["runs"] >= 150


def test_cli_fuzz_datasets_folders(tmp_path_factory, tiny_llama):
    """Folders written by datasets.save_to_disk, with whatever rows Arrow accepts: one line or success."""
    import contextlib
    import io

    import datasets

    runs = {"n": 0}

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(ROWS)
    def check(rows):
        tmp = tmp_path_factory.mktemp("ds")
        try:
            datasets.Dataset.from_list(rows).save_to_disk(str(tmp / "ds"))
        except Exception:  # rows Arrow cannot hold in one table: not a folder a user can have
            return
        for argv in (["inspect", str(tmp / "ds"), "--model", "none", "--udm-encoder", "none", "--json"],
                     ["train", "--data", str(tmp / "ds"), "--model", str(tiny_llama), "--dry-run"]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
            assert code in (0, 2)
            if code == 2:
                assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
        runs["n"] += 1

    check()
    assert runs["n"] >= 10
