from thumbalign.data.records import Record
from thumbalign.data.tokens import tokenize_records


def _completion_text(tokenizer, example):
    return tokenizer.decode(example.input_ids[example.prompt_len:])


def test_standard_record_is_prompt_then_completion_and_eos(tokenizer):
    (example,), report = tokenize_records(tokenizer, [Record("Hi there", "Hello!", True)], max_length=64)
    assert tokenizer.decode(example.input_ids[:example.prompt_len]) == "Hi there"
    assert _completion_text(tokenizer, example) == "Hello!<|im_end|>"
    assert example.label is True and report.kept == 1 and report.prompt_truncated == 0


def test_conversational_record_uses_the_chat_template(tokenizer):
    record = Record([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}], False)
    (example,), _ = tokenize_records(tokenizer, [record], max_length=64)
    prompt = tokenizer.decode(example.input_ids[:example.prompt_len])
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert _completion_text(tokenizer, example) == "Yo<|im_end|>\n"


def test_truncation_keeps_the_completion_and_cuts_the_prompt_from_the_left(tokenizer):
    records = [Record("abcdefghij", "XYZ", True), Record("p", "a completion far too long", False),
               Record("ok", "fine", True)]
    examples, report = tokenize_records(tokenizer, records, max_length=8)
    first = examples[0]
    assert len(first.input_ids) == 8
    assert tokenizer.decode(first.input_ids[:first.prompt_len]) == "ghij"  # 8 - len("XYZ" + EOS) = 4: the end of the prompt survives
    assert _completion_text(tokenizer, first) == "XYZ<|im_end|>"
    assert [e.record_index for e in examples] == [0, 2]  # record 1 dropped, and said so
    assert report.prompt_truncated == 1 and report.dropped_completion_too_long == 1 and report.kept == 2
    assert "1 dropped" in report.describe()
