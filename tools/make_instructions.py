"""Builds the bundled instruction set (`builtin:kjv-sft`, `builtin:kjv-sft-valid`) from `builtin:kjv`.

    python tools/make_instructions.py jaxllm/assets

Deterministic (numpy seed 0, gzip without a timestamp): running it again reproduces the files byte for byte.
Each line is a TRL conversational record `{"messages": [{"role": "user", ...}, {"role": "assistant", ...}],
"task": ...}` made from one chapter of the corpus (title "Genesis 1", then one verse per line):

- `book`:     "Which book of the Bible is this verse from?\\n<verse>"  ->  "<book>"
- `continue`: "Continue this verse: <its first half>"                  ->  "<its second half>"
- `quote`:    "Quote <book> <chapter>:<verse>."                          ->  "<the verse>"

Every 10th chapter (index 5, 15, 25, ... in corpus order) is held out of the training set; the held-out set
asks the `book` question of two verses of each held-out chapter, so its exact match is the accuracy of naming
the book of a verse the model never saw in an instruction (it did see the chapter in pretraining, like every
other chapter of builtin:kjv). Training chapters give 4 `book`, 3 `continue` and 1 `quote` examples each.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

import numpy as np

HELD_OUT_EVERY, HELD_OUT_AT = 10, 5
PER_CHAPTER = {"book": 4, "continue": 3, "quote": 1}
HELD_OUT_PER_CHAPTER = 2


def _conversation(question: str, answer: str, task: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "task": task}


def _examples(book: str, chapter: int, verses: list[str], rng: np.random.Generator, counts: dict) -> list[dict]:
    out = []
    picks = {task: rng.choice(len(verses), size=min(n, len(verses)), replace=False) for task, n in counts.items()}
    for i in picks.get("book", []):
        out.append(_conversation(f"Which book of the Bible is this verse from?\n{verses[i]}", book, "book"))
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
                held_out += _examples(book, int(chapter), verses, rng, {"book": HELD_OUT_PER_CHAPTER})
            else:
                train += _examples(book, int(chapter), verses, rng, PER_CHAPTER)
    order = rng.permutation(len(train))
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
    print(f"kjv-sft: {len(train)} conversations {tasks}; kjv-sft-valid: {len(held_out)} `book` questions")


if __name__ == "__main__":
    main()
