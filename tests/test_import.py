"""`thumbalign import` on hand-written exports that follow each tool's documented schema (tests/fixtures)."""

import json
from pathlib import Path

import pytest

from thumbalign.cli import main
from thumbalign.errors import ConfigError
from thumbalign.data.importers import Options, run_import
from thumbalign.data.readers import iter_rows

FIX = Path(__file__).parent / "fixtures"
SYS = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Capital of Australia?"}
SYDNEY = [{"role": "assistant", "content": "Sydney."}]


def _rows(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines()]


def test_openwebui(tmp_path):
    out = tmp_path / "out.jsonl"
    report = run_import("openwebui", [str(FIX / "openwebui_feedback.json")], str(out), Options(keep_comments=True))
    assert _rows(out) == [
        {"prompt": [SYS, USER], "completion": SYDNEY, "label": False,
         "comment": "not_factually_correct | Capital is Canberra"},
        # the rated branch of a regenerated conversation: m1 -> m2b (not m2a) -> m3 -> m4
        {"prompt": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven."},
                    {"role": "user", "content": "Another one?"}],
         "completion": [{"role": "assistant", "content": "Eleven."}], "label": True},
        {"prompt": [SYS, USER], "completion": SYDNEY, "label": True},
    ]
    assert report.rows_read == 7
    assert dict(report.skipped) == {"unrated": 1, "no conversation snapshot": 1, "duplicate": 1, "empty completion": 1}
    assert report.conflicts == 1 and "item 6" in report.conflict_examples[0]


def test_langfuse(tmp_path):
    out = tmp_path / "out.jsonl"
    report = run_import("langfuse", [str(FIX / "langfuse_scores.json"), str(FIX / "langfuse_traces.jsonl")], str(out),
                        Options(score_name="user_feedback", keep_comments=True))
    assert _rows(out) == [
        # scored on the observation, whose input holds the system prompt
        {"prompt": [SYS, USER], "completion": SYDNEY, "label": False, "comment": "wrong city"},
        {"prompt": "What is 2+2?", "completion": "4", "label": True},
    ]
    assert dict(report.skipped) == {"no matching trace": 1, "other score name": 1, "tool calls": 1}
    assert report.rows_read == 5


def test_langfuse_needs_a_score_name_when_there_are_several(tmp_path):
    with pytest.raises(ConfigError, match="several score names.*--score-name"):
        run_import("langfuse", [str(FIX / "langfuse_scores.json"), str(FIX / "langfuse_traces.jsonl")],
                   str(tmp_path / "o.jsonl"), Options())


def test_langsmith(tmp_path):
    out = tmp_path / "out.jsonl"
    report = run_import("langsmith", [str(FIX / "langsmith_feedback.jsonl"), str(FIX / "langsmith_runs.jsonl")],
                        str(out), Options(key="user_score"))
    assert _rows(out) == [
        {"prompt": [SYS, USER], "completion": SYDNEY, "label": False},  # LangChain messages, LLMResult output
        {"prompt": "Who wrote Hamlet?", "completion": "Shakespeare.", "label": True},  # chain {"question"}/{"output"}
    ]
    assert dict(report.skipped) == {"other feedback key": 1, "no matching run": 1}


def test_openai(tmp_path):
    out = tmp_path / "out.jsonl"
    report = run_import("openai", [str(FIX / "openai.jsonl")], str(out), Options())
    hello = [{"role": "user", "content": "Hello"}]
    assert _rows(out) == [
        {"prompt": hello, "completion": [{"role": "assistant", "content": "Hi! How can I help?"}], "label": True},
        {"prompt": hello, "completion": [{"role": "assistant", "content": "What."}], "label": False},
        {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Thanks"}],
         "completion": [{"role": "assistant", "content": "You're welcome!"}], "label": True},
    ]
    assert dict(report.skipped) == {"label: invalid": 1}


def test_generic_csv_with_a_column_mapping(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code = main(["import", str(FIX / "generic.csv"), "--from", "generic", "-o", str(out), "--prompt-field", "question",
                 "--completion-field", "answer", "--label-field", "rating", "--label-map", "up=1,down=0",
                 "--keep-comments", "--json"])
    assert code == 0
    assert _rows(out) == [{"prompt": "What is 2+2?", "completion": "4", "label": True},
                          {"prompt": "What is 3+3?", "completion": "7", "label": False, "comment": "off by one"}]
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == {"label not in --label-map": 1, "missing answer": 1}
    assert summary["written_up"] == 1 and summary["written_down"] == 1 and summary["rows_read"] == 4


def test_streaming_json_reader_matches_json_load(tmp_path):
    items = [{"i": i, "text": "x" * (i * 997 % 5000), "nested": [1, {"a": "]"}]} for i in range(3000)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(items))  # > 1 MiB: read in several chunks
    assert [item for _, item in iter_rows(str(path))] == items


def test_imported_file_inspects_and_trains(tmp_path, tiny_llama, tokenizer):
    from thumbalign.trainers.config import TrainConfig
    from thumbalign.analysis.inspect_data import inspect_file
    from thumbalign.trainers.policy import train

    out = tmp_path / "out.jsonl"
    run_import("openwebui", [str(FIX / "openwebui_feedback.json")], str(out), Options())
    report = inspect_file(str(out), tokenizer, encoder=None, progress=False)
    assert report["records"] == 3 and report["conflicting_pairs"] == 1
    summary = train(TrainConfig(data=str(out), model=str(tiny_llama), output_dir=str(tmp_path / "run"), max_steps=2,
                                per_device_train_batch_size=2, bf16="false", report=False), log=lambda *a: None)
    assert summary["steps"] == 2
