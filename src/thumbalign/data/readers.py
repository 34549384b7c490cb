"""Where a file becomes rows: JSONL, JSON, CSV/TSV, Parquet, or a folder written by ``datasets.save_to_disk``.

Each row comes with where it was found ("line N", "item N", "row N"), so that every later error can name the file,
the place and the field. Every format is streamed — JSON lists and pages through ijson, Parquet by record batches,
datasets folders by memory-mapped batches — so a large file is never held in memory at once.

A Hugging Face Hub dataset id (owner/name) is read through the datasets library (downloaded once into its cache,
memory-mapped; HF_HOME and HF_HUB_OFFLINE apply), with a config and a split. Columns named otherwise than prompt,
completion and label can be mapped (`Source.fields`), for files and Hub datasets alike.

Text files may be UTF-8 (with or without a byte-order mark, as Excel writes it) or UTF-16/UTF-32 with a byte-order
mark; anything that does not decode is one error naming the file and the byte offset. In CSV, a cell that holds a
JSON list of messages is read as a conversation. A JSON file may hold a list of records, one record (an object
with record fields), or an API page: an object whose one list holds the records ({"data": [...]}).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

# the longest byte-order marks first: UTF-32-LE's starts with UTF-16-LE's
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                    (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
RECORD_FIELDS = {"prompt", "completion", "label", "chosen", "rejected", "preferred_output", "non_preferred_output"}
CHUNK = 1 << 20
# deeper JSON nesting is refused: no feedback record needs it, and parsers' memory grows with the depth
MAX_JSON_DEPTH = 256
TOO_DEEP = f"nested deeper than {MAX_JSON_DEPTH} levels; no feedback record is (the limit keeps memory bounded)"
# JSON may escape half of a UTF-16 surrogate pair on its own ("\ud800"): json.loads returns a str that no tokenizer
# or UTF-8 file takes. Only text holding such an escape is searched for one.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq")


@dataclass(frozen=True)
class Source:
    """Where rows come from: a local file or folder, or a Hub dataset with its config and split; `fields` renames
    columns to the names thumbalign reads ((thumbalign name, column name) pairs, e.g. ("prompt", "question"))."""

    path: str
    config: str | None = None
    split: str = "train"
    fields: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        if is_hub_dataset(self.path):
            return self.path + (f" ({self.config})" if self.config else "") + f" [{self.split}]"
        return self.path


def is_hub_dataset(path: str) -> bool:
    """owner/name that is not a local file or folder and does not end like a data file."""
    return (not Path(path).exists() and bool(HUB_DATASET_ID.fullmatch(str(path)))
            and not str(path).lower().endswith(FILE_SUFFIXES))


def iter_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, row) from a data file; `where` is "line N" or "row N" for error messages. Stops with a
    :class:`DataError` at the first unreadable row."""
    for where, row in iter_raw_rows(path):
        if isinstance(row, DataError):
            raise row
        yield where, row


def iter_raw_rows(source: str | Path | Source) -> Iterator[tuple[str, Any]]:
    """Like :func:`iter_rows`, but a row that cannot be read (broken JSON, bad UTF-8) comes back as its
    :class:`DataError` instead of ending the file, so that callers may count and skip it."""
    source = source if isinstance(source, Source) else Source(str(source))
    rename = {column: name for name, column in source.fields if column != name}
    replaced = set(rename.values())  # a column of the thumbalign name is dropped when another is mapped onto it
    for where, row in _iter_source(source):
        if rename and isinstance(row, dict):
            row = {rename.get(key, key): value for key, value in row.items() if key in rename or key not in replaced}
        yield where, row


def _iter_source(source: Source) -> Iterator[tuple[str, Any]]:
    if is_hub_dataset(source.path):
        yield from _iter_hub_dataset(source)
        return
    path = Path(source.path)
    if not path.exists():
        raise DataError(path, None, None, "no such file or folder")
    if path.is_dir():
        yield from _iter_saved_dataset(path)
        return
    if not path.is_file():  # a FIFO, socket or device: opening one would wait for a writer that never comes
        raise DataError(path, None, None, "not a regular file (a pipe, socket or device); give a data file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(path)
        elif suffix == ".json":
            yield from _iter_json(path)
        elif suffix in (".csv", ".tsv"):
            yield from _iter_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
        elif suffix in (".parquet", ".pq"):
            yield from _iter_parquet(path)
        else:
            raise DataError(path, None, None,
                            f"unknown file type {suffix!r}; use .jsonl, .json, .csv, .parquet or a datasets folder")
    except OSError as err:  # unreadable: permissions, a folder named like a file, a vanished file
        raise DataError(path, None, None, f"cannot read: {err.strerror or err}") from None


# ------------------------------------------------------------------------------------------------- text

def detect_encoding(path: Path) -> tuple[str, int]:
    """(encoding, length of its byte-order mark): a BOM decides; without one, UTF-8."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    for mark, encoding in BYTE_ORDER_MARKS:
        if head.startswith(mark):
            return encoding, len(mark)
    return "utf-8", 0


def iter_text(path: Path) -> Iterator[str]:
    """The file's text, decoded in chunks; a byte sequence that does not decode is a DataError at its offset."""
    encoding, skip = detect_encoding(path)
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    name = encoding.upper().replace("-LE", "").replace("-BE", "")
    offset = skip
    with open(path, "rb") as handle:
        handle.seek(skip)
        while True:
            chunk = handle.read(CHUNK)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:  # err.start counts from the bytes the decoder still held back
                at = max(offset + err.start - len(decoder.getstate()[0]), 0)
                raise DataError(path, None, None, f"not valid {name} ({err.reason} at byte {at})") from None
            offset += len(chunk)
            if text:
                yield text
            if not chunk:
                return


def iter_lines(path: Path) -> Iterator[str]:
    """The file's lines, split at "\\n" only and with their endings ("\\r\\n" stays whole, and the other Unicode line
    breaks stay inside their line, as the csv module expects of a file opened with newline="")."""
    pending = ""
    for text in iter_text(path):
        *lines, pending = (pending + text).split("\n")
        for line in lines:
            yield line + "\n"
    if pending:
        yield pending


class Utf8Reader(io.RawIOBase):
    """A binary stream of a text file's content as UTF-8, whatever its encoding (what ijson reads)."""

    def __init__(self, path: Path):
        self.chunks, self.buffer = (t.encode("utf-8") for t in iter_text(path)), b""

    def readable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        while len(self.buffer) < len(target):
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        n = min(len(target), len(self.buffer))
        target[:n], self.buffer = self.buffer[:n], self.buffer[n:]
        return n


# ------------------------------------------------------------------------------------------------- formats

def _iter_jsonl(path: Path):
    encoding, skip = detect_encoding(path)
    if encoding != "utf-8":  # UTF-16/32: decode the stream; a line cannot be told apart from its bytes
        for number, line in enumerate(iter_lines(path), start=1):
            yield from _json_line(path, number, line)
        return
    with open(path, "rb") as handle:  # UTF-8: line by line, so that one undecodable line can be skipped
        handle.seek(skip)
        offset = skip
        for number, raw in enumerate(handle, start=1):
            where = f"line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                reason = f"not valid UTF-8 ({err.reason} at byte {offset + err.start})"
                yield where, DataError(path, where, None, reason)
            else:
                yield from _json_line(path, number, line)
            offset += len(raw)


def _json_line(path: Path, number: int, line: str):
    where = f"line {number}"
    if not line.strip():
        return
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        yield where, DataError(path, where, None, f"invalid JSON: {err.msg} (column {err.colno})")
    except RecursionError:
        yield where, DataError(path, where, None, TOO_DEEP)
    except ValueError:  # json refuses integers longer than Python converts (a denial-of-service guard)
        yield where, DataError(path, where, None, f"invalid JSON: a number longer than "
                                                  f"{sys.get_int_max_str_digits()} digits")
    else:
        yield where, _checked(path, where, line, row)


def _checked(path: Path, where: str, text: str, value, field: str = ""):
    """The value parsed from `text` (the whole row, or the cell of column `field`), or the DataError that refuses
    it: nested deeper than the .json reader allows (whatever Python's recursion limit lets json.loads reach), or
    holding a lone surrogate. `text` only decides whether the value needs a look, so that ordinary rows cost
    nothing."""
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        return DataError(path, where, field or None, TOO_DEEP)
    field = _lone_surrogate(value, field) if SURROGATE_ESCAPE.search(text) else None
    if field is not None:
        return DataError(path, where, field or None, "holds half of a UTF-16 surrogate pair without its other half (a "
                                             "\\uD800-\\uDFFF escape), which is not text; remove or repair it")
    return value


def _children(value, name: str):
    if isinstance(value, dict):
        return [(f"{name}.{key}" if name else str(key), child) for key, child in value.items()]
    if isinstance(value, list):
        return [(f"{name}[{i}]", child) for i, child in enumerate(value)]
    return []


def _deeper_than(value, limit: int) -> bool:
    stack = [(value, 1)]  # a stack, not recursion: the value may be nested as deep as the recursion limit
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _lone_surrogate(value, root: str) -> str | None:
    """Where in the value (e.g. "prompt", "messages[1].content") a string or key holds a lone surrogate."""
    stack = [(root, value)]
    while stack:
        name, item = stack.pop()
        keys = [key for key in item if isinstance(key, str)] if isinstance(item, dict) else []
        if any(LONE_SURROGATE.search(key) for key in keys) or (isinstance(item, str) and LONE_SURROGATE.search(item)):
            return name  # "" for the row itself
        stack.extend(reversed(_children(item, name)))
    return None


def _iter_json(path: Path):
    """A list of records, one record, or a page holding one list; items are parsed one at a time (ijson)."""
    import ijson

    try:
        shape, key = _json_shape(path)
        if shape == "record":
            with Utf8Reader(path) as stream:
                yield "item 0", next(ijson.items(stream, "", use_float=True))
            return
        prefix = "item" if shape == "list" else f"{key}.item"
        with Utf8Reader(path) as stream:
            for index, row in enumerate(ijson.items(stream, prefix, use_float=True)):
                yield f"item {index}", row
    except ijson.JSONError as err:
        raise DataError(path, None, None, f"invalid JSON: {_first_line(err)}") from None
    except RecursionError:
        raise DataError(path, None, None, "invalid JSON: nested too deep") from None


def _first_line(err: Exception) -> str:
    """The parser's own message, without the excerpt and caret it draws on the lines after."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0].strip()


def _json_shape(path: Path) -> tuple[str, str | None]:
    """("list", None), ("record", None) or ("page", the key of its list), from one pass over the whole file that
    also bounds its nesting (ijson's item parser keeps a path per level: memory grows with the square of the
    depth, 21 GB for 200 KB of brackets)."""
    import ijson

    with Utf8Reader(path) as stream:
        events = ijson.basic_parse(stream, use_float=True)
        first = next(events, None)
        if first is None:
            raise DataError(path, None, None, "is empty")
        if first[0] not in ("start_array", "start_map"):
            raise DataError(path, None, None, "expected a JSON list of records (or one record, or an object "
                                              "holding one list)")
        depth, key, keys, lists, items = 1, None, set(), [], 0
        for event, value in events:
            if event in ("start_map", "start_array"):
                if depth == 1 and first[0] == "start_map" and event == "start_array":
                    lists.append(key)
                items += depth == 1
                depth += 1
                if depth > MAX_JSON_DEPTH:
                    where = f"item {items - 1}" if first[0] == "start_array" else None
                    raise DataError(path, where, None, TOO_DEEP)
            elif event in ("end_map", "end_array"):
                depth -= 1
            elif depth == 1 and event == "map_key":
                key = value
                keys.add(value)
            else:
                items += depth == 1
    if first[0] == "start_array":
        return "list", None
    if keys & RECORD_FIELDS or {"messages", "label"} <= keys:
        return "record", None
    if len(lists) != 1:
        raise DataError(path, None, None, "expected a JSON list of records, one record, or an object holding one "
                                          f"list (this object holds {len(lists)} lists: {sorted(lists)[:5]})")
    return "page", lists[0]


def _iter_csv(path: Path, delimiter: str):
    try:
        reader = csv.DictReader(iter_lines(path), delimiter=delimiter)
        for row in reader:
            # reader.line_num is the physical line where this row ended (the header is line 1)
            where = f"line {reader.line_num}"
            if None in row:
                yield where, DataError(path, where, None, "more cells than the header has columns")
                continue
            cells = {k: _maybe_json_cell(v) for k, v in row.items()}
            refused = [error for k, v in cells.items() if v is not row[k]  # the cells parsed as JSON
                       for error in [_checked(path, where, row[k], v, k)] if isinstance(error, DataError)]
            yield where, refused[0] if refused else cells
    except csv.Error as err:
        raise DataError(path, None, None, f"invalid CSV: {err}") from None


def _maybe_json_cell(value):
    """A CSV cell that holds a JSON list (a conversation) is parsed; everything else (also what json refuses: a
    broken list, one nested too deep, a number too long) stays text."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value



def _iter_parquet(path: Path, batch_size: int = 1024):
    """Row group by row group, in batches, handing freed Arrow memory back after each group: memory stays near one
    row group's, whatever the file's size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        index = 0
        for group in range(parquet.metadata.num_row_groups):
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group], use_threads=False):
                for row in batch.to_pylist():
                    yield f"row {index}", row
                    index += 1
            pa.default_memory_pool().release_unused()
    except DataError:
        raise
    except Exception as err:  # pyarrow raises several types for broken files
        raise DataError(path, None, None, f"cannot read Parquet: {_first_line(err)}") from None


def load_hub_dataset(source: Source):
    """The split of a Hub dataset, through the datasets library's own cache (downloaded the first time)."""
    import datasets
    from huggingface_hub.errors import HfHubHTTPError

    where = str(source)
    try:
        return datasets.load_dataset(source.path, source.config, split=source.split)
    except datasets.exceptions.DatasetNotFoundError:
        raise DataError(where, None, None, "no such file or folder, nor a dataset on the Hub (a private one needs "
                                           "`hf auth login`)") from None
    except (ConnectionError, OSError, HfHubHTTPError) as err:
        raise DataError(where, None, None, "not in the datasets cache and the Hub cannot be reached (HF_HUB_OFFLINE "
                                           f"is set, or there is no network): {_first_line(err)}") from None
    except ValueError as err:  # an unknown split or config
        raise DataError(where, None, None, _first_line(err)) from None


def _iter_hub_dataset(source: Source, batch_size: int = 1024):
    yield from _iter_dataset(load_hub_dataset(source), batch_size)


def _iter_dataset(ds, batch_size: int):
    index = 0
    for batch in ds.iter(batch_size=batch_size):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield f"row {index}", dict(zip(columns, values))
            index += 1


def _iter_saved_dataset(path: Path, batch_size: int = 1024):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: rows are read as they are iterated
    except Exception as err:
        raise DataError(path, None, None, f"not a folder written by datasets.save_to_disk: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(path, None, None, f"a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    yield from _iter_dataset(ds, batch_size)
