"""Builds jaxllm's bundled corpus (`builtin:kjv`, `builtin:kjv-valid`) from the King James Bible.

The input is the plain text printed by Debian's `bible` program (packages bible-kjv, bible-kjv-text):

    apt-get download bible-kjv bible-kjv-text
    dpkg -x bible-kjv_*.deb root && dpkg -x bible-kjv-text_*.deb root
    cd root && usr/bin/bible -p usr/lib "gen1:1-rev22:21" > /tmp/kjv.txt
    python tools/make_corpus.py /tmp/kjv.txt jaxllm/assets

That text has a "Genesis 1" header line between blank lines for each chapter, then verses
"  1 In the beginning ..." wrapped at about 80 columns. We write one document per chapter:
the chapter title on the first line, then one verse per line, verse numbers removed and wrapped
lines joined. Verses go on separate lines (rather than being joined by spaces) because the verse is
the text's own unit: keeping its boundary costs one token per verse and gives the model, and its
samples, the line structure of the printed book.

Whole books at the end of the Bible are held out until at least 2% of the chapters are held out
(3 John, Jude and Revelation: 24 chapters): `kjv-valid.jsonl.gz`; the rest is `kjv.jsonl.gz`.
Then train the bundled tokenizer:

    python tools/make_corpus.py --tokenizer jaxllm/assets
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import sys
from pathlib import Path

from jaxllm.utils import atomic_write_bytes

VALID_FRACTION = 0.02
_VERSE = re.compile(r"^\s+(\d+) (.*)$")
_TITLE = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z ]+ \d+$")


def parse_chapters(text: str) -> list[tuple[str, list[str]]]:
    """Returns [(title, [verse, ...]), ...] in the order of the input."""
    lines = text.splitlines()
    chapters: list[tuple[str, list[str]]] = []
    for i, line in enumerate(lines):
        is_title = (
            _TITLE.match(line)
            and (i == 0 or not lines[i - 1].strip())
            and (i + 1 == len(lines) or not lines[i + 1].strip())
        )
        if is_title:
            chapters.append((line.strip(), []))
        elif match := _VERSE.match(line):
            if not chapters:
                raise SystemExit(f"line {i + 1}: a verse before the first chapter title")
            chapters[-1][1].append(match.group(2))
        elif line.strip():
            if not chapters or not chapters[-1][1]:
                raise SystemExit(f"line {i + 1}: a continuation line before the first verse: {line!r}")
            verses = chapters[-1][1]
            verses[-1] = f"{verses[-1]} {line}"  # a wrapped line continues the verse before it
    return [(title, [" ".join(v.split()) for v in verses]) for title, verses in chapters]


def split_valid(chapters: list[tuple[str, list[str]]]) -> int:
    """Index of the first held-out chapter: whole books from the end until >= VALID_FRACTION."""
    book = lambda title: title.rsplit(" ", 1)[0]  # noqa: E731
    start = len(chapters)
    while len(chapters) - start < VALID_FRACTION * len(chapters):
        current = book(chapters[start - 1][0])
        while start > 0 and book(chapters[start - 1][0]) == current:
            start -= 1
    return start


def write_jsonl_gz(path: Path, docs: list[str]) -> None:
    raw = io.BytesIO()
    # mtime=0 and no file name in the header: the same input gives byte-identical output.
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as f:
        for doc in docs:
            f.write((json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode())
    atomic_write_bytes(path, raw.getvalue())  # never a half-written corpus under the final name


def make_corpus(source: Path, out_dir: Path) -> None:
    chapters = parse_chapters(source.read_text(encoding="utf-8"))
    docs = ["\n".join([title, *verses]) for title, verses in chapters]
    start = split_valid(chapters)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(out_dir / "kjv.jsonl.gz", docs[:start])
    write_jsonl_gz(out_dir / "kjv-valid.jsonl.gz", docs[start:])
    for name, part in (("kjv", docs[:start]), ("kjv-valid", docs[start:])):
        text = "\n".join(part)
        size = (out_dir / f"{name}.jsonl.gz").stat().st_size
        print(
            f"{name}: {len(part)} documents, {len(text.encode())} bytes of text, {len(text.split())} words, "
            f"{size} bytes compressed"
        )
    print(f"held out from {chapters[start][0]} to {chapters[-1][0]}")


def make_tokenizer(out_dir: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, installed or not
    from jaxllm.data.tokenizer import train_sentencepiece

    tok = train_sentencepiece(["builtin:kjv"], str(out_dir / "kjv-sp4k"), vocab_size=4096, model_type="bpe")
    print(f"{out_dir / 'kjv-sp4k.model'}: vocab {tok.vocab_size}, {(out_dir / 'kjv-sp4k.model').stat().st_size} bytes")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, help="text printed by `bible -p ...`")
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("jaxllm/assets"))
    parser.add_argument("--tokenizer", metavar="OUT_DIR", type=Path, help="train OUT_DIR/kjv-sp4k.model instead")
    args = parser.parse_args(argv)
    if args.tokenizer:
        make_tokenizer(args.tokenizer)
    elif args.source is None:
        parser.error("give the text printed by `bible -p usr/lib \"gen1:1-rev22:21\"`")
    else:
        make_corpus(args.source, args.out_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
