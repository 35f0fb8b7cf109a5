"""Document sources: each yields `{"text": str}` for this process only, forever (epoch after epoch), or, with
a `convert` function (batch formats that read whole records, e.g. conversations for SFT), `convert(record)` of
each whole record (a JSON object, a Parquet or `datasets` row, a TFDS example; `{text_field: text}` for plain
text). `convert` raises `readers.RecordError` for a record it cannot use: the source then treats it as a bad
record (skipped with a warning naming file and line, or an error: data.on_bad_record); it returns None for a
record that holds nothing to train on (skipped silently; the format counts those).

A source is a grain `IterDataset` whose iterator has small, JSON-serialisable `get_state()` /
`set_state()` that resume at exactly the next document: (epoch, file, byte offset or row) for
files, the `datasets` state dict for `hf:`, an index for `tfds:`.

Per-process sharding (no document ever reaches two processes):
- files, when there are at least `process_count` of them: process i reads files i, i+P, ...;
- otherwise every process reads every file and keeps the records r (counted over the epoch, bad
  ones included, so every process counts alike) with r % P == i.

Built-in corpora (`builtin:NAME`) are files in jaxllm/assets or a range of records of one (the
domain/general splits of the Bible for continued pretraining): a range is read from the file's
start, records before it skipped unparsed, so its state and sharding are those of any file.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import grain
import numpy as np

from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data import ASSETS, hub_sources, readers
from jaxllm.data.epochs import BadRecordPolicy, EpochIterator

Convert = Callable[[dict], Optional[dict]]

@dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus shipped in jaxllm/assets: the records [start, stop) of `file` (stop None = to its end)."""

    file: str
    start: int = 0
    stop: Optional[int] = None


# Chapters of kjv.jsonl.gz: Genesis 1 is record 0, Haggai 1 record 909, Matthew 1 record 929 (assets/README.md).
BUILTIN_CORPORA = {
    "kjv": BuiltinCorpus("kjv.jsonl.gz"),  # Genesis .. 2 John
    "kjv-valid": BuiltinCorpus("kjv-valid.jsonl.gz"),  # 3 John, Jude, Revelation: held out from kjv
    "kjv-ot": BuiltinCorpus("kjv.jsonl.gz", 0, 909),  # Genesis .. Zephaniah: the "general" split
    "kjv-ot-valid": BuiltinCorpus("kjv.jsonl.gz", 909, 929),  # Haggai, Zechariah, Malachi: held out from kjv-ot
    "kjv-nt": BuiltinCorpus("kjv.jsonl.gz", 929),  # Matthew .. 2 John: the "domain" split (held out: kjv-valid)
    "kjv-sft": BuiltinCorpus("kjv-sft.jsonl.gz"),  # instructions made from kjv (tools/make_instructions.py)
    "kjv-sft-valid": BuiltinCorpus("kjv-sft-valid.jsonl.gz"),  # their held-out questions, grouped by task:
    "kjv-sft-valid-book": BuiltinCorpus("kjv-sft-valid.jsonl.gz", 0, 232),  # which book is this verse from
    "kjv-sft-valid-first-word": BuiltinCorpus("kjv-sft-valid.jsonl.gz", 232, 464),  # its first word
    "kjv-sft-valid-last-word": BuiltinCorpus("kjv-sft-valid.jsonl.gz", 464, 696),  # its last word
    "kjv-pref": BuiltinCorpus("kjv-pref.jsonl.gz"),  # preference pairs made from kjv (tools/make_preferences.py)
    "kjv-pref-valid": BuiltinCorpus("kjv-pref-valid.jsonl.gz"),  # their held-out pairs
    "kjv-kto": BuiltinCorpus("kjv-kto.jsonl.gz"),  # kjv-pref unpaired (prompt, completion, label)
    "kjv-kto-valid": BuiltinCorpus("kjv-kto-valid.jsonl.gz"),  # kjv-pref-valid unpaired
    "kjv-rl": BuiltinCorpus("kjv-rl.jsonl.gz"),  # RL prompts + answers from kjv-sft (tools/make_rl_prompts.py)
    "kjv-rl-valid": BuiltinCorpus("kjv-rl-valid.jsonl.gz"),  # from kjv-sft-valid, grouped by task:
    "kjv-rl-valid-book": BuiltinCorpus("kjv-rl-valid.jsonl.gz", 0, 232),
    "kjv-rl-valid-first-word": BuiltinCorpus("kjv-rl-valid.jsonl.gz", 232, 464),
    "kjv-rl-valid-last-word": BuiltinCorpus("kjv-rl-valid.jsonl.gz", 464, 696),
}


def make_source(
    cfg: SourceConfig,
    *,
    seed: int = 0,
    on_bad_record: str = "skip",
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: Optional[int] = None,
    convert: Optional[Convert] = None,
) -> grain.IterDataset:
    """A grain IterDataset of `{"text": str}` documents of `cfg` for process `process_index` of `process_count`
    (or `convert(record)` of whole records: module docstring).

    `seed` shuffles the file order of each epoch; `num_epochs=None` repeats forever.
    """
    if not 0 <= process_index < process_count:
        raise JaxllmError(f"process_index={process_index} must be in [0, process_count={process_count})")
    if on_bad_record not in ("skip", "error"):
        raise JaxllmError(f"on_bad_record must be skip or error, got {on_bad_record!r}")
    bad = BadRecordPolicy(on_bad_record)
    kind, _, rest = cfg.path.partition(":")
    common = dict(name=cfg.path, process_index=process_index, process_count=process_count, num_epochs=num_epochs,
                  convert=convert)
    if cfg.format in ("hf", "tfds") or kind in ("hf", "tfds"):
        make = hub_sources.HFIterator if (cfg.format == "hf" or kind == "hf") else hub_sources.TfdsIterator
        target = rest if kind in ("hf", "tfds") else cfg.path
        return _Source(lambda: make(target, cfg, bad=bad, seed=seed, **common))
    records: tuple[int, Optional[int]] = (0, None)
    if kind == "builtin":
        corpus = builtin_corpus(rest)
        files, fmt, records = [str(ASSETS / corpus.file)], "jsonl", (corpus.start, corpus.stop)
    else:
        files = expand_paths(cfg.path)
        fmt = cfg.format
    formats = {path: readers.file_format(path, fmt) for path in files}
    return _Source(lambda: FilesIterator(files, formats, cfg, bad=bad, seed=seed, records=records, **common))


def builtin_corpus(name: str) -> BuiltinCorpus:
    """The corpus `builtin:NAME`."""
    if name not in BUILTIN_CORPORA:
        raise JaxllmError(f"unknown corpus builtin:{name}; the built-in corpora are {', '.join(BUILTIN_CORPORA)}")
    return BUILTIN_CORPORA[name]


def builtin_path(name: str) -> Path:
    """The file in jaxllm/assets that holds corpus `builtin:NAME` (all of it or a range of its records)."""
    return ASSETS / builtin_corpus(name).file


def expand_paths(path: str) -> list[str]:
    """Files named by a file, a glob, or a comma-separated list of them: sorted, without repeats."""
    found: set[str] = set()
    for part in (p.strip() for p in path.split(",")):
        if not part:
            continue
        part = os.path.expanduser(part)
        if os.path.isdir(part):
            raise JaxllmError(f"data source {part!r} is a directory; name its files, e.g. {part.rstrip('/')}/*.jsonl")
        matches = [m for m in glob.glob(part, recursive=True) if os.path.isfile(m)]
        if not matches:
            raise JaxllmError(
                f"data source path {part!r} matches no files" + (f" (in {path!r})" if part != path else "")
                + "; check the path or glob, or use builtin:kjv"
            )
        found.update(matches)
    if not found:
        raise JaxllmError(f"data source path {path!r} names no files")
    return sorted(found)


class _Source(grain.IterDataset):
    """An IterDataset whose iterator comes from a factory (sources are leaves: no parents)."""

    def __init__(self, make_iterator: Callable[[], grain.DatasetIterator]):
        super().__init__()
        self._make_iterator = make_iterator

    def __iter__(self) -> grain.DatasetIterator:
        return self._make_iterator()

    def __str__(self) -> str:
        return "jaxllm.Source"


class FilesIterator(EpochIterator):
    """Documents of local files, file after file, in an order shuffled per epoch; with `records`
    (start, stop) of one file, only its records start .. stop - 1 (stop None = to the end)."""

    def __init__(self, files: list[str], formats: dict[str, str], cfg: SourceConfig, *, bad: BadRecordPolicy,
                 seed: int, name: str, process_index: int, process_count: int, num_epochs: Optional[int],
                 convert: Optional[Convert] = None, records: tuple[int, Optional[int]] = (0, None)):  # fmt: skip
        super().__init__(name, process_index, process_count, num_epochs, convert)
        if records != (0, None) and len(files) != 1:
            raise ValueError(f"a record range applies to one file, not {len(files)} ({name})")
        self._start, self._stop = records
        self._by_record = len(files) < process_count  # too few files to shard by file: shard by record
        self._files = files if self._by_record else files[process_index::process_count]
        self._formats, self._cfg, self._bad, self._seed = formats, cfg, bad, seed
        self._restart()

    def _restart(self) -> None:
        self._close()
        rng = np.random.default_rng([self._seed, self.epoch])
        self._order = rng.permutation(len(self._files)).tolist()
        self._file = 0  # index into this epoch's order
        self._record = 0  # records seen this epoch (sharding by record)
        self._reader: Any = None
        self._resume: Optional[dict] = None  # where the next opened reader starts

    def _read(self) -> Optional[dict[str, str]]:
        while self._file < len(self._files):
            path = self._files[self._order[self._file]]
            fmt = self._formats[path]
            if self._reader is None:
                try:
                    self._reader = readers.open_reader(
                        path, fmt, self._cfg.text_unit, self._cfg.text_field, self._resume, self._convert is not None
                    )
                except readers.BadRecord as e:
                    self._bad(path, e.problem)
                    self._file, self._resume = self._file + 1, None
                    continue
                except OSError as e:
                    problem = f"cannot open ({e.strerror or e}); check that it exists and is readable"
                    raise JaxllmError(f"{path}: {problem}") from None
            try:
                record = self._reader.read()
            except readers.BadRecord as e:  # the rest of the file is unreadable: go on with the next file
                self._bad(self._reader.locate(e.number), e.problem)
                record = None
            if record is None:
                self._close()
                self._file += 1
                continue
            number, raw = record
            self._record += 1
            index = self._record - 1 - self._start  # within the range
            if index < 0:
                continue
            if self._stop is not None and self._record > self._stop:
                self._close()
                self._file += 1
                continue
            if self._by_record and index % self.process_count != self.process_index:
                continue
            if self._convert is not None:
                try:
                    doc = self._convert_record(readers.parse_object(raw, fmt, self._cfg.text_field, number), number)
                except readers.BadRecord as e:
                    self._bad(self._reader.locate(e.number), e.problem)
                    continue
                if doc is not None:
                    return doc
                continue
            try:
                text = readers.parse_record(raw, fmt, self._cfg.text_field, number)
            except readers.BadRecord as e:
                self._bad(self._reader.locate(e.number), e.problem)
                continue
            if text:
                return {"text": text}
        return None

    def _close(self) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.close()
        self._reader, self._resume = None, None

    def _position(self) -> dict[str, Any]:
        position = self._reader.position if self._reader is not None else self._resume
        return {"file": self._file, "position": position, "record": self._record}

    def _seek(self, state: dict[str, Any]) -> None:
        self._restart()  # the order of state["epoch"]
        self._file, self._record, self._resume = state["file"], state["record"], state["position"]

    def close(self) -> None:
        self._close()
        super().close()
