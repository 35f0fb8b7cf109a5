"""Builds the bundled instruction set (`builtin:kjv-sft`, `builtin:kjv-sft-valid`) from `builtin:kjv`.

    python tools/make_instructions.py jaxllm/assets

Deterministic (numpy seed 0, gzip without a timestamp): running it again reproduces the files byte for byte.
Each line is a TRL conversational record `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}],
"task": ...}` made from one chapter of the corpus (title "Genesis 1", then one verse per line):

- `book`:       "Which book of the Bible is this verse from?\\n<verse>"  ->  "<book>"
- `first_word`: "What is the first word of this verse?\\n<verse>"        ->  "<its first word>"
- `last_word`:  "What is the last word of this verse?\\n<verse>"         ->  "<its last word>"
- `continue`:   "Continue this verse: <its first half>"                  ->  "<its second half>"
- `quote`:      "Quote <book> <chapter>:<verse>."                          ->  "<the verse>"

(words without the punctuation around them). Every 10th chapter (index 5, 15, 25, ... in corpus order) is
held out of the training set; the held-out set asks the `book`, `first_word` and `last_word` questions of two
verses of each held-out chapter, grouped by task in that order (builtin:kjv-sft-valid-book, -first-word,
-last-word name the three groups), so exact match on each is the accuracy of that instruction on verses the
model never saw in an instruction (it did see every chapter in pretraining on builtin:kjv). Training
chapters give 3 `book`, 2 `first_word`, 2 `last_word`, 2 `continue` and 1 `quote` examples each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

import numpy as np

HELD_OUT_EVERY, HELD_OUT_AT = 10, 5
PUNCTUATION = ".,;:!?()'\""
PER_CHAPTER = {"book": 3, "first_word": 2, "last_word": 2, "continue": 2, "quote": 1}
HELD_OUT = {"book": 2, "first_word": 2, "last_word": 2}


def _conversation(question: str, answer: str, task: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "task": task}


def _examples(book: str, chapter: int, verses: list[str], rng: np.random.Generator, counts: dict) -> list[dict]:
    out = []
    picks = {task: rng.choice(len(verses), size=min(n, len(verses)), replace=False) for task, n in counts.items()}
    for i in picks.get("book", []):
        out.append(_conversation(f"Which book of the Bible is this verse from?\n{verses[i]}", book, "book"))
    for task, which, position in (("first_word", "first", 0), ("last_word", "last", -1)):
        for i in picks.get(task, []):
            words = [w.strip(PUNCTUATION) for w in verses[i].split()]
            words = [w for w in words if w]
            out.append(_conversation(f"What is the {which} word of this verse?\n{verses[i]}", words[position], task))
    for i in picks.get("continue", []):
        words = verses[i].split()
        if len(words) >= 4:
            half = len(words) // 2
            out.append(_conversation(f"Continue this verse: {' '.join(words[:half])}", " ".join(words[half:]),
                                     "continue"))  # fmt: skip
    for i in picks.get("quote", []):
        out.append(_conversation(f"Quote {book} {chapter}:{i + 1}.", verses[i], "quote"))
    return out


def build(corpus: Path) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    train, held_out = [], []
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for index, line in enumerate(f):
            title, *verses = json.loads(line)["text"].split("\n")
            book, chapter = re.fullmatch(r"(.+) (\d+)", title).groups()
            if index % HELD_OUT_EVERY == HELD_OUT_AT:
                held_out += _examples(book, int(chapter), verses, rng, HELD_OUT)
            else:
                train += _examples(book, int(chapter), verses, rng, PER_CHAPTER)
    order = rng.permutation(len(train))
    held_out.sort(key=lambda r: list(HELD_OUT).index(r["task"]))  # grouped by task (stable: corpus order within)
    return [train[i] for i in order], held_out


def _write(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    path.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("assets", type=Path, help="jaxllm/assets (reads kjv.jsonl.gz, writes kjv-sft*.jsonl.gz)")
    args = parser.parse_args()
    train, held_out = build(args.assets / "kjv.jsonl.gz")
    _write(args.assets / "kjv-sft.jsonl.gz", train)
    _write(args.assets / "kjv-sft-valid.jsonl.gz", held_out)
    tasks = {t: sum(r["task"] == t for r in train) for t in PER_CHAPTER}
    held = {t: sum(r["task"] == t for r in held_out) for t in HELD_OUT}
    print(f"kjv-sft: {len(train)} conversations {tasks}; kjv-sft-valid: {len(held_out)} {held}")


if __name__ == "__main__":
    main()
