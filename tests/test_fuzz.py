"""Property-based tests of the loaders: whatever bytes or values a file holds, loading ends in records, a one-line
error naming the file, or (with skip_invalid) counted skips — never a traceback, never a silent drop."""

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from thumbalign.data.records import load_records
from thumbalign.errors import DataError

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))

KEYS = ["prompt", "completion", "label", "messages", "chosen", "rejected", "role", "content", "input",
        "preferred_output", "non_preferred_output", "x"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                    st.sampled_from(["", " ", "up", "down", "👍", "1", "-1", "true", "user", "assistant", "robot",
                                     "x" * 5000]),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                      max_leaves=12)
rows = st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=6), values)


def check(path, skip_invalid=False):
    """The property: records, or one clean line naming the file; rows are all accounted for."""
    try:
        records, report = load_records(path, skip_invalid=skip_invalid)
    except DataError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(str(path))
        return
    assert records and all(r.label in (True, False) for r in records)
    made = report.records + sum(report.skipped.values())
    assert report.rows - sum(report.skipped.values()) <= report.records <= 2 * report.rows
    assert made >= report.rows  # every row became a record or a counted skip


@FUZZ
@given(st.lists(rows, min_size=1, max_size=5), st.binary(max_size=30), st.booleans())
def test_jsonl_loader(tmp_path_factory, items, junk, skip):
    path = tmp_path_factory.mktemp("f") / "f.jsonl"
    path.write_bytes(b"\n".join(json.dumps(i).encode() for i in items) + b"\n" + junk)
    check(path, skip_invalid=skip)


@FUZZ
@given(st.one_of(st.lists(rows, max_size=5), values), st.booleans())
def test_json_loader(tmp_path_factory, data, skip):
    path = tmp_path_factory.mktemp("f") / "f.json"
    path.write_text(json.dumps(data))
    check(path, skip_invalid=skip)


@FUZZ
@given(st.lists(st.sampled_from(["prompt", "completion", "label", "messages", "extra"]), min_size=1, max_size=4),
       st.lists(st.lists(st.one_of(st.text(max_size=12), st.sampled_from(["1", "-1", "up", "[{\"role\": 1}]"])),
                         max_size=5), max_size=5),
       st.booleans())
def test_csv_loader(tmp_path_factory, header, body, skip):
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(body)
    path = tmp_path_factory.mktemp("f") / "f.csv"
    path.write_text(buffer.getvalue())
    check(path, skip_invalid=skip)


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["f.jsonl", "f.json", "f.csv"]))
def test_raw_bytes_never_crash(tmp_path_factory, blob, name):
    path = tmp_path_factory.mktemp("f") / name
    path.write_bytes(blob)
    check(path)


@FUZZ
@given(st.lists(st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=10), st.none()),
                                       "completion": st.one_of(st.text(max_size=10), st.none()),
                                       "label": st.one_of(st.booleans(), st.none())}), min_size=1, max_size=6),
       st.booleans())
def test_parquet_loader(tmp_path_factory, items, skip):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("f") / "f.parquet"
    pq.write_table(pa.Table.from_pylist(items), path)
    check(path, skip_invalid=skip)


def test_skip_invalid_counts_rows_by_reason(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"prompt": "p", "completion": "c", "label": true}\n'
                    '{"prompt": "p", "completion": "c", "label": "maybe"}\n'
                    '{"prompt": "p", "completion": "c", "label": "perhaps"}\n'
                    'not json\n'
                    '{"prompt": "p", "label": false}\n')
    records, report = load_records(path, skip_invalid=True)
    assert len(records) == 1 and report.rows == 5
    assert report.skipped == {"label: cannot read … as a label": 2, "row: invalid JSON: Expecting value (column …)": 1,
                              "completion: missing (the row has […, …])": 1}
    with pytest.raises(DataError, match="line 2"):
        load_records(path)
