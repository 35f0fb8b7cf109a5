"""File sources: formats, paths, epochs, exact resume, per-process sharding, bad records."""

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.data.data_testing import read_docs, write_jsonl
from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data.sources import make_source

DOCS = [f"document {i}: " + "word " * (i % 7) + "end." for i in range(40)]


def _parquet(path, texts, row_group_size=7):
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), path, row_group_size=row_group_size)
    return path


@pytest.fixture
def files(tmp_path):
    """The same 40 documents in each format, by name."""
    write_jsonl(tmp_path / "docs.jsonl", DOCS)
    write_jsonl(tmp_path / "docs.jsonl.gz", DOCS, compress=True)
    (tmp_path / "docs.json").write_text("".join(json.dumps({"body": t, "n": 1}) + "\n" for t in DOCS))
    (tmp_path / "paragraphs.txt").write_text("\n\n\n".join(DOCS) + "\n")
    (tmp_path / "lines.txt.gz").write_bytes(gzip.compress(("\n".join(DOCS) + "\n").encode()))
    _parquet(tmp_path / "docs.parquet", DOCS)
    return tmp_path


@pytest.mark.parametrize(
    "name, options",
    [
        ("docs.jsonl", {}),
        ("docs.jsonl.gz", {}),
        ("docs.json", {"text_field": "body"}),
        ("paragraphs.txt", {"text_unit": "paragraph"}),
        ("lines.txt.gz", {"text_unit": "line"}),
        ("docs.parquet", {}),
    ],
)
def test_each_format_reads_every_document(files, name, options):
    assert read_docs(str(files / name), **options) == DOCS


def test_text_units_and_explicit_format(tmp_path):
    (tmp_path / "a.txt").write_text("first line\nsecond line\n\nnext paragraph\r\n")
    assert read_docs(str(tmp_path / "a.txt"), text_unit="paragraph") == ["first line\nsecond line", "next paragraph"]
    assert read_docs(str(tmp_path / "a.txt"), text_unit="line") == ["first line", "second line", "next paragraph"]
    assert read_docs(str(tmp_path / "a.txt"), text_unit="file") == ["first line\nsecond line\n\nnext paragraph\r\n"]
    (tmp_path / "notes.log").write_text("a log line\n")
    assert read_docs(str(tmp_path / "notes.log"), format="text", text_unit="line") == ["a log line"]
    with pytest.raises(JaxllmError, match=r"notes.log: cannot tell the file format from the extension '.log'.*format"):
        read_docs(str(tmp_path / "notes.log"))


def test_globs_and_comma_lists(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "c.txt"]:
        write_jsonl(tmp_path / name, [name])
    (tmp_path / "c.txt").write_text("c.txt\n")
    one_epoch = lambda path: sorted(read_docs(path, text_unit="line"))  # noqa: E731 (order is shuffled per epoch)
    assert one_epoch(f"{tmp_path}/*.jsonl") == ["a.jsonl", "b.jsonl"]
    assert one_epoch(f"{tmp_path}/a.jsonl, {tmp_path}/*.txt,{tmp_path}/a.jsonl") == ["a.jsonl", "c.txt"]
    with pytest.raises(JaxllmError, match=r"path '.*/\*.parquet' matches no files"):
        read_docs(f"{tmp_path}/a.jsonl,{tmp_path}/*.parquet")
    with pytest.raises(JaxllmError, match="is a directory; name its files"):
        read_docs(str(tmp_path))


def test_repeats_with_a_new_file_order_each_epoch(tmp_path):
    for i in range(6):
        write_jsonl(tmp_path / f"{i}.jsonl", [f"file {i}"])
    it = iter(make_source(SourceConfig(path=f"{tmp_path}/*.jsonl"), seed=3))
    epochs = [[next(it)["text"] for _ in range(6)] for _ in range(3)]
    assert all(sorted(e) == [f"file {i}" for i in range(6)] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # shuffled differently per epoch
    assert it.get_state()["epoch"] == 2
    again = iter(make_source(SourceConfig(path=f"{tmp_path}/*.jsonl"), seed=3))
    assert [next(again)["text"] for _ in range(18)] == sum(epochs, [])  # same seed, same order


@pytest.mark.parametrize(
    "name, options",
    [
        ("docs.jsonl", {}),
        ("docs.jsonl.gz", {}),
        ("paragraphs.txt", {"text_unit": "paragraph"}),
        ("docs.parquet", {}),
        ("*", {"format": "auto", "text_field": "text"}),  # several files and formats, text_unit paragraph
    ],
)
@pytest.mark.parametrize("skip", [0, 9, 39, 55])
def test_resume_is_exact(files, name, options, skip):
    path = str(files / name) if name != "*" else f"{files}/docs.jsonl,{files}/docs.parquet,{files}/paragraphs.txt"
    cfg = SourceConfig(path=path, **options)
    it = iter(make_source(cfg, seed=1, process_index=1, process_count=2))
    for _ in range(skip):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint keeps
    expected = [next(it)["text"] for _ in range(30)]
    fresh = iter(make_source(cfg, seed=1, process_index=1, process_count=2))
    fresh.set_state(state)
    assert [next(fresh)["text"] for _ in range(30)] == expected


@pytest.mark.parametrize("num_files, process_count", [(1, 2), (2, 3), (5, 2), (6, 3), (7, 3)])
def test_processes_get_disjoint_complete_shards(tmp_path, num_files, process_count):
    all_docs = []
    for f in range(num_files):
        docs = [f"file {f} doc {i}" for i in range(f + 3)]
        write_jsonl(tmp_path / f"{f}.jsonl", docs)
        all_docs += docs
    shards = [
        read_docs(f"{tmp_path}/*.jsonl", process_index=i, process_count=process_count) for i in range(process_count)
    ]
    assert all(shards)
    assert sorted(sum(shards, [])) == sorted(all_docs)  # complete, and no document twice
    if num_files >= process_count:  # by file: process i reads files i, i+P, ...
        for i, shard in enumerate(shards):
            assert {int(d.split()[1]) for d in shard} == set(range(i, num_files, process_count))


def test_process_index_out_of_range(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(JaxllmError, match=r"process_index=2 must be in \[0, process_count=2\)"):
        read_docs(str(tmp_path / "a.jsonl"), process_index=2, process_count=2)


def test_too_few_documents_for_a_process_is_an_error(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", ["only document"])
    with pytest.raises(JaxllmError, match="yielded no documents in a whole pass for process 1 of 2"):
        read_docs(str(tmp_path / "one.jsonl"), process_index=1, process_count=2)


BAD_JSONL = b"\n".join([
    b'{"text": "good 1"}',
    b'{"text": "unterminated',
    b'["a list"]',
    b'{"body": "no text field"}',
    b'{"text": 42}',
    b'{"text": "bad utf-8 \xff\xfe"}',
    b'',
    b'{"text": "good 2"}',
])  # fmt: skip


def test_bad_records_are_skipped_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_JSONL)
    with caplog.at_level(logging.WARNING, logger="jaxllm.data.sources"):
        assert read_docs(str(path)) == ["good 1", "good 2"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5
    for line, problem in [(2, "invalid JSON"), (3, "expected a JSON object"), (4, "no 'text' field"),
                          (5, "field 'text' holds int 42, expected a string"), (6, "invalid UTF-8")]:  # fmt: skip
        assert any(f"{path}:{line}: {problem}" in m for m in messages), (line, messages)


@pytest.mark.parametrize(
    "line, problem",
    [
        (2, "invalid JSON"), (3, "expected a JSON object"), (4, "no 'text' field"),
        (5, "field 'text' holds int 42, expected a string"), (6, "invalid UTF-8"),
    ],  # fmt: skip
)
def test_bad_records_raise_with_file_and_line(tmp_path, line, problem):
    lines = BAD_JSONL.split(b"\n")
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([lines[0], lines[line - 1]]))  # the bad record on line 2
    with pytest.raises(JaxllmError, match=rf"{path}:2: {problem}.*; fix it or set data.on_bad_record=skip"):
        read_docs(str(path), on_bad_record="error")
    assert line  # (the parameter names which bad record is tested)


def test_bad_files_skip_or_raise(tmp_path, caplog):
    write_jsonl(tmp_path / "a_good.jsonl", ["fine"])
    (tmp_path / "b_empty.jsonl").write_bytes(b"")
    (tmp_path / "c_binary.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "d_fake.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "e_nocolumn.parquet")
    with caplog.at_level(logging.WARNING, logger="jaxllm.data.sources"):
        assert read_docs(f"{tmp_path}/*") == ["fine"]
    log = caplog.text
    assert "b_empty.jsonl: the file is empty" in log
    assert "c_binary.txt: the file looks binary" in log
    assert "d_fake.parquet: not a readable Parquet file" in log
    assert "e_nocolumn.parquet: no column 'text' (columns: body)" in log
    for name, problem in [("b_empty.jsonl", "the file is empty"), ("c_binary.txt", "the file looks binary")]:
        with pytest.raises(JaxllmError, match=f"{name}: {problem}.*data.on_bad_record=skip"):
            read_docs(str(tmp_path / name), on_bad_record="error")


def test_truncated_gzip_skips_the_rest_of_the_file(tmp_path):
    data = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in DOCS * 50).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    write_jsonl(tmp_path / "fine.jsonl", ["fine"])
    docs = read_docs(f"{tmp_path}/*")
    assert "fine" in docs and 0 < len(docs) - 1 < len(DOCS) * 50
    with pytest.raises(JaxllmError, match=r"cut.jsonl.gz:\d+: the file cannot be read from here on"):
        read_docs(str(tmp_path / "cut.jsonl.gz"), on_bad_record="error")


def test_bad_parquet_values_name_the_row(tmp_path):
    _parquet(tmp_path / "p.parquet", ["a", None, "c"], row_group_size=2)
    assert read_docs(str(tmp_path / "p.parquet")) == ["a", "c"]
    with pytest.raises(JaxllmError, match=r"p.parquet: row 2: column 'text' holds NoneType"):
        read_docs(str(tmp_path / "p.parquet"), on_bad_record="error")


def test_warnings_are_rate_limited(tmp_path, caplog):
    (tmp_path / "many.jsonl").write_text("not json\n" * 3000 + '{"text": "ok"}\n')
    with caplog.at_level(logging.WARNING, logger="jaxllm.data.sources"):
        assert read_docs(str(tmp_path / "many.jsonl")) == ["ok"]
    assert len(caplog.records) == 10 + 3  # ten listed, then one line per thousand
    assert "skipped 3000 bad records so far" in caplog.records[-1].getMessage()


def test_a_source_with_no_documents_fails_instead_of_looping(tmp_path):
    (tmp_path / "all_bad.jsonl").write_text('{"body": 1}\n' * 5)
    it = iter(make_source(SourceConfig(path=str(tmp_path / "all_bad.jsonl"))))  # repeats forever
    with pytest.raises(JaxllmError, match="all_bad.jsonl yielded no documents in a whole pass.*text_field"):
        next(it)
