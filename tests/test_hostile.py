"""Hostile input and faults: nothing the user had is deleted or replaced by a run that then fails, and the error is
one line. Each test runs the real command line on real files."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import toy_feedback, write_jsonl
from thumbalign.cli import build_parser, main
from thumbalign.engine.checkpoint import damage
from thumbalign.trainers.config import TrainConfig
from thumbalign.trainers.policy import train


def _train(data, model, out, *extra):
    return ["train", "--data", str(data), "--model", str(model), "--output-dir", str(out), "--bf16", "false",
            "--warmup-ratio", "0", "--no-report", "--max-steps", "1", "--per-device-train-batch-size", "4",
            *map(str, extra)]


def _snapshot(folder) -> dict:
    """Every file under `folder` (the run lock aside) and its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _earlier_run(out, tiny_llama) -> dict:
    """A run folder as a finished run leaves it: its model, generations, metrics, summary, settings, a checkpoint."""
    out.mkdir(parents=True)
    write_jsonl(out / "generations.jsonl", toy_feedback(16))
    shutil.copytree(tiny_llama, out / "model")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    (out / "summary.json").write_text('{"steps": 1}')
    (out / "run_config.yaml").write_text(f"data: {out / 'generations.jsonl'}\nmodel: {tiny_llama}\n")
    (out / "checkpoints" / "step-000001").mkdir(parents=True)
    (out / "checkpoints" / "step-000001" / "trainer_state.json").write_text("{}")
    return _snapshot(out)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("thumbalign: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


# ------------------------------------------------------------------------------------- --overwrite

@pytest.mark.parametrize("flag, inside", [("--data", "generations.jsonl"), ("--model", "model"),
                                          ("--config", "run_config.yaml")])
def test_overwrite_refuses_an_input_inside_the_run_it_would_delete(tmp_path, tiny_llama, capsys, flag, inside):
    out = tmp_path / "runs" / "x"
    before = _earlier_run(out, tiny_llama)
    inputs = {"--data": tmp_path / "f.jsonl", "--model": tiny_llama}
    write_jsonl(inputs["--data"], toy_feedback(16))
    args = _train(inputs["--data"], inputs["--model"], out, "--overwrite")
    if flag == "--config":
        args += ["--config", str(out / inside)]
    else:
        args[args.index(flag) + 1] = str(out / inside)
    assert main(args) == 2
    line = _one_line(capsys)
    assert f"{flag} {out / inside} lies inside the earlier run" in line and "--overwrite would delete" in line
    assert _snapshot(out) == before


def test_a_replacing_run_that_fails_before_it_starts_leaves_the_earlier_run_as_it_was(tmp_path, tiny_llama, capsys):
    out = tmp_path / "run"
    before = _earlier_run(out, tiny_llama)
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    assert main(_train(data, tmp_path / "no-such-model", out, "--overwrite")) == 2
    assert "no-such-model" in _one_line(capsys)
    assert _snapshot(out) == before and not (out / ".replaced").exists()


def test_overwrite_replaces_the_earlier_run_once_the_new_one_has_started(tmp_path, tiny_llama):
    out = tmp_path / "run"
    _earlier_run(out, tiny_llama)
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    assert main(_train(data, tiny_llama, out, "--overwrite", "--max-steps", "2", "--save-steps", "2")) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # the earlier step-000001 is gone
    assert not (out / ".replaced").exists()


def test_a_kill_before_the_replacing_run_started_brings_the_earlier_run_back(tmp_path, tiny_llama):
    out = tmp_path / "run"
    before = _earlier_run(out, tiny_llama)
    # enough rows that the reference pass, which comes before the run starts, outlasts the kill
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16) * 200)
    env = {**os.environ, "THUMBALIGN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "thumbalign", *_train(data, tiny_llama, out, "--overwrite")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stdout:
        if line.startswith("Computing reference log-probs"):  # said by the run, before it starts
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (out / ".replaced" / "summary.json").exists() and not (out / "run_config.yaml").exists()
    # the next command on the folder finds the earlier run where it was
    again = subprocess.run([sys.executable, "-m", "thumbalign", *_train(data, tiny_llama, out)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert _snapshot(out) == before


# ------------------------------------------------------------------------------------- import

def test_an_import_with_no_usable_row_leaves_the_earlier_output_untouched(tmp_path, capsys):
    out = write_jsonl(tmp_path / "feedback.jsonl", toy_feedback(8))
    before = out.read_bytes()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    unusable = write_jsonl(tmp_path / "unlabelled.jsonl", [{"prompt": "p", "completion": "c", "label": "maybe"}] * 3)
    for source in (empty, unusable):
        assert main(["import", str(source), "--from", "generic", "-o", str(out)]) == 2
        line = _one_line(capsys)
        assert "no usable feedback row" in line and f"{out} was not written" in line
        assert out.read_bytes() == before
    assert "3 skipped" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl", "feedback.jsonl", "unlabelled.jsonl"]


def test_an_import_refuses_to_write_over_its_own_input(tmp_path, capsys):
    data = write_jsonl(tmp_path / "feedback.jsonl", toy_feedback(8))
    before = data.read_bytes()
    assert main(["import", str(data), "--from", "generic", "-o", str(data)]) == 2
    assert "is also an input" in _one_line(capsys)
    assert data.read_bytes() == before


# ------------------------------------------------------------------------------------- hostile text in data files

def _feedback_commands(data, tiny_llama, tmp_path):
    return [_train(data, tiny_llama, tmp_path / "run"), ["inspect", str(data), "--model", str(tiny_llama)],
            ["import", str(data), "--from", "generic", "-o", str(tmp_path / "out.jsonl")]]


def test_a_number_too_long_for_python_to_read_is_one_line_naming_file_and_line(tmp_path, tiny_llama, capsys):
    data = tmp_path / "f.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in toy_feedback(8))
                    + '{"prompt": "p", "completion": "c", "label": 1' + "0" * 4_999 + "}\n")
    for args in _feedback_commands(data, tiny_llama, tmp_path):
        assert main(args) == 2
        assert f"{data}, line 9: invalid JSON: a number longer than 4300 digits" in _one_line(capsys)
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("suffix, row, field", [
    (".jsonl", '{"prompt": "\\ud800 hi", "completion": "c", "label": true}', "prompt"),
    (".jsonl", '{"prompt": [{"role": "user", "content": "\\ud83d\\ude00 fine"}, {"role": "assistant", '
               '"content": "half \\uDC00"}], "completion": "c", "label": true}', "prompt[1].content"),
    (".csv", '"[{""role"": ""user"", ""content"": ""\\ud800 hi""}]",c,1', "prompt[0].content"),
])
def test_a_lone_surrogate_escape_is_one_line_naming_file_line_and_field(tmp_path, tiny_llama, capsys, suffix, row,
                                                                         field):
    data = tmp_path / f"f{suffix}"
    head = "".join(json.dumps(r) + "\n" for r in toy_feedback(8)) if suffix == ".jsonl" else \
        "prompt,completion,label\n" + "".join(f"{r['prompt']},{r['completion']},{int(r['label'])}\n"
                                               for r in toy_feedback(8))
    data.write_text(head + row + "\n")
    line_number = 9 if suffix == ".jsonl" else 10  # the CSV header is line 1
    for args in _feedback_commands(data, tiny_llama, tmp_path):
        assert main(args) == 2
        line = _one_line(capsys)
        assert f"{data}, line {line_number}: field '{field}': holds half of a UTF-16 surrogate pair" in line, line


# ------------------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("command, flag, value", [
    ("train", "--learning-rate", "nan"), ("train", "--beta", "inf"), ("train", "--seed", "-1"),
    ("train", "--lr-scheduler-type", "bogus"), ("train", "--label-smoothing", "nan"),
    ("online", "--temperature", "nan"), ("online", "--pass-threshold", "nan"), ("online", "--reward-weights", "nan"),
    ("eval", "--temperature", "nan"), ("import", "--threshold", "-inf"), ("inspect", "--seed", "-5"),
])
def test_a_number_that_is_not_finite_or_out_of_range_is_refused_before_anything_runs(tmp_path, tiny_llama, capsys,
                                                                                      command, flag, value):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(8))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}] * 2)
    base = {"train": _train(data, tiny_llama, tmp_path / "run"),
            "online": ["online", "--prompts", str(prompts), "--model", str(tiny_llama), "--reward", "vader",
                       "--output-dir", str(tmp_path / "run")],
            "eval": ["eval", "--model", str(tiny_llama), "--prompts", str(prompts), "--judge", "vader"],
            "import": ["import", str(data), "--from", "generic", "-o", str(tmp_path / "out.jsonl")],
            "inspect": ["inspect", str(data)]}[command]
    try:
        code = main(base + [flag, value])
    except SystemExit as stop:  # argparse refuses a flag's value itself
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and (value in err or flag.lstrip("-").replace("-", "_") in err), err[-1000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.jsonl").exists()


# ------------------------------------------------------------------------------------- bounded memory and time

LIMITS = ("import resource, runpy, sys; "
          "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
          "resource.setrlimit(resource.RLIMIT_CPU, (60, 60)); "
          "sys.argv = ['thumbalign', *sys.argv[1:]]; runpy.run_module('thumbalign', run_name='__main__')")


def _bounded(args, tmp_path) -> str:
    """The command in a process held to 4 GB of address space and 60 s (CPU, and wall clock): one error line, exit 2."""
    done = subprocess.run([sys.executable, "-c", LIMITS, *map(str, args)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "THUMBALIGN_CACHE": str(tmp_path / "cache")})
    errors = [line for line in done.stderr.splitlines() if line.startswith("thumbalign: error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    return errors[0]


def test_deeply_nested_json_is_refused_in_bounded_memory(tmp_path, tiny_llama):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # 200 KB: 21 GB through ijson's item parser
    assert "nested deeper than 256 levels" in _bounded(["inspect", deep, "--model", tiny_llama], tmp_path)
    inside = tmp_path / "inside.json"
    inside.write_text('[{"prompt": "p", "completion": "c", "label": true}, ' + "[" * 50_000 + "]" * 50_000 + "]")
    line = _bounded(["import", inside, "--from", "generic", "-o", tmp_path / "out.jsonl"], tmp_path)
    assert "item 1" in line and "nested deeper" in line


@pytest.mark.parametrize("source", ["generic", "langsmith"])
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("depth", [300, 3_000])  # below and above what Python's json module parses at all
def test_a_deeply_nested_list_in_an_export_is_refused_in_bounded_memory(tmp_path, source, suffix, depth):
    nested = "[" * depth + "]" * depth
    rows = {"generic": [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "X"}],
            "langsmith": [{"id": "r1", "inputs": {"q": "hi"}, "outputs": {"o": "yo"}},
                          {"id": "r2", "inputs": {"q": "hi"}, "outputs": "X"}]}[source]
    lines = [json.dumps(row).replace('"X"', nested) for row in rows]
    export = tmp_path / f"export{suffix}"
    export.write_text("\n".join(lines) + "\n" if suffix == ".jsonl" else "[" + ", ".join(lines) + "]")
    args = ["import", export, "--from", source, "-o", tmp_path / "out.jsonl"]
    if source == "langsmith":
        args[2:2] = [write_jsonl(tmp_path / "feedback.jsonl", [{"run_id": f"r{i}", "key": "k", "score": 1}
                                                               for i in (1, 2)])]
    line = _bounded(args, tmp_path)
    where = "line 2" if suffix == ".jsonl" else "item 1"
    assert f"export{suffix}, {where}: nested deeper than 256 levels" in line
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("name, text, expected", [
    ("bomb.yaml", "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)),
     "expands to more than"),
    ("deep.yaml", "data: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested deeper"),
    ("self.yaml", "data: &a [*a]\n", "refers to itself"),
    ("binary.yaml", b"\x00\xff\xfe\x80" * 100, "is not UTF-8 text"),
])
def test_a_hostile_config_file_is_one_line(tmp_path, name, text, expected):
    config = tmp_path / name
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert expected in _bounded(["train", "--config", config], tmp_path)
    assert expected in _bounded(["train", "--data", "x.jsonl", "--num-processes", "2", "--accelerate-config", config],
                                tmp_path)


@pytest.mark.parametrize("command", ["data", "config", "import"])
def test_a_fifo_is_refused_up_front_instead_of_waiting_for_a_writer(tmp_path, tiny_llama, command):
    fifo = tmp_path / "feedback.jsonl"
    os.mkfifo(fifo)
    args = {"data": ["inspect", fifo, "--model", tiny_llama], "config": ["train", "--config", fifo],
            "import": ["import", fifo, "--from", "generic", "-o", tmp_path / "out.jsonl"]}[command]
    assert "not a regular file" in _bounded(args, tmp_path)


def test_an_openwebui_export_whose_parent_chain_loops_is_skipped_and_counted(tmp_path, capsys):
    history = {"a": {"id": "a", "parentId": "b", "role": "user", "content": "hi"},
               "b": {"id": "b", "parentId": "c", "role": "assistant", "content": "hello"},
               "c": {"id": "c", "parentId": "a", "role": "user", "content": "again"},
               "d": {"id": "d", "parentId": "e", "role": "assistant", "content": "a fine answer"},
               "e": {"id": "e", "role": "user", "content": "a question"}}
    rows = [{"data": {"rating": 1}, "meta": {"message_id": mid},
             "snapshot": {"chat": {"chat": {"history": {"messages": history}}}}} for mid in ("b", "d")]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(rows))
    out = tmp_path / "out.jsonl"
    assert main(["import", str(export), "--from", "openwebui", "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["skipped"] == {"conversation tree with a cycle (parentId)": 1} and report["written_up"] == 1


def test_a_huge_record_is_dropped_and_counted_before_the_tokenizer(tmp_path, tiny_llama):
    rows = toy_feedback(16) + [{"prompt": "p", "completion": "y" * 5_000, "label": True}]
    data = write_jsonl(tmp_path / "f.jsonl", rows)
    summary = train(TrainConfig(data=str(data), model=str(tiny_llama), output_dir=str(tmp_path / "run"),
                                max_steps=1, per_device_train_batch_size=4, bf16="false", report=False,
                                max_record_chars=1_000, max_length=8192), log=lambda *a: None)
    tokens = summary["data"]["train_tokens"]
    assert tokens["dropped_too_large"] == 1 and tokens["kept"] == 16 and tokens["records"] == 17


# ------------------------------------------------------------------------------------- damaged checkpoints

def _six_steps(tmp_path, tiny_llama, folder, **extra):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    return TrainConfig(data=str(data), model=str(tiny_llama), output_dir=str(tmp_path / folder), max_steps=6,
                       save_steps=2, save_total_limit=3, per_device_train_batch_size=4, learning_rate=1e-3,
                       warmup_ratio=0.0, bf16="false", report=False, **extra)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_middle(path):  # the header still parses: only the digest can tell
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 64] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": ("weights.safetensors", _truncate),
    "a changed byte in the optimizer moments": ("optimizer.safetensors", _flip_middle),
    "random bytes for the trainer state": ("trainer_state.json", lambda p: p.write_bytes(os.urandom(300))),
    "a missing scheduler": ("scheduler.json", lambda p: p.unlink()),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("straight")
    summary = train(_six_steps(tmp, tiny_llama, "run"), log=lambda *a: None)
    return summary, load_file(str(tmp / "run" / "model" / "model.safetensors"))


@pytest.mark.parametrize("what", list(DAMAGE))
def test_a_damaged_latest_checkpoint_costs_that_checkpoint_only(tmp_path, tiny_llama, uninterrupted, what):
    train(_six_steps(tmp_path, tiny_llama, "run"), log=lambda *a: None)
    run = tmp_path / "run"
    name, spoil = DAMAGE[what]
    spoil(run / "checkpoints" / "step-000006" / name)
    said = []
    summary = train(_six_steps(tmp_path, tiny_llama, "run", resume="latest"), log=said.append)
    passed = [line for line in map(str, said) if "step-000006 is damaged" in line]
    assert len(passed) == 1 and name in passed[0], said
    assert any("Resumed from" in str(line) and "step-000004" in str(line) for line in said), said
    expected_summary, expected = uninterrupted
    got = load_file(str(run / "model" / "model.safetensors"))
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert summary["reward_shift"] == expected_summary["reward_shift"]
    assert damage(run / "checkpoints" / "step-000006") is None  # saved again, whole


def test_resuming_from_a_named_damaged_checkpoint_or_from_none_intact_is_one_line(tmp_path, tiny_llama, capsys):
    train(_six_steps(tmp_path, tiny_llama, "run"), log=lambda *a: None)
    run = tmp_path / "run"
    args = _train(tmp_path / "f.jsonl", tiny_llama, run) + ["--max-steps", "6", "--save-steps", "2",
                                                            "--save-total-limit", "3", "--learning-rate", "1e-3"]
    _truncate(run / "checkpoints" / "step-000004" / "weights.safetensors")
    assert main(args + ["--resume", str(run / "checkpoints" / "step-000004")]) == 2
    line = _one_line(capsys)
    assert "step-000004" in line and "damaged (weights.safetensors differs" in line
    for step in ("000002", "000006"):
        _flip_middle(run / "checkpoints" / f"step-{step}" / "weights.safetensors")
    assert main(args + ["--resume", "latest"]) == 2
    line = _one_line(capsys)
    assert "no intact checkpoint" in line and all(f"step-{s} is damaged" in line for s in ("000002", "000004", "000006"))


@pytest.mark.parametrize("spoil", [_truncate, _flip_middle])
def test_a_damaged_reference_log_prob_cache_entry_is_computed_again(tmp_path, tiny_llama, spoil):
    config = lambda out: TrainConfig(data=str(write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))),  # noqa: E731
                                     model=str(tiny_llama), output_dir=str(tmp_path / out), max_steps=1,
                                     per_device_train_batch_size=4, bf16="false", report=False,
                                     cache_dir=str(tmp_path / "cache"))
    first = train(config("a"), log=lambda *a: None)
    [entry] = (tmp_path / "cache" / "reflogps").iterdir()
    spoil(entry)
    said = []
    second = train(config("b"), log=said.append)
    lines = [str(line) for line in said if "are damaged (" in str(line)]
    assert len(lines) == 1, said
    line = lines[0]
    assert line.startswith(f"The cached reference log-probs {entry} are damaged (") and line.endswith("computed again")
    assert first["reference_logps_from_cache"] is False and second["reference_logps_from_cache"] is False
    assert train(config("c"), log=lambda *a: None)["reference_logps_from_cache"] is True  # the entry was rewritten
    assert first["final_metrics"]["loss"] == second["final_metrics"]["loss"]


def test_a_damaged_prompt_embedding_cache_entry_is_computed_again(tmp_path):
    from thumbalign.methods.udm import embed_texts

    texts = ["how do I sort a list", "write a poem about rain", "what is 2 + 2"]
    first = embed_texts(texts, cache_dir=tmp_path, disable_bar=True)
    [entry] = (tmp_path / "embeddings").iterdir()
    _flip_middle(entry)
    said = []
    again = embed_texts(texts, cache_dir=tmp_path, disable_bar=True, say=said.append)
    assert said == [f"The cached prompt embeddings {entry} are damaged (its bytes differ from those written): "
                    "computed again"]
    assert (again == first).all()
    assert embed_texts(texts, cache_dir=tmp_path, disable_bar=True, say=said.append).tolist() == first.tolist()
    assert len(said) == 1  # read from the rewritten entry


# ------------------------------------------------------------------------------------- rewards, judges, reward models

@pytest.mark.parametrize("spec, expected", [
    ("rm:{model}", "is not a trained reward model: its checkpoint has no classification head (score.weight"),
    ("rm:{tmp}/notes", "is not a reward model folder (it has no config.json)"),
    ("broken:score", "importing broken failed: SyntaxError: invalid syntax (broken.py, line 1)"),
    ("raising:score", "importing raising failed: RuntimeError: no network at import"),
    (":score", "expected module:function"),
    ("os:no_such_function", "os has no function no_such_function"),
])
def test_a_reward_or_judge_that_cannot_be_loaded_is_one_line_before_anything_runs(tmp_path, tiny_llama, capsys,
                                                                                  monkeypatch, spec, expected):
    (tmp_path / "notes").mkdir()
    (tmp_path / "broken.py").write_text("def score(:\n")
    (tmp_path / "raising.py").write_text("raise RuntimeError('no network at import')\ndef score(p, c): return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}] * 2)
    spec = spec.format(model=tiny_llama, tmp=tmp_path)
    online = ["online", "--prompts", str(prompts), "--model", str(tiny_llama), "--reward", spec, "--output-dir",
              str(tmp_path / "run"), "--max-steps", "1", "--bf16", "false"]
    judge = ["eval", "--prompts", str(prompts), "--model", str(tiny_llama), "--baseline", str(tiny_llama), "--judge",
             spec, "--output-dir", str(tmp_path / "eval")]
    for args in (online, judge):
        assert main(args) == 2
        assert expected in _one_line(capsys)
    assert not (tmp_path / "run" / "model").exists()


def _option_helps(parser, command=()):
    """(command words, option, help) of every option of every command, subcommands included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _option_helps(sub, command + (name,))
        elif action.option_strings:
            yield " ".join(command), action.option_strings[0], action.help or ""


def test_every_flag_that_runs_a_module_function_says_so_in_its_help():
    runs_code = {(command, flag): help_ for command, flag, help_ in _option_helps(build_parser())
                 if "module:function" in help_}
    assert {("train", "--judge"), ("online", "--reward"), ("eval", "--judge")} <= set(runs_code), sorted(runs_code)
    for (command, flag), help_ in runs_code.items():
        assert "imports MODULE and runs FUNCTION: only name code you trust" in help_, (command, flag, help_)


def test_scoring_with_a_plain_language_model_is_refused(tmp_path, tiny_llama, capsys):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(4))
    assert main(["reward", "score", "--model", str(tiny_llama), "--data", str(data), "-o", str(tmp_path / "s.jsonl")]) == 2
    assert "is not a trained reward model" in _one_line(capsys) and not (tmp_path / "s.jsonl").exists()


# ------------------------------------------------------------------------------------- pickled weights

def _pickled(tiny_llama, folder):
    """The tiny model with its weights as a pickle (pytorch_model.bin), as older transformers saved them."""
    shutil.copytree(tiny_llama, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_a_model_folder_whose_weights_are_a_pickle_is_refused_unless_allowed(tmp_path, tiny_llama, capsys,
                                                                             monkeypatch):
    pickled = _pickled(tiny_llama, tmp_path / "pickled")
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}] * 2)
    judged = ["eval", "--prompts", str(prompts), "--model", str(tiny_llama), "--baseline", str(tiny_llama), "--judge",
              f"rm:{pickled}", "--output-dir", str(tmp_path / "eval")]
    against = ["eval", "--model", str(tiny_llama), "--ref", str(pickled), "--data", str(data), "--output-dir",
               str(tmp_path / "eval")]
    for args in (_train(data, pickled, tmp_path / "run"), against, judged):
        assert main(args) == 2
        line = _one_line(capsys)
        assert f"{pickled}: its weights are a pickle (pytorch_model.bin)" in line and "safe_serialization=True" in line
        assert "THUMBALIGN_ALLOW_PICKLE=1" in line
    assert not (tmp_path / "run" / "model").exists()
    monkeypatch.setenv("THUMBALIGN_ALLOW_PICKLE", "1")
    assert main(_train(data, pickled, tmp_path / "run")) == 0
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- a real full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB file system (tmpfs): room for one checkpoint of a 1.6 MB model (weights and two Adam moments), not for
    a second one or the final model beside it. Mounting needs root, as in CI."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.parametrize("steps, expected", [
    (4, "could not write the checkpoint of step 4 (No space left on device); the earlier checkpoints in {out}/"
        "checkpoints are intact"),
    (2, "cannot write the model folder {out}/model: No space left on device (ENOSPC)"),
])
def test_a_full_disk_is_one_line_and_the_checkpoint_before_it_resumes(tmp_path, small_disk, capsys, steps,
                                                                      expected):
    from conftest import save_tiny_model

    model = save_tiny_model(tmp_path / "model", hidden=144)
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    out = small_disk / "run"
    args = _train(data, model, out, "--max-steps", steps, "--save-steps", 2)
    assert main(args) == 2
    assert expected.format(out=out) in _one_line(capsys)
    checkpoints = out / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000002"] and damage(checkpoints / "step-000002") is None
    assert not (out / "model").exists() and not (out / "model.staging").exists()
    # with room again, the run goes on from that checkpoint
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert main(args + ["--resume", "latest"]) == 0
    assert "Resumed from" in capsys.readouterr().out and (out / "model" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- file modes

def test_every_file_a_run_writes_has_the_mode_open_gives_under_the_umask(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    env = {**os.environ, "THUMBALIGN_CACHE": str(tmp_path / "cache")}
    args = _train(data, tiny_llama, tmp_path / "run", "--max-steps", "2", "--save-steps", "1")
    done = subprocess.run([sys.executable, "-m", "thumbalign", *args], capture_output=True, text=True, env=env,
                          umask=0o007, timeout=300)  # not the usual 022: its modes must come from the umask
    assert done.returncode == 0, done.stderr[-2000:]
    written = [p for folder in (tmp_path / "run", tmp_path / "cache") for p in folder.rglob("*")]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written if p.is_file()}
    assert {"run/model/model.safetensors", "run/checkpoints/step-000002/weights.safetensors",
            "run/checkpoints/step-000002/trainer_state.json", "run/summary.json"} <= set(modes)
    assert any(name.startswith("cache/reflogps/") for name in modes), sorted(modes)
    assert set(modes.values()) == {oct(0o660)}, modes
    assert {oct(p.stat().st_mode & 0o777) for p in written if p.is_dir()} == {oct(0o770)}


# ------------------------------------------------------------------------------------- two processes

def _two_processes(args, tmp_path, **popen):
    return subprocess.Popen([sys.executable, "-m", "thumbalign", *map(str, args), "--num-processes", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "THUMBALIGN_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"},
                            **popen)


def _only_one_line(stderr: str, start: str) -> str:
    """Every process's own line once, none of the launcher's report (traceback, ChildFailedError table, log lines)."""
    lines = [line for line in stderr.splitlines() if line.startswith("thumbalign: ")]
    assert len(lines) == 1 and lines[0].startswith(start), stderr[-3000:]
    assert not any(noise in stderr for noise in ("Traceback", "ChildFailedError", "torch/distributed", "Root Cause",
                                                 "SignalException")), stderr[-3000:]
    return lines[0]


def test_a_bad_row_under_two_processes_is_one_line_with_the_processes_exit_code(tmp_path, tiny_llama):
    rows = toy_feedback(16) + [{"prompt": "p", "completion": "c", "label": "maybe"}]
    data = write_jsonl(tmp_path / "f.jsonl", rows)
    proc = _two_processes(_train(data, tiny_llama, tmp_path / "run"), tmp_path)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 2
    assert "line 17: field 'label'" in _only_one_line(err, "thumbalign: error: ")


def test_ctrl_c_under_two_processes_is_one_line_exit_code_130_and_the_run_resumes(tmp_path, tiny_llama):
    data = write_jsonl(tmp_path / "f.jsonl", toy_feedback(16))
    args = _train(data, tiny_llama, tmp_path / "run", "--max-steps", 40, "--save-steps", 2, "--logging-steps", 1)
    # a session of its own: the signal goes to its process group, as a terminal's Ctrl-C does
    proc = _two_processes(args, tmp_path, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step 3:"):  # said by the run itself: the processes are training
            os.killpg(proc.pid, signal.SIGINT)
            break
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err[-3000:]
    line = _only_one_line(err, "thumbalign: interrupted")
    assert line == "thumbalign: interrupted; continue with --resume (from the last checkpoint)"
    again = _two_processes(args + ["--resume", "latest"], tmp_path)
    out, err = again.communicate(timeout=240)
    assert again.returncode == 0, err[-3000:]
    assert "Resumed from" in out and (tmp_path / "run" / "model" / "model.safetensors").exists()
