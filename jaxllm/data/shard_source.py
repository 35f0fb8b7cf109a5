"""Pre-tokenised shards in training: rows that `jaxllm data tokenize` (jaxllm.dataprep.shards) packed and wrote as
ArrayRecord files, read with random access.

A source `{path: DIR, format: arrayrecord}` (or any DIR holding a `metadata.json`) is read as one grain
MapDataset over all its shards: row r of the corpus is record r of the shards in order. Its batches skip the
document stages (the rows are already packed with the trainer's clm packing):

    global row index g -> epoch g // N, row permutation(epoch)[g % N] (data.shuffle_window > 0: a permutation of
    the whole corpus per epoch, grain's MapDataset.shuffle; 0: corpus order) -> decode -> batch -> prefetch

Processes: global batch j is the rows j*G .. (j+1)*G - 1 (G = batch_size * process_count) and process p takes
its contiguous slice p*b .. (p+1)*b - 1, so the processes' batches concatenated in process order are the batch
one process would make of G rows. The iterator's state is the global row index (rows consumed by all
processes): a run saved with P processes resumes with any other count or global batch size at the same row.
A finite pass (evaluation) ends after the global batch that holds the last row; rows past it are padding
(segment 0), so every process makes the same number of batches.

Record layout (format version 1): the fields `inputs, targets, segment_ids, positions` stacked as a
[4, seq_len] array of the metadata's `dtype` (`<u2` when every id and the row length fit 16 bits, else `<i4`),
C order, raw bytes; loss_mask = segment_ids > 0.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import grain
import numpy as np

from jaxllm.config import DataConfig, JaxllmError, SourceConfig
from jaxllm.data.tokenizer import Tokenizer

METADATA = "metadata.json"
FORMAT = "jaxllm-token-rows"
VERSION = 1
ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions")
TOKENIZER_DIR = "tokenizer"  # the tokenizer's files, copied beside the shards


def is_shard_source(cfg: SourceConfig) -> bool:
    """Whether `cfg` names pre-tokenised shards: format arrayrecord, or (format auto) a directory with metadata.json."""
    if cfg.format == "arrayrecord":
        return True
    return cfg.format == "auto" and (Path(cfg.path).expanduser() / METADATA).is_file()


def row_dtype(vocab_size: int, seq_len: int) -> str:
    """The record dtype: 16 bits when every id and every segment id / position fits them."""
    return "<u2" if vocab_size <= 1 << 16 and seq_len < 1 << 16 else "<i4"


def encode_row(row: dict[str, np.ndarray], dtype: str) -> bytes:
    """One packed row -> its record (module docstring)."""
    return np.stack([row[k] for k in ROW_FIELDS]).astype(dtype).tobytes()


class DecodeRow:
    """A record -> the row's batch fields, each [seq_len] (int32; loss_mask float32)."""

    def __init__(self, dtype: str, seq_len: int):
        self._dtype, self._seq_len = np.dtype(dtype), seq_len

    def __call__(self, record: bytes) -> dict[str, np.ndarray]:
        fields = np.frombuffer(record, self._dtype).reshape(len(ROW_FIELDS), self._seq_len).astype(np.int32)
        row = dict(zip(ROW_FIELDS, fields))
        row["loss_mask"] = (row["segment_ids"] > 0).astype(np.float32)
        return row


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 over the tokenizer's files (name and bytes, sorted): equal exactly when the files are."""
    digest = hashlib.sha256()
    for name, data in sorted(tokenizer.files().items()):
        digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def read_metadata(directory: str) -> dict[str, Any]:
    """The metadata.json of a shard directory, checked to be one this jaxllm reads."""
    path = Path(directory).expanduser() / METADATA
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JaxllmError(f"{path} does not exist: {directory} is not a complete shard directory; write it with "
                          "jaxllm data tokenize (an interrupted run leaves no metadata.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxllmError(f"{path} is not valid JSON ({e}); write the shards again with jaxllm data tokenize") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise JaxllmError(f"{path} is not {FORMAT} version {VERSION} metadata; write the shards again with this "
                          "jaxllm's data tokenize")  # fmt: skip
    return meta


def shard_rows(cfg: DataConfig, tokenizer: Tokenizer, batch_size: int, process_index: int, process_count: int,
               num_epochs: Optional[int]) -> grain.IterDataset:
    """This process's rows of the shard source in `cfg.sources` (module docstring), before batching."""
    if len(cfg.sources) != 1 or not is_shard_source(cfg.sources[0]):
        raise JaxllmError(
            f"data.sources mixes pre-tokenised shards with other sources ({', '.join(s.path for s in cfg.sources)}); "
            "train from one shard directory, or tokenise all the inputs into one with jaxllm data tokenize"
        )
    source = cfg.sources[0]
    meta = read_metadata(source.path)
    where = f"data.sources path {source.path}"
    if meta["seq_len"] != cfg.seq_len:
        raise JaxllmError(f"{where} holds rows of {meta['seq_len']} tokens but data.seq_len={cfg.seq_len}; set "
                          f"data.seq_len={meta['seq_len']} or tokenise again with --seq-len {cfg.seq_len}")
    ours = tokenizer_fingerprint(tokenizer)
    if meta["tokenizer"]["sha256"] != ours:
        copied = Path(source.path).expanduser() / TOKENIZER_DIR
        raise JaxllmError(
            f"{where} was tokenised with {meta['tokenizer']['name']} (sha256 {meta['tokenizer']['sha256'][:12]}), but "
            f"this run's tokenizer is {getattr(tokenizer, 'name', type(tokenizer).__name__)} (sha256 {ours[:12]}); "
            f"set tokenizer.path={copied} or tokenise again with this tokenizer"
        )
    for flag in ("add_bos", "add_eos"):
        if meta[flag] != getattr(cfg, flag):
            raise JaxllmError(f"{where} was tokenised with {flag}={str(meta[flag]).lower()} but data.{flag}="
                              f"{str(getattr(cfg, flag)).lower()}; set data.{flag}={str(meta[flag]).lower()}")
    files = [str(Path(source.path).expanduser() / s["file"]) for s in meta["shards"]]
    rows = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files)).map(DecodeRow(meta["dtype"],
                                                                                             meta["seq_len"]))
    if len(rows) != meta["rows"]:
        raise JaxllmError(f"{where}: the shards hold {len(rows)} rows, metadata.json says {meta['rows']}; the "
                          "directory was changed after writing: tokenise again")  # fmt: skip
    if cfg.shuffle_window > 0:
        rows = rows.shuffle(int(np.random.SeedSequence([cfg.seed, 0]).generate_state(1)[0]))
    total = None if num_epochs is None else num_epochs * len(rows)
    return _GlobalRows(rows, total, cfg.seq_len, batch_size, process_index, process_count)


class _GlobalRows(grain.IterDataset):
    def __init__(self, rows: grain.MapDataset, total: Optional[int], seq_len: int, batch_size: int,
                 process_index: int, process_count: int):  # fmt: skip
        super().__init__()
        self._args = (rows, total, seq_len, batch_size, process_index, process_count)

    def __iter__(self) -> grain.DatasetIterator:
        return GlobalRowsIterator(*self._args)

    def __str__(self) -> str:
        return "jaxllm.ShardRows"


class GlobalRowsIterator(grain.DatasetIterator):
    """Process p's rows: its k-th row is global row start + (k // b) * G + p * b + k % b (module docstring).
    State: {"global_row": the next global batch's first row, "row_in_batch": k % b}."""

    def __init__(self, rows: grain.MapDataset, total: Optional[int], seq_len: int, batch_size: int,
                 process_index: int, process_count: int):  # fmt: skip
        super().__init__()
        self._rows, self._total, self._b = rows, total, batch_size
        self._p, self._global_batch = process_index, batch_size * process_count
        self._padding = {k: np.zeros(seq_len, np.int32) for k in ROW_FIELDS}
        self._padding["loss_mask"] = np.zeros(seq_len, np.float32)
        self._start, self._k = 0, 0

    def _batch_start(self) -> int:
        return self._start + (self._k // self._b) * self._global_batch

    def __next__(self) -> dict[str, np.ndarray]:
        batch_start = self._batch_start()
        if self._total is not None and batch_start >= self._total:
            raise StopIteration
        g = batch_start + self._p * self._b + self._k % self._b
        self._k += 1
        if self._total is not None and g >= self._total:
            return dict(self._padding)
        return self._rows[g]

    def get_state(self) -> dict[str, Any]:
        return {"global_row": self._batch_start(), "row_in_batch": self._k % self._b}

    def set_state(self, state: dict[str, Any]) -> None:
        self._start, self._k = state["global_row"], state["row_in_batch"]
