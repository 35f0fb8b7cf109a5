"""Builds the bundled preference sets (`builtin:kjv-pref`, `builtin:kjv-pref-valid`, `builtin:kjv-kto`) from
`builtin:kjv`.

    python tools/make_preferences.py jaxllm/assets

Deterministic (numpy seed 0, gzip without a timestamp): running it again reproduces the files byte for byte.
Each pair asks to continue a verse and prefers its genuine second half over a corrupted one, in TRL's
conversational preference format:

    {"prompt": [{"role": "user", "content": "Continue this verse: <first half>"}],
     "chosen": [{"role": "assistant", "content": "<the true second half>"}],
     "rejected": [{"role": "assistant", "content": "<a corrupted second half>"}], "corruption": KIND}

KIND is one of
- `shuffled`:   the true second half with its words in another order;
- `truncated`:  the true second half cut after its first third of words (no final punctuation);
- `other_book`: the second half of a verse from another book.
Chapters are split as in tools/make_instructions.py: every 10th chapter (index 5, 15, ...) is held out
(`kjv-pref-valid`: 2 pairs per held-out chapter, each corruption in turn); the training chapters give 3 pairs
each (`kjv-pref`, in random order). `kjv-kto` is `kjv-pref` unpaired in TRL's unpaired format
(`{"prompt", "completion", "label"}`: the chosen half labelled true, the rejected false), in random order;
`kjv-kto-valid` is `kjv-pref-valid` unpaired the same way.
The tiny base model saw every chapter in pretraining (builtin:kjv), never a corrupted verse.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

import numpy as np
from make_instructions import HELD_OUT_AT, HELD_OUT_EVERY, _write  # the same split, the same gzip

PER_CHAPTER, PER_HELD_OUT = 3, 2
CORRUPTIONS = ("shuffled", "truncated", "other_book")


def _halves(verse: str) -> tuple[str, str] | None:
    words = verse.split()
    if len(words) < 6:
        return None
    half = len(words) // 2
    return " ".join(words[:half]), " ".join(words[half:])


def _corrupt(kind: str, second: str, other_books: list[str], rng: np.random.Generator) -> str | None:
    words = second.split()
    if kind == "shuffled":
        for _ in range(10):
            order = rng.permutation(len(words))
            if (order != np.arange(len(words))).any():
                return " ".join(words[i] for i in order)
        return None
    if kind == "truncated":
        return " ".join(words[: max(1, len(words) // 3)]).rstrip(".,;:!?")
    return other_books[int(rng.integers(len(other_books)))]


def _pairs(verses: list[str], n: int, kinds: list[str], other: list[str], rng: np.random.Generator) -> list[dict]:
    out = []
    for i in rng.permutation(len(verses)):
        if len(out) == n:
            break
        halves = _halves(verses[i])
        if halves is None:
            continue
        kind = kinds[len(out) % len(kinds)]
        rejected = _corrupt(kind, halves[1], other, rng)
        if rejected is None or rejected == halves[1]:
            continue
        out.append({"prompt": [{"role": "user", "content": f"Continue this verse: {halves[0]}"}],
                    "chosen": [{"role": "assistant", "content": halves[1]}],
                    "rejected": [{"role": "assistant", "content": rejected}], "corruption": kind})
    return out


def build(corpus: Path) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    chapters = []
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            title, *verses = json.loads(line)["text"].split("\n")
            chapters.append((re.fullmatch(r"(.+) (\d+)", title).group(1), verses))
    second_halves: dict[str, list[str]] = {}
    for book, verses in chapters:
        second_halves.setdefault(book, []).extend(h[1] for h in map(_halves, verses) if h)
    train, held_out = [], []
    for index, (book, verses) in enumerate(chapters):
        other = [h for b, hs in second_halves.items() if b != book for h in hs[:20]]
        kinds = list(rng.permutation(CORRUPTIONS))
        if index % HELD_OUT_EVERY == HELD_OUT_AT:
            held_out += _pairs(verses, PER_HELD_OUT, kinds, other, rng)
        else:
            train += _pairs(verses, PER_CHAPTER, kinds, other, rng)
    return [train[i] for i in rng.permutation(len(train))], held_out


def unpaired(pairs: list[dict], rng: np.random.Generator) -> list[dict]:
    rows = [{"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]
    return [rows[i] for i in rng.permutation(len(rows))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("assets", type=Path, help="jaxllm/assets (reads kjv.jsonl.gz, writes kjv-pref*, kjv-kto*)")
    args = parser.parse_args()
    train, held_out = build(args.assets / "kjv.jsonl.gz")
    _write(args.assets / "kjv-pref.jsonl.gz", train)
    _write(args.assets / "kjv-pref-valid.jsonl.gz", held_out)
    kto = unpaired(train, np.random.default_rng(1))
    _write(args.assets / "kjv-kto.jsonl.gz", kto)
    _write(args.assets / "kjv-kto-valid.jsonl.gz", unpaired(held_out, np.random.default_rng(2)))
    kinds = {k: sum(r["corruption"] == k for r in held_out) for k in CORRUPTIONS}
    print(f"kjv-pref: {len(train)} pairs; kjv-pref-valid: {len(held_out)} {kinds}; kjv-kto: {len(kto)} rows")


if __name__ == "__main__":
    main()
