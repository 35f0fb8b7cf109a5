"""Documents in and out of the data-preparation stages: planning inputs into shards, reading one shard as
documents, and writing one output shard atomically.

A document is a dict holding every field of its input record; its text is in `text_field` and its id in
`id_field`: kept when the record has one, else "<input file's relative name>:<line or row number>" (relative to
the directory the inputs share; `hf:NAME:<row>` for a Hugging Face dataset). Inputs are the training loader's
(jaxllm.data.readers / sources): a file, a glob or a comma-separated list of them (jsonl(.gz), parquet, text
(.gz), one document a line), `builtin:NAME`, or `hf:NAME_OR_DIR`. A record that cannot be read is reported with
its file and line and skipped (counted) or, with `on_bad_record="error"`, stops the run.

A `Shard` is the unit of work of the engines: one input file, or a byte range of a large uncompressed jsonl/text
file (split at line ends), or a range of row groups of a large Parquet file. Shards are planned from the inputs
and `chunk_bytes` alone, never from the number of workers, so the output layout does not depend on it.
Compressed files are one shard each (they cannot be entered in the middle): write large corpora as many files.
"""

from __future__ import annotations

import datetime
import decimal
import gzip
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from jaxllm.config import JaxllmError
from jaxllm.data import readers
from jaxllm.utils import atomic_write_bytes

OUTPUT_FORMATS = ("jsonl.gz", "parquet")
DEFAULT_CHUNK_BYTES = 256 << 20  # uncompressed jsonl/text files above this are split into ranges of about this
_BLOCK = 16 << 20  # read size when planning the ranges of a large file
_PARQUET_ROWS = 1000  # rows per Parquet row group written


@dataclass(frozen=True)
class Shard:
    """One unit of input: `path` (a file, or `hf:TARGET`) read as `fmt`; `name` its relative name used in ids;
    a byte range [start, stop) starting at line `line` (text/jsonl), or row groups [start, stop) (parquet);
    stop None = to the end."""

    path: str
    fmt: str  # text | jsonl | parquet | hf
    name: str
    start: int = 0
    stop: Optional[int] = None
    line: int = 0  # lines before `start` (text/jsonl ranges): ids keep the file's own line numbers
    stop_line: Optional[int] = None  # lines before `stop`: a record starting after it is the next range's
    records: tuple[int, Optional[int]] = (0, None)  # a builtin corpus' record range [start, stop)

    def describe(self) -> str:
        if self.stop is None and self.start == 0:
            return self.name
        unit = "row groups" if self.fmt == "parquet" else "bytes"
        return f"{self.name} ({unit} {self.start}..{'end' if self.stop is None else self.stop})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def plan_shards(inputs: str, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, fmt: str = "auto") -> list[Shard]:
    """The shards of `inputs` in input order (files sorted as the training loader sorts them)."""
    if chunk_bytes < 1:
        raise JaxllmError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
    inputs = inputs.strip()
    kind, _, rest = inputs.partition(":")
    if kind == "hf":
        return [Shard(inputs, "hf", inputs)]
    from jaxllm.data import ASSETS, sources  # sources imports grain: only the planning process pays for it

    if kind == "builtin":
        corpus = sources.builtin_corpus(rest)
        return [Shard(str(ASSETS / corpus.file), "jsonl", inputs, records=(corpus.start, corpus.stop))]
    files = sources.expand_paths(inputs)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    shards: list[Shard] = []
    for path in files:
        name = os.path.relpath(os.path.abspath(path), root)
        file_fmt = readers.file_format(path, "" if fmt == "auto" else fmt)
        shards.extend(_split(path, file_fmt, name, chunk_bytes))
    return shards


def _split(path: str, fmt: str, name: str, chunk_bytes: int) -> list[Shard]:
    size = os.path.getsize(path)
    if size <= chunk_bytes:
        return [Shard(path, fmt, name)]
    if fmt == "parquet":
        return _split_parquet(path, name, chunk_bytes)
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return [Shard(path, fmt, name)]  # gzip: one shard (module docstring)
    ranges, start, line = [], 0, 0
    with open(path, "rb") as f:
        while True:
            target = start + chunk_bytes
            stop = size
            if target < size:
                f.seek(target)
                stop = target + len(f.readline())  # the end of the line holding byte `target`
            if stop >= size:  # the last range reads to the end (a last line may lack its newline)
                ranges.append(Shard(path, fmt, name, start, None, line, None))
                return ranges
            lines = _count_lines(f, start, stop)
            ranges.append(Shard(path, fmt, name, start, stop, line, line + lines))
            start, line = stop, line + lines


def _count_lines(f, start: int, stop: int) -> int:
    f.seek(start)
    count, left = 0, stop - start
    while left > 0:
        block = f.read(min(_BLOCK, left))
        if not block:
            break
        count += block.count(b"\n")
        left -= len(block)
    return count


def _split_parquet(path: str, name: str, chunk_bytes: int) -> list[Shard]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception:  # an unreadable file is reported by the reader as a bad record of its shard
        return [Shard(path, "parquet", name)]
    shards, start, size = [], 0, 0
    for group in range(meta.num_row_groups):
        size += meta.row_group(group).total_byte_size
        if size >= chunk_bytes and group + 1 < meta.num_row_groups:
            shards.append(Shard(path, "parquet", name, start, group + 1))
            start, size = group + 1, 0
    shards.append(Shard(path, "parquet", name, start, None))
    return shards if len(shards) > 1 else [Shard(path, "parquet", name)]


class BadRecords:
    """The bad-record policy of a run: `error` raises naming file:line; `skip` counts and keeps the first few
    messages (the stats list them)."""

    def __init__(self, policy: str, keep: int = 20):
        if policy not in ("skip", "error"):
            raise JaxllmError(f"on_bad_record must be skip or error, got {policy!r}")
        self.policy, self.keep = policy, keep
        self.count = 0
        self.examples: list[str] = []

    def __call__(self, where: str, problem: str) -> None:
        if self.policy == "error":
            raise JaxllmError(f"{where}: {problem}; fix it or use --on-bad-record skip")
        self.count += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {problem}")


def read_shard(shard: Shard, *, text_field: str = "text", id_field: str = "id",
               bad: Optional[Callable[[str, str], None]] = None) -> Iterator[dict]:
    """The documents of one shard, in order, streaming (one record in memory at a time)."""
    bad = bad or BadRecords("skip")
    if shard.fmt == "hf":
        yield from _read_hf(shard, text_field, id_field, bad)
        return
    position = None
    if shard.start:
        position = {"row_group": shard.start, "row": 0} if shard.fmt == "parquet" else \
            {"offset": shard.start, "line": shard.line}
    try:
        reader = readers.open_reader(shard.path, shard.fmt, "line", text_field, position, records=True)
    except readers.BadRecord as e:
        bad(shard.path, e.problem)
        return
    except OSError as e:
        raise JaxllmError(f"{shard.path}: cannot open ({e.strerror or e}); check that it exists and is readable") from None
    first, last = shard.records
    index = 0
    try:
        while True:
            try:
                record = reader.read()
            except readers.BadRecord as e:  # the rest of the file is unreadable
                bad(reader.locate(e.number), e.problem)
                return
            if record is None:
                return
            number, raw = record
            if shard.stop is not None and (reader.position["row_group"] >= shard.stop if shard.fmt == "parquet"
                                           else number > shard.stop_line):
                return  # the first record of the next range
            index += 1
            if index <= first:
                continue
            if last is not None and index > last:
                return
            try:
                doc = _document(raw, shard.fmt, text_field, number)
            except readers.BadRecord as e:
                bad(reader.locate(e.number), e.problem)
                continue
            if id_field not in doc:
                doc[id_field] = f"{shard.name}:{number}"
            yield doc
    finally:
        reader.close()


def _document(raw: Any, fmt: str, text_field: str, number: int) -> dict:
    doc = readers.parse_object(raw, fmt, text_field, number)
    if fmt == "parquet":
        doc = dict(doc)
    if text_field not in doc:
        fields = ", ".join(map(repr, list(doc)[:8])) or "none"
        raise readers.BadRecord(number, f"no {text_field!r} field (fields: {fields}); set --text-field")
    doc[text_field] = readers.text_value(doc[text_field], text_field, number, "field")
    return doc


def _read_hf(shard: Shard, text_field: str, id_field: str, bad: Callable[[str, str], None]) -> Iterator[dict]:
    from jaxllm.config import SourceConfig
    from jaxllm.data.hub_sources import load_hf_dataset

    target = shard.path.removeprefix("hf:")
    ds = load_hf_dataset(target, SourceConfig(path=shard.path, text_field=text_field), 0, 1, records=True)
    for number, row in enumerate(ds, 1):
        try:
            doc = _document(row, "parquet", text_field, number)
        except readers.BadRecord as e:
            bad(f"{shard.path}: row {e.number}", e.problem)
            continue
        if id_field not in doc:
            doc[id_field] = f"{shard.name}:{number}"
        yield doc


def iter_documents(inputs: str, *, text_field: str = "text", id_field: str = "id", on_bad_record: str = "skip",
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[tuple[str, dict]]:
    """(shard name, document) of every input document, in input order."""
    bad = BadRecords(on_bad_record)
    for shard in plan_shards(inputs, chunk_bytes=chunk_bytes):
        for doc in read_shard(shard, text_field=text_field, id_field=id_field, bad=bad):
            yield shard.name, doc


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime.date, datetime.time, decimal.Decimal)):
        return str(value)
    raise TypeError(f"a {type(value).__name__} value cannot be written as JSON; write Parquet (--format parquet)")


def encode_json(doc: dict) -> bytes:
    """One jsonl line of a document (UTF-8, no ASCII escaping, keys in the document's own order)."""
    try:
        return json.dumps(doc, ensure_ascii=False, default=_json_default).encode() + b"\n"
    except (TypeError, ValueError) as e:
        raise JaxllmError(f"document {doc.get('id', '?')!r}: {e}") from None


class ShardWriter:
    """Writes the documents of one output shard to a temporary file beside `path`, streaming, and moves it into
    place on `commit()` (readers see no shard or the whole one). jsonl.gz is deterministic (gzip mtime 0, no
    file name in the header); Parquet takes its schema from the first rows and refuses later new fields."""

    def __init__(self, path: str | Path, fmt: str = "jsonl.gz"):
        if fmt not in OUTPUT_FORMATS:
            raise JaxllmError(f"output format {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        self.path, self.fmt = Path(path), fmt
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file = open(self._tmp, "wb")  # noqa: SIM115 (closed in commit/abort)
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, compresslevel=6, mtime=0) \
            if fmt == "jsonl.gz" else None
        self._rows: list[dict] = []
        self._parquet: Any = None
        self.count = 0

    def write(self, doc: dict) -> None:
        self.count += 1
        if self._gzip is not None:
            self._gzip.write(encode_json(doc))
            return
        self._rows.append(doc)
        if len(self._rows) >= _PARQUET_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._rows:
            return
        if self._parquet is None:
            table = pa.Table.from_pylist(self._rows)
            self._parquet = pq.ParquetWriter(self._file, table.schema)
        else:
            names = set(self._parquet.schema.names)
            for row in self._rows:
                extra = [k for k in row if k not in names]
                if extra:
                    raise JaxllmError(f"{self.path}: document {row.get('id', '?')!r} has fields {extra} that the "
                                      "first rows lack; Parquet needs one schema: write jsonl.gz (--format jsonl.gz)")
            table = pa.Table.from_pylist(self._rows, schema=self._parquet.schema.to_arrow_schema())
        self._parquet.write_table(table)
        self._rows = []

    def commit(self) -> None:
        if self._gzip is not None:
            self._gzip.close()
        else:
            self._flush()
            if self._parquet is None:  # no rows: an empty file with no columns is still valid Parquet
                import pyarrow as pa
                import pyarrow.parquet as pq

                pq.write_table(pa.table({}), self._file)
            else:
                self._parquet.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if self._parquet is not None:
            try:
                self._parquet.close()
            except (OSError, ValueError):  # the abort removes the file anyway
                pass
            self._parquet = None
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.commit() if kind is None else self.abort()


def write_jsonl_gz(path: str | Path, docs: list[dict]) -> None:
    """A small jsonl.gz file (rejected samples), deterministic and atomic."""
    data = b"".join(encode_json(d) for d in docs)
    atomic_write_bytes(path, gzip.compress(data, compresslevel=6, mtime=0))


def output_name(index: int, fmt: str) -> str:
    """The name of output shard `index` (input order): part-00000.jsonl.gz, ..."""
    return f"part-{index:05d}.{fmt}"
