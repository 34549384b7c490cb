import json

import pytest

from conftest import write_jsonl
from thumbalign.data.records import load_records, parse_label, require_both_labels
from thumbalign.errors import DataError

USER = [{"role": "user", "content": "hi"}]
BOT = [{"role": "assistant", "content": "hello!"}]


def test_unpaired_standard_and_conversational(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [
        {"prompt": "2+2?", "completion": "4", "label": True},
        {"prompt": USER, "completion": BOT, "label": "👎"},
    ])
    records, report = load_records(path)
    assert [(r.prompt, r.completion, r.label) for r in records] == [("2+2?", "4", True), (USER, BOT, False)]
    assert records[1].conversational and not records[0].conversational
    assert report.rows == 2 and report.by_label[True] == 1 and report.by_label[False] == 1


def test_messages_with_label_last_assistant_turn_is_completion(tmp_path):
    messages = [{"role": "system", "content": "be nice"}, *USER, *BOT, {"role": "user", "content": "more"},
                {"role": "assistant", "content": "sure"}]
    records, _ = load_records(write_jsonl(tmp_path / "f.jsonl", [{"messages": messages, "label": 1}]))
    assert records[0].prompt == messages[:4]
    assert records[0].completion == [{"role": "assistant", "content": "sure"}]
    assert records[0].label is True


def test_paired_rows_split_into_up_and_down(tmp_path):
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"},
            {"chosen": USER + BOT, "rejected": USER + [{"role": "assistant", "content": "meh"}]}]
    records, report = load_records(write_jsonl(tmp_path / "f.jsonl", rows))
    assert [(r.prompt, r.completion, r.label) for r in records[:2]] == [("p", "good", True), ("p", "bad", False)]
    assert records[2].prompt == USER and records[2].completion == BOT and records[2].label
    assert records[3].completion[0]["content"] == "meh" and not records[3].label
    assert report.pairs_split == 2 and report.records == 4


def test_openai_preference_format(tmp_path):
    row = {"input": {"messages": USER}, "preferred_output": BOT,
           "non_preferred_output": [{"role": "assistant", "content": "go away"}]}
    records, _ = load_records(write_jsonl(tmp_path / "f.jsonl", [row]))
    assert [r.label for r in records] == [True, False]
    assert records[1].completion[0]["content"] == "go away" and records[0].prompt == USER


def test_json_csv_parquet_and_datasets_folder(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": False}]
    (tmp_path / "f.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "f.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    conv = [{"prompt": json.dumps(USER), "completion": json.dumps(BOT), "label": "up"},
            {"prompt": "plain", "completion": "text", "label": "-1"}]
    pd.DataFrame(conv).to_csv(tmp_path / "f.csv", index=False)
    for name in ("f.json", "f.parquet", "ds"):
        records, _ = load_records(tmp_path / name)
        assert [(r.prompt, r.completion, r.label) for r in records] == [("a", "b", True), ("c", "d", False)], name
    records, _ = load_records(tmp_path / "f.csv")
    assert records[0].prompt == USER and records[0].label is True
    assert records[1].prompt == "plain" and records[1].label is False


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False), (-1, False), ("1", True), ("-1", False), ("0", False),
    ("true", True), ("True", True), ("FALSE", False), ("up", True), ("down", False), ("👍", True), ("👎", False),
])
def test_label_spellings(value, expected):
    assert parse_label(value, "f.jsonl", "line 1") is expected


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, "", None, [1], {"a": 1}])
def test_other_labels_are_errors(value):
    with pytest.raises(DataError, match=r"f\.jsonl, line 7: field 'label': cannot read"):
        parse_label(value, "f.jsonl", "line 7")


def _error(tmp_path, text: str, name="bad.jsonl") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    with pytest.raises(DataError) as info:
        load_records(path)
    return str(info.value)


GOOD = json.dumps({"prompt": "p", "completion": "c", "label": True})


@pytest.mark.parametrize("line2,where,field", [
    ('{"prompt": "p", "completion": "c"', "line 2", None),                                  # broken JSON
    ('{"prompt": "p", "completion": "c"}', "line 2", "label"),                              # missing label
    ('{"prompt": "p", "label": true}', "line 2", "completion"),                             # missing completion
    ('{"prompt": "p", "completion": "  ", "label": true}', "line 2", "completion"),          # empty completion
    ('{"prompt": 3, "completion": "c", "label": true}', "line 2", "prompt"),                # wrong type
    ('{"prompt": [{"role": "robot", "content": "x"}], "completion": [{"role": "assistant", "content": "y"}], '
     '"label": 1}', "line 2", "prompt[0].role"),                                            # unknown role
    ('{"prompt": [{"role": "user", "content": 5}], "completion": [{"role": "assistant", "content": "y"}], '
     '"label": 1}', "line 2", "prompt[0].content"),                                         # content not text
    ('{"prompt": [{"role": "user", "content": "x"}], "completion": "y", "label": 1}', "line 2", "completion"),
    ('{"messages": [{"role": "user", "content": "x"}], "label": 1}', "line 2", "messages"),  # no assistant turn
    ('["not", "an", "object"]', "line 2", None),
    ('{"prompt": "p", "chosen": "c"}', "line 2", "rejected"),                               # half a pair
    ('{"prompt": "p", "completion": "c", "label": "sure"}', "line 2", "label"),
])
def test_loader_errors_name_file_line_and_field(tmp_path, line2, where, field):
    message = _error(tmp_path, GOOD + "\n" + line2 + "\n")
    assert message.startswith(f"{tmp_path / 'bad.jsonl'}, {where}: ")
    if field:
        assert f"field '{field}'" in message


def test_invalid_utf8_and_unknown_type_and_missing_file(tmp_path):
    assert "line 2" in _error(tmp_path, GOOD.encode() + b"\n\xff\xfe\n") and "UTF-8" in _error(
        tmp_path, GOOD.encode() + b"\n\xff\xfe\n")
    assert "unknown file type '.txt'" in _error(tmp_path, GOOD, name="f.txt")
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    assert "holds no records" in _error(tmp_path, "\n\n")


def test_csv_errors_point_at_the_physical_line(tmp_path):
    text = "prompt,completion,label\na,b,1\nc,d,perhaps\n"
    message = _error(tmp_path, text, name="f.csv")
    assert "f.csv, line 3: field 'label'" in message
    assert "more cells" in _error(tmp_path, "prompt,completion,label\na,b,1,extra\n", name="g.csv")


def test_one_class_file_is_an_error_for_bco_with_counts(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "p", "completion": "c", "label": True}] * 3)
    _, report = load_records(path)
    with pytest.raises(DataError, match="found 3 up and 0 down"):
        require_both_labels(report)


def test_a_role_that_is_not_text_is_a_one_line_error(tmp_path):
    """Found by the fuzzer: a list as a message's role used to raise TypeError (unhashable) instead of an error."""
    path = write_jsonl(tmp_path / "f.jsonl", [{"prompt": "p", "chosen": [{"role": [], "content": "x"}],
                                              "rejected": "r"}])
    with pytest.raises(DataError, match=r"line 1: field 'chosen\[0\]\.role': unknown role \[\]"):
        load_records(path)
