"""The bundled King James Bible corpus and the script that makes it."""

import importlib.util
from pathlib import Path

import pytest

from tests.data.data_testing import read_docs
from jaxllm.config import JaxllmError
from jaxllm.data import ASSETS
from jaxllm.data.sources import builtin_path

ROOT = Path(__file__).resolve().parents[2]


def _make_corpus_module():
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "tools" / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_corpus_has_expected_size_and_shape():
    docs = read_docs("builtin:kjv")
    assert len(docs) == 1165
    assert docs[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\nAnd the earth")
    assert docs[-1].startswith("2 John 1\n")
    assert 770_000 < sum(len(d.split()) for d in docs) < 790_000
    assert 1_000_000 < builtin_path("kjv").stat().st_size < 1_500_000
    # Verse numbers are gone: no verse line starts with a number (titles like "1 Samuel 3" are first lines).
    verse_lines = [line for d in docs for line in d.split("\n")[1:]]
    assert len(verse_lines) == 31102 - 443  # all verses but the 443 held out
    assert not any(line[:1].isdigit() for line in verse_lines)


def test_valid_corpus_is_the_last_books():
    docs = read_docs("builtin:kjv-valid")
    assert [d.split("\n")[0] for d in docs[:2]] == ["3 John 1", "Jude 1"]
    assert docs[-1].startswith("Revelation 22\n")
    assert docs[-1].endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert len(docs) == 24
    assert not set(docs) & set(read_docs("builtin:kjv"))


def test_unknown_builtin_names_the_choices():
    with pytest.raises(JaxllmError, match="builtin:nope.*kjv, kjv-valid"):
        read_docs("builtin:nope")


def test_assets_readme_states_the_numbers():
    readme = (ASSETS / "README.md").read_text()
    assert "public domain" in readme and "1165" in readme and "make_corpus.py" in readme


def test_make_corpus_parses_bible_output():
    text = (
        "\nGenesis 1\n\n  1 In the beginning God created the heaven and the earth.\n"
        "  2 And the earth was without form, and void; and darkness was upon the face of \n"
        "the deep.\n\n1 Samuel 2\n\n  1 And Hannah prayed,\nand said.\n"
    )
    chapters = _make_corpus_module().parse_chapters(text)
    assert chapters == [
        ("Genesis 1", [
            "In the beginning God created the heaven and the earth.",
            "And the earth was without form, and void; and darkness was upon the face of the deep.",
        ]),
        ("1 Samuel 2", ["And Hannah prayed, and said."]),
    ]  # fmt: skip


def test_make_corpus_holds_out_whole_books():
    chapters = [(f"Book{b} {c}", ["v"]) for b in range(10) for c in range(1, 11)]  # 100 chapters
    chapters.append(("Last 1", ["v"]))
    start = _make_corpus_module().split_valid(chapters)
    assert [t for t, _ in chapters[start:]] == ["Book9 " + str(c) for c in range(1, 11)] + ["Last 1"]
