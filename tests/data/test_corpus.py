"""The bundled King James Bible corpus and the script that makes it."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.data.data_testing import read_docs, write_jsonl
from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data import ASSETS, sources
from jaxllm.data.sources import BuiltinCorpus, builtin_path, make_source

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
    with pytest.raises(JaxllmError, match="builtin:nope.*kjv, kjv-valid, kjv-ot, kjv-ot-valid, kjv-nt"):
        read_docs("builtin:nope")


def _titles(docs):
    return [d.split("\n")[0] for d in docs]


def test_general_and_domain_splits_partition_the_corpus_by_book():
    """kjv = kjv-ot (Genesis .. Zephaniah) + kjv-ot-valid (Haggai .. Malachi) + kjv-nt (Matthew .. 2 John)."""
    general, general_valid, domain = (read_docs(f"builtin:{n}") for n in ("kjv-ot", "kjv-ot-valid", "kjv-nt"))
    assert general + general_valid + domain == read_docs("builtin:kjv")
    assert (len(general), len(general_valid), len(domain)) == (909, 20, 236)
    assert _titles(general)[0] == "Genesis 1" and _titles(general)[-1] == "Zephaniah 3"
    assert _titles(general_valid)[0] == "Haggai 1" and _titles(general_valid)[-1] == "Malachi 4"
    assert _titles(domain)[0] == "Matthew 1" and _titles(domain)[-1] == "2 John 1"


@pytest.fixture
def ranged(tmp_path, monkeypatch):
    """builtin:ranged = records 5 .. 16 of a 20-document file."""
    docs = [f"doc {i}" for i in range(20)]
    write_jsonl(tmp_path / "all.jsonl", docs)
    monkeypatch.setattr(sources, "ASSETS", tmp_path)
    monkeypatch.setitem(sources.BUILTIN_CORPORA, "ranged", BuiltinCorpus("all.jsonl", 5, 17))
    return docs[5:17]


def test_a_record_range_shards_over_processes_and_repeats(ranged):
    assert read_docs("builtin:ranged") == ranged
    shards = [read_docs("builtin:ranged", process_index=i, process_count=3) for i in range(3)]
    assert shards == [ranged[i::3] for i in range(3)]  # counted within the range: balanced, disjoint, complete
    it = iter(make_source(SourceConfig(path="builtin:ranged"), num_epochs=2))
    assert sorted(d["text"] for d in it) == sorted(ranged * 2)


@pytest.mark.parametrize("skip", [0, 3, 6, 11])
def test_a_record_range_resumes_exactly(ranged, skip):
    cfg = SourceConfig(path="builtin:ranged")
    it = iter(make_source(cfg, process_index=1, process_count=2))
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint keeps
    expected = [next(it)["text"] for _ in range(10)]  # across the end of the epoch
    fresh = iter(make_source(cfg, process_index=1, process_count=2))
    fresh.set_state(state)
    assert [next(fresh)["text"] for _ in range(10)] == expected
    assert set(expected) == set(ranged[1::2])


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
