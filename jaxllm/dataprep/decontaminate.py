"""The decontaminate stage: drop (or flag) training documents that share a long word n-gram with an evaluation set.

The test is GPT-3's (Brown et al. 2020, appendix C): a document is contaminated when it shares an n-gram,
13 words by default, with any evaluation example. Words are normalised as lm-evaluation-harness's
decontamination `Janitor` does (`lm_eval/decontamination/janitor.py`: lowercase, punctuation characters
deleted — not replaced by spaces, so "don't" is "dont" — then split on whitespace), with two Unicode
extensions: `str.lower()` instead of ASCII-only lowercasing, and every Unicode punctuation character
(categories P*) deleted, not only `string.punctuation`.

Evaluation n-grams are kept as 64-bit hashes (BLAKE2b, 8 bytes, stable across processes and machines) in a
dict hash -> bitmask of the evaluation sets holding it: about 100 bytes per n-gram in memory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import Iterator, Literal, Optional

from jaxllm.config import ConfigError, JaxllmError



@functools.lru_cache(maxsize=1)
def _punctuation() -> dict[int, None]:
    """str.translate's table deleting every Unicode punctuation character."""
    return dict.fromkeys(i for i in range(sys.maxunicode + 1) if unicodedata.category(chr(i)).startswith("P"))


@dataclass
class DecontaminateConfig:
    files: list[str] = field(default_factory=list)  # evaluation sets: jsonl(.gz) with `text_field`, or text files
    text_field: str = "text"  # of the evaluation jsonl files
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness task or group names
    include_path: Optional[str] = None  # a directory of your own task YAML files
    n: int = 13
    mode: Literal["drop", "flag"] = "drop"  # flag: keep, with contaminated / contamination_ngrams / ..._sets


def decontaminate_config(raw: dict | None) -> DecontaminateConfig:
    from jaxllm.config.loading import from_dict

    return from_dict(DecontaminateConfig, raw, "decontaminate")


def normalized_words(text: str) -> list[str]:
    return text.lower().translate(_punctuation()).split()


def ngram_hashes(text: str, n: int) -> Iterator[int]:
    """64-bit hashes of the n-grams of `text`'s normalised words (none when it has fewer than n words)."""
    words = normalized_words(text)
    for i in range(len(words) - n + 1):
        digest = hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest()
        yield int.from_bytes(digest, "little")


def file_texts(path: str, text_field: str) -> Iterator[str]:
    """The texts of an evaluation file: each jsonl record's `text_field`, or a whole text file."""
    from jaxllm.data.readers import BadRecord, file_format, open_reader, parse_record

    fmt = file_format(path, "auto")
    try:
        reader = open_reader(path, fmt, "file", text_field, None)
    except BadRecord as e:
        raise JaxllmError(f"{path}: {e.problem}") from None
    except OSError as e:
        raise JaxllmError(f"evaluation set {path}: {e.strerror or e}; give existing jsonl or text files") from None
    try:
        while (item := reader.read()) is not None:
            number, raw = item
            try:
                yield parse_record(raw, fmt, text_field, number)
            except BadRecord as e:
                raise JaxllmError(f"{path}:{e.number}: {e.problem}") from None
    finally:
        reader.close()


def task_texts(tasks: list[str], include_path: Optional[str]) -> Iterator[tuple[str, str]]:
    """(task name, text) of every evaluation document of lm-evaluation-harness `tasks` (groups expanded): the
    task's `doc_to_text` and its target's text (for multiple choice, the correct choice)."""
    from jaxllm.eval.tasks import task_manager

    leaves = task_manager(tasks, include_path).load(list(tasks))["tasks"]  # {name: Task}, groups expanded
    for name, task in leaves.items():
        docs = task.test_docs() if task.has_test_docs() else task.validation_docs()
        for doc in docs if docs is not None else ():
            text, target = task.doc_to_text(doc), task.doc_to_target(doc)
            if isinstance(target, int) and getattr(task.config, "doc_to_choice", None) is not None:
                choices = task.doc_to_choice(doc)
                target = choices[target] if 0 <= target < len(choices) else ""
            elif isinstance(target, list):
                target = " ".join(map(str, target))
            yield name, f"{text} {target}"


class Decontaminator:
    """The decontaminate DocStage, built once from the evaluation sets: `(doc) -> (doc, None) | (None,
    "decontaminate:<set>")`, <set> the first evaluation set (file name or task) the document shares an n-gram
    with. Flag mode keeps the document with `contaminated`, `contamination_ngrams` (how many of its n-grams
    are evaluation n-grams) and `contamination_sets`."""

    name = "decontaminate"

    def __init__(self, config: DecontaminateConfig | dict, text_field: str = "text"):
        self.settings = c = config if isinstance(config, DecontaminateConfig) else decontaminate_config(config)
        self.text_field = text_field
        if c.n < 1:
            raise ConfigError(f"decontaminate.n must be >= 1 words (GPT-3 used 13), got {c.n}")
        if not c.files and not c.tasks:
            raise ConfigError("decontaminate needs evaluation sets: files (jsonl/text, --eval-file) or "
                              "lm-evaluation-harness task names (--tasks)")
        self.sets: list[str] = []
        self.ngrams: dict[int, int] = {}
        for path in c.files:
            for text in file_texts(path, c.text_field):
                self._add(os.path.basename(path), text)
        if c.tasks:
            for task, text in task_texts(list(c.tasks), c.include_path):
                self._add(task, text)

    @property
    def config(self) -> dict:
        """The settings and a digest of the evaluation n-grams: the engine's plan, so a changed evaluation set
        redoes the stage instead of resuming it."""
        digest = hashlib.sha256(repr(sorted(self.ngrams.items())).encode()).hexdigest()
        return {**dataclasses.asdict(self.settings), "sets": self.sets, "ngrams_sha256": digest}

    def _add(self, name: str, text: str) -> None:
        if name not in self.sets:
            self.sets.append(name)
        bit = 1 << self.sets.index(name)
        for h in ngram_hashes(text, self.settings.n):
            self.ngrams[h] = self.ngrams.get(h, 0) | bit

    def __call__(self, doc: dict) -> tuple[Optional[dict], Optional[str]]:
        matched, mask = 0, 0
        for h in ngram_hashes(doc[self.text_field], self.settings.n):
            bits = self.ngrams.get(h)
            if bits is not None:
                matched += 1
                mask |= bits
                if self.settings.mode == "drop":
                    break
        names = [s for i, s in enumerate(self.sets) if mask >> i & 1]
        if self.settings.mode == "drop":
            return (None, f"decontaminate:{names[0]}") if matched else (doc, None)
        return {**doc, "contaminated": bool(matched), "contamination_ngrams": matched,
                "contamination_sets": names}, None
