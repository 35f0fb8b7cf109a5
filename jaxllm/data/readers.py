"""Readers for one local file: plain text, JSON lines, Parquet; gzip-compressed text and JSON lines.

A reader yields raw records with their line (or row) number and reports a small `position` dict from
which a new reader resumes exactly: a byte offset for text (for gzip the offset into the decompressed
stream: seeking there re-reads the compressed bytes before it), a row group and row for Parquet.
`parse_record` turns a raw record into the document text or raises `BadRecord` saying what is wrong.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Iterator, Optional

from jaxllm.config import JaxllmError

_EXTENSIONS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}  # fmt: skip
_SNIFF_BYTES = 8192  # how much of a text file is checked for NUL bytes (binary files)


class RecordError(JaxllmError):
    """A record that was read but whose content a batch format cannot use (raised by a source's `convert`,
    e.g. a conversation without messages); the source reports it with its file and line like a bad record."""


class BadRecord(Exception):
    """One record (or a whole file, line 0) that cannot be read; `number` is its line or row (1-based)."""

    def __init__(self, number: int, problem: str):
        super().__init__(problem)
        self.number = number
        self.problem = problem


def file_format(path: str, format: str) -> str:
    """`text`, `jsonl` or `parquet`: `format` when it names one, else from the extension (a `.gz` is looked through)."""
    if format in ("text", "jsonl", "parquet"):
        return format
    name = path.lower().removesuffix(".gz")
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise JaxllmError(
            f"{path}: cannot tell the file format from the extension {ext or '(none)'!r}; expected one of "
            f"{', '.join(sorted(_EXTENSIONS))} (optionally .gz), or set `format: text|jsonl|parquet` on the source"
        )
    return _EXTENSIONS[ext]


def open_reader(path: str, fmt: str, text_unit: str, text_field: str, position: Optional[dict],
                records: bool = False) -> Any:
    """A reader positioned at `position` (None = the start). Raises BadRecord(0, ...) for an unusable file.
    `records`: Parquet rows are read whole (every column), not only `text_field`."""
    if fmt == "parquet":
        return ParquetReader(path, None if records else text_field, position)
    return TextReader(path, "line" if fmt == "jsonl" else text_unit, position)


def parse_record(raw: Any, fmt: str, text_field: str, number: int) -> str:
    """The text of one raw record: bytes of a text line/paragraph/file, or a JSON line, or a Parquet value."""
    if fmt == "parquet":
        return text_value(raw, text_field, number, "column")
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord(number, f"invalid UTF-8 (byte {e.start} of the record is {raw[e.start]:#04x})") from None
    if fmt == "text":
        return line
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        problem = f"invalid JSON ({e.msg}: column {e.colno}); expected one JSON object per line"
        raise BadRecord(number, problem) from None
    if not isinstance(obj, dict):
        raise BadRecord(number, f"expected a JSON object with a {text_field!r} field, got a {type(obj).__name__}")
    if text_field not in obj:
        fields = ", ".join(map(repr, list(obj)[:8])) or "none"
        raise BadRecord(number, f"no {text_field!r} field (fields: {fields}); set text_field if another holds the text")
    return text_value(obj[text_field], text_field, number, "field")


def parse_object(raw: Any, fmt: str, text_field: str, number: int) -> dict[str, Any]:
    """The whole record of one raw record: a JSON line's object, a Parquet row (every column), or
    `{text_field: text}` for plain text."""
    if fmt == "parquet":
        return raw
    if fmt == "text":
        return {text_field: parse_record(raw, fmt, text_field, number)}
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRecord(number, f"invalid UTF-8 (byte {e.start} of the record is {raw[e.start]:#04x})") from None
    except json.JSONDecodeError as e:
        raise BadRecord(number, f"invalid JSON ({e.msg}: column {e.colno}); expected one JSON object per line") from None
    if not isinstance(obj, dict):
        raise BadRecord(number, f"expected a JSON object, got a {type(obj).__name__}")
    return obj


def text_value(value: Any, text_field: str, number: int, kind: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord(number, f"{kind} {text_field!r} is not valid UTF-8 (at byte {e.start})") from None
    raise BadRecord(number, f"{kind} {text_field!r} holds {type(value).__name__} {value!r:.40}, expected a string")


class TextReader:
    """Lines, blank-line-separated paragraphs, or the whole file, as bytes; gzip detected by its magic bytes."""

    def __init__(self, path: str, unit: str, position: Optional[dict]):
        self.path, self._unit = path, unit
        self._offset = position["offset"] if position else 0
        self._line = position["line"] if position else 0  # lines consumed so far
        raw = open(path, "rb")  # noqa: SIM115 (closed in close())
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        self._file = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        self._raw = raw
        try:
            if self._offset == 0:
                head = self._file.read(_SNIFF_BYTES)
                if not head:
                    raise BadRecord(0, "the file is empty")
                if b"\0" in head:
                    raise BadRecord(0, "the file looks binary (it holds NUL bytes), expected UTF-8 text")
            self._file.seek(self._offset)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            self.close()
            raise BadRecord(0, f"cannot be read ({e})") from None
        except BadRecord:
            self.close()
            raise

    @property
    def position(self) -> dict:
        return {"offset": self._offset, "line": self._line}

    def locate(self, number: int) -> str:
        return f"{self.path}:{number}"

    def _readline(self) -> bytes:
        try:
            line = self._file.readline()
        except (OSError, EOFError) as e:  # e.g. a truncated gzip file: the rest of the file is lost
            raise BadRecord(self._line + 1, f"the file cannot be read from here on ({e})") from None
        self._offset += len(line)
        self._line += 1 if line else 0
        return line

    def read(self) -> Optional[tuple[int, bytes]]:
        """(line number of the record's first line, record bytes without the final newline), or None at the end."""
        if self._unit == "file":
            if self._offset > 0:
                return None
            data = self._file.read()
            self._offset, self._line = max(len(data), 1), data.count(b"\n") + 1
            return 1, data
        lines: list[bytes] = []
        first = 0
        while True:
            line = self._readline()
            blank = not line.strip()
            if not line or (blank and lines):  # a paragraph ends at a blank line or the end of the file
                break
            if blank:
                continue  # blank lines carry no document
            lines.append(line)
            first = first or self._line
            if self._unit == "line":
                break
        if not lines:
            return None
        return first, b"".join(lines).rstrip(b"\r\n")

    def close(self) -> None:
        self._file.close()
        self._raw.close()


class ParquetReader:
    """Values of one column (`text_field`), or whole rows as dicts (`text_field=None`), read one row group at
    a time (never the whole file)."""

    def __init__(self, path: str, text_field: Optional[str], position: Optional[dict]):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise JaxllmError(f"{path}: reading Parquet needs pyarrow; pip install 'jaxllm[data]'") from None
        self.path, self._field = path, text_field
        try:
            self._file = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for files that are not Parquet
            raise BadRecord(0, f"not a readable Parquet file ({e})") from None
        names = self._file.schema_arrow.names
        if text_field is not None and text_field not in names:
            raise BadRecord(0, f"no column {text_field!r} (columns: {', '.join(names[:8])}); set text_field")
        meta = self._file.metadata
        self._starts = [0]  # first row number of each row group, for messages
        for g in range(meta.num_row_groups):
            self._starts.append(self._starts[-1] + meta.row_group(g).num_rows)
        self._group = position["row_group"] if position else 0
        self._row = position["row"] if position else 0
        self._values: Optional[list] = None

    @property
    def position(self) -> dict:
        return {"row_group": self._group, "row": self._row}

    def locate(self, number: int) -> str:
        return f"{self.path}: row {number}"

    def read(self) -> Optional[tuple[int, Any]]:
        while self._group < len(self._starts) - 1:
            if self._values is None:
                if self._field is None:
                    self._values = self._file.read_row_group(self._group).to_pylist()
                else:
                    self._values = self._file.read_row_group(self._group, columns=[self._field]).column(0).to_pylist()
            if self._row < len(self._values):
                self._row += 1
                return self._starts[self._group] + self._row, self._values[self._row - 1]
            self._group, self._row, self._values = self._group + 1, 0, None
        return None

    def close(self) -> None:
        self._file.close()


def json_objects(path: str | Path, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a jsonl file (gzipped when it ends in .gz), for the
    commands that read a whole file of records (`jaxllm judge`, `jaxllm score`): a missing file, a line that is
    not JSON or not an object are one-line JaxllmErrors naming file:line; `what` says what the file should hold."""
    if not Path(path).is_file():
        raise JaxllmError(f"--data {path} does not exist; give a jsonl file of {what}")
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise JaxllmError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise JaxllmError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            yield number, record
