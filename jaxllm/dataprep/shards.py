"""`jaxllm data tokenize`: documents -> tokens -> the trainer's clm packing -> ArrayRecord shards of rows.

    inputs (files in sorted order, each read as the training loader reads it; or builtin:NAME / hf:NAME)
    -> chunks of documents -> tokenised by a pool of worker processes (`ClmTokenize`, the trainer's own
       stage: BOS/EOS, inputs = t[:-1], targets = t[1:]), results taken back in input order
    -> `pack_clm_rows` (the trainer's packing, same code) -> rows [seq_len]
    -> DIR/rows-00000.arrayrecord, rows-00001..., `rows_per_shard` rows each (written as a hidden temporary,
       renamed when whole)
    -> DIR/tokenizer/ (the tokenizer's files) and DIR/metadata.json, written last: its presence marks DIR complete.

The output is the same whatever the number of workers: only tokenising runs in parallel; reading and packing
run in order in this process. The record layout is jaxllm.data.shard_source's (which reads the shards in
training). The last row is padded (segment 0) where the corpus ends.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data import shard_source
from jaxllm.data.objectives import ClmTokenize, pack_clm_rows
from jaxllm.data.shard_source import METADATA, ROW_FIELDS, TOKENIZER_DIR, encode_row, row_dtype, tokenizer_fingerprint
from jaxllm.data.sources import expand_paths, make_source
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_from_files
from jaxllm.utils import atomic_write_bytes, atomic_write_text

SHARD_NAME = "rows-{:05d}.arrayrecord"
WRITER_OPTIONS = "group_size:1,zstd:3"  # one record per chunk: a row is read alone (random access)
_CHUNK_DOCS = 256  # documents per task sent to a worker


def tokenize_to_shards(
    inputs: str,
    output: str,
    tokenizer: str,
    seq_len: int,
    *,
    add_bos: bool = True,
    add_eos: bool = True,
    objective: str = "clm",
    rows_per_shard: int = 8192,
    workers: int = 0,
    text_field: str = "text",
    input_format: str = "auto",
    text_unit: str = "paragraph",
    on_bad_record: str = "skip",
    overwrite: bool = False,
    progress: Optional[Callable[[int], None]] = None,
) -> dict[str, Any]:
    """Tokenises and packs the documents of `inputs` (a file, glob, comma-separated list, builtin:NAME or
    hf:NAME) into shards in directory `output` (module docstring); returns the metadata written, plus
    `seconds` and `documents_per_second`. `workers` 0 = one per core; `progress(n)` is called with each
    chunk of n documents read."""
    if objective != "clm":
        raise JaxllmError(f"jaxllm data tokenize packs clm rows; --objective {objective} trains from the documents "
                          "themselves (data.sources of jsonl/parquet/text)")  # fmt: skip
    for name, value in (("seq_len", seq_len), ("rows_per_shard", rows_per_shard)):
        if value < 1:
            raise JaxllmError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if workers < 0:
        raise JaxllmError(f"--workers must be >= 0 (0 = one per core), got {workers}")
    tok = load_tokenizer(tokenizer)
    for flag, wanted, token_id in (("bos", add_bos, tok.bos_id), ("eos", add_eos, tok.eos_id)):
        if wanted and token_id is None:
            raise JaxllmError(f"{tokenizer} has no {flag.upper()} token; pass --no-add-{flag}")
    out = _prepare_output(Path(output).expanduser(), overwrite)
    workers = workers or os.cpu_count() or 1
    sources = _input_sources(inputs, input_format, text_field, text_unit)
    started = time.perf_counter()
    counts = {"documents": 0, "documents_packed": 0}
    chunks = _document_chunks(sources, on_bad_record, counts, progress)
    docs = _counted(_tokenized(chunks, workers, tok, add_bos, add_eos), counts)
    rows = pack_clm_rows(_Stream(docs), seq_len)
    dtype = row_dtype(tok.vocab_size, seq_len)
    writer = _ShardWriter(out, rows_per_shard, dtype)
    tokens = 0
    for row in rows:
        writer.write(row)
        tokens += int((row["segment_ids"] > 0).sum())
    writer.close()
    if not writer.shards:
        raise JaxllmError(f"{inputs} holds no document with text to tokenise; check the path, format and --text-field")
    for name, data in tok.files().items():
        atomic_write_bytes(out / TOKENIZER_DIR / name, data)
    seconds = time.perf_counter() - started
    meta = {
        "format": shard_source.FORMAT,
        "version": shard_source.VERSION,
        "objective": objective,
        "seq_len": seq_len,
        "dtype": dtype,
        "fields": list(ROW_FIELDS),
        "loss_mask": "segment_ids > 0",
        "record": f"the fields stacked as a [{len(ROW_FIELDS)}, seq_len] array of dtype, C order, raw bytes",
        "add_bos": add_bos,
        "add_eos": add_eos,
        "rows": sum(s["rows"] for s in writer.shards),
        "tokens": tokens,  # real targets (positions with segment_ids > 0)
        "shards": writer.shards,
        "tokenizer": {
            "name": tokenizer, "sha256": tokenizer_fingerprint(tok), "vocab_size": tok.vocab_size,
            "dir": TOKENIZER_DIR, "files": sorted(tok.files()),
        },
        "sources": {"inputs": inputs, "files": [s.path for s in sources], "text_field": text_field, **counts},
    }
    atomic_write_text(out / METADATA, json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    return {**meta, "seconds": seconds, "documents_per_second": counts["documents"] / max(seconds, 1e-9)}


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """`out`, created; a complete earlier output is refused unless `overwrite`; parts of an interrupted one go."""
    if (out / METADATA).exists():
        if not overwrite:
            raise JaxllmError(f"{out} already holds tokenised shards ({METADATA}); choose another --output or pass "
                              "--overwrite")  # fmt: skip
        (out / METADATA).unlink()  # first: a run that stops from here on leaves no complete-looking directory
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("rows-*.arrayrecord"), *out.glob(".rows-*.tmp")]:
        stale.unlink()
    return out


def _input_sources(inputs: str, fmt: str, text_field: str, text_unit: str) -> list[SourceConfig]:
    """One source per input file in sorted order (a builtin:, hf: or tfds: input is one source)."""
    common = {"format": fmt, "text_field": text_field, "text_unit": text_unit}
    if inputs.partition(":")[0] in ("builtin", "hf", "tfds") or fmt in ("hf", "tfds"):
        return [SourceConfig(path=inputs, **common)]
    return [SourceConfig(path=path, **common) for path in expand_paths(inputs)]


def _document_chunks(sources: list[SourceConfig], on_bad_record: str, counts: dict[str, int],
                     progress: Optional[Callable[[int], None]]) -> Iterator[list[str]]:
    """The documents' texts in input order, in lists of `_CHUNK_DOCS`."""
    chunk: list[str] = []
    for cfg in sources:
        for doc in make_source(cfg, on_bad_record=on_bad_record, num_epochs=1):
            chunk.append(doc["text"])
            if len(chunk) == _CHUNK_DOCS:
                counts["documents"] += len(chunk)
                progress and progress(len(chunk))
                yield chunk
                chunk = []
    if chunk:
        counts["documents"] += len(chunk)
        progress and progress(len(chunk))
        yield chunk


_WORKER: dict[str, ClmTokenize] = {}


def _start_worker(files: dict[str, bytes], add_bos: bool, add_eos: bool) -> None:
    _WORKER["tokenize"] = ClmTokenize(load_tokenizer_from_files(files), add_bos, add_eos)


def _tokenize_chunk(texts: list[str]) -> list[dict[str, np.ndarray]]:
    tokenize = _WORKER["tokenize"]
    return [tokenize({"text": text}) for text in texts]


def _tokenized(chunks: Iterator[list[str]], workers: int, tokenizer: Tokenizer, add_bos: bool,
               add_eos: bool) -> Iterator[dict[str, np.ndarray]]:
    """`ClmTokenize` of every document, in input order; with several workers at most 2 chunks per worker in
    flight, so memory stays bounded whatever the corpus size."""
    if workers == 1:
        tokenize = ClmTokenize(tokenizer, add_bos, add_eos)
        for chunk in chunks:
            yield from (tokenize({"text": text}) for text in chunk)
        return
    # spawn, as the other stages' pools: a forked child of a process that holds threads (JAX's, a progress bar's,
    # `jaxllm data prepare` after earlier stages, a test session) can deadlock on a lock held at the fork
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _start_worker, (tokenizer.files(), add_bos, add_eos)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def _counted(docs: Iterator[dict[str, np.ndarray]], counts: dict[str, int]) -> Iterator[dict[str, np.ndarray]]:
    for doc in docs:
        counts["documents_packed"] += len(doc["inputs"]) > 0  # the others have no target: packing drops them
        yield doc


class _Stream(grain.IterDataset):
    """A one-pass grain IterDataset over a Python iterator (it cannot seek: a tokenize run starts over)."""

    def __init__(self, items: Iterator[Any]):
        super().__init__()
        self._items = items

    def __iter__(self) -> grain.DatasetIterator:
        return _StreamIterator(self._items)


class _StreamIterator(grain.DatasetIterator):
    def __init__(self, items: Iterator[Any]):
        super().__init__()
        self._items, self._taken = items, 0

    def __next__(self) -> Any:
        item = next(self._items)
        self._taken += 1
        return item

    def get_state(self) -> dict[str, Any]:  # packing asks for it; only for show here
        return {"taken": self._taken}

    def set_state(self, state: dict[str, Any]) -> None:
        # grain's iterator interface asks for it; a tokenize run never restores one (an interrupted run writes no
        # metadata.json and the next run starts over), so reaching here is a programming error, said plainly
        raise JaxllmError("a tokenize run has no resumable position: run `jaxllm data tokenize` again from the start")


class _ShardWriter:
    """Rows -> rows-NNNNN.arrayrecord files of `rows_per_shard` rows, each written as a hidden temporary and
    renamed when whole; `shards` lists the finished ones ({"file", "rows"})."""

    def __init__(self, out: Path, rows_per_shard: int, dtype: str):
        self._out, self._rows_per_shard, self._dtype = out, rows_per_shard, dtype
        self.shards: list[dict[str, Any]] = []
        self._writer: Optional[ArrayRecordWriter] = None
        self._rows = 0

    def write(self, row: dict[str, np.ndarray]) -> None:
        if self._writer is None:
            self._writer = ArrayRecordWriter(str(self._tmp()), WRITER_OPTIONS)
            self._rows = 0
        self._writer.write(encode_row(row, self._dtype))
        self._rows += 1
        if self._rows == self._rows_per_shard:
            self._finish()

    def close(self) -> None:
        if self._writer is not None:
            self._finish()

    def _tmp(self) -> Path:
        return self._out / f".{SHARD_NAME.format(len(self.shards))}.tmp"

    def _finish(self) -> None:
        self._writer.close()
        name = SHARD_NAME.format(len(self.shards))
        os.replace(self._tmp(), self._out / name)
        self.shards.append({"file": name, "rows": self._rows})
        self._writer = None
