"""Helpers shared by the data tests: a character tokenizer with predictable ids, writers, readers.

A module with a unique name rather than conftest.py, whose name other test folders share."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from jaxllm.config import SourceConfig
from jaxllm.data.sources import make_source
from jaxllm.data.tokenizer import Tokenizer


class CharTokenizer(Tokenizer):
    """id = code point, BOS = 1, EOS = 2: packed arrays can be checked by hand."""

    vocab_size = 0x110000
    bos_id = 1
    eos_id = 2

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids if i > 2)

    def files(self) -> dict[str, bytes]:
        raise TypeError("CharTokenizer is a test fixture: it is never saved with a checkpoint")


def write_jsonl(path: Path, texts: list[str], compress: bool = False) -> Path:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def read_docs(path: str, **kwargs) -> list[str]:
    """Every document of one pass over a source (this process's share)."""
    names = ("process_index", "process_count", "on_bad_record", "seed")
    source_kwargs = {k: kwargs.pop(k) for k in names if k in kwargs}
    return [d["text"] for d in make_source(SourceConfig(path=path, **kwargs), num_epochs=1, **source_kwargs)]
