"""The local engine: shard planning and ids, bad records with file:line, 1 worker == 2 workers byte for byte,
resume, output formats."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from jaxllm.config import JaxllmError
from jaxllm.dataprep import engine, io


@dataclass(frozen=True)
class ShortConfig:
    min_words: int = 3


class DropShort:
    """A test stage: drops documents of fewer than `min_words` words, marks the rest, counts their words."""

    name = "short"

    def __init__(self, min_words: int = 3):
        self.config = ShortConfig(min_words)

    def __call__(self, doc):
        words = len(doc["text"].split())
        if words < self.config.min_words:
            return None, "short:words"
        if "forbidden" in doc["text"]:
            return None, "short:forbidden/word"
        return {**doc, "words": words, engine.COUNTS_FIELD: {"words": words, "docs": 1}}, None


def _lines(n, start=0):
    return [f"document number {i} has a few words" if i % 4 else f"tiny {i}" for i in range(start, start + n)]


def _corpus(root: Path) -> Path:
    d = root / "in"
    (d / "sub").mkdir(parents=True)
    a = [json.dumps({"text": t, "source": "a"}) for t in _lines(30)]
    a[2] = "{not json"  # line 3
    a[5] = json.dumps({"body": "no text field"})  # line 6
    a[7] = json.dumps({"text": "a forbidden word here", "id": "kept-id"})
    (d / "a.jsonl").write_text("\n".join(a) + "\n")
    b = [json.dumps({"text": t, "meta": {"n": i}}) for i, t in enumerate(_lines(40, 100))]
    (d / "sub" / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(b) + "\n").encode(), mtime=0))
    (d / "c.txt").write_text("\n".join(_lines(25, 200)) + "\n\n" + "last line of the text file\n")
    return d


def _records(out: Path, fmt="jsonl.gz"):
    docs = []
    for part in sorted(out.glob(f"part-*.{fmt}")):
        if fmt == "parquet":
            import pyarrow.parquet as pq

            docs.extend(pq.read_table(part).to_pylist())
        else:
            docs.extend(json.loads(line) for line in gzip.decompress(part.read_bytes()).splitlines())
    return docs


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and p.name != "stats.json" and
            not (p.parent.name == "_parts" and p.suffix == ".json" and p.name != "plan.json")}


def test_plan_splits_large_files_without_losing_or_repeating_lines(tmp_path):
    d = _corpus(tmp_path)
    whole = [(s, d) for s, d in io.iter_documents(str(d / "**" / "*"))]
    split = [(s, d) for s, d in io.iter_documents(str(d / "**" / "*"), chunk_bytes=200)]
    shards = io.plan_shards(str(d / "**" / "*"), chunk_bytes=200)
    assert len(shards) > 5 and [s.name for s in io.plan_shards(str(d / "**" / "*"))] == ["a.jsonl", "c.txt",
                                                                                       "sub/b.jsonl.gz"]
    assert sum(s.name == "sub/b.jsonl.gz" for s in shards) == 1  # compressed: never split
    assert [doc for _, doc in split] == [doc for _, doc in whole]
    ids = [doc["id"] for _, doc in whole]
    assert ids[:3] == ["a.jsonl:1", "a.jsonl:2", "a.jsonl:4"]  # line 3 is bad
    assert "kept-id" in ids and "c.txt:27" in ids and "sub/b.jsonl.gz:40" in ids  # c.txt line 26 is blank
    assert len(ids) == len(set(ids)) == 28 + 40 + 26


def test_bad_records_are_counted_with_file_and_line_or_stop_the_run(tmp_path):
    d = _corpus(tmp_path)
    stats = engine.run_local(DropShort(), str(d / "*.jsonl"), str(tmp_path / "out"), workers=1, progress=False)
    assert stats["bad_records"] == 2
    assert stats["bad_record_examples"][0].startswith(f"{d / 'a.jsonl'}:3: invalid JSON")
    assert "a.jsonl:6: no 'text' field" in stats["bad_record_examples"][1]
    with pytest.raises(JaxllmError, match=r"a\.jsonl:3: invalid JSON.*--on-bad-record skip"):
        engine.run_local(DropShort(), str(d / "*.jsonl"), str(tmp_path / "out2"), workers=1, progress=False,
                         on_bad_record="error")


def test_one_worker_and_two_workers_write_identical_outputs(tmp_path):
    d = _corpus(tmp_path)
    runs = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        stats = engine.run_local(DropShort(), str(d / "**" / "*"), str(out), workers=workers, chunk_bytes=300,
                                 samples_per_reason=3, progress=False)
        runs[workers] = (stats, _files(out))
    (s1, f1), (s2, f2) = runs[1], runs[2]
    assert f1 == f2 and s2["workers"] == 2
    assert len([n for n in f1 if n.startswith("part-")]) == s1["shards"] > 3
    timing = ("elapsed_s", "documents_per_s", "cpu_s", "documents_per_s_per_core", "workers", "output",
              "peak_rss_mb")
    assert {k: v for k, v in s1.items() if k not in timing} == {k: v for k, v in s2.items() if k not in timing}
    assert s1["documents_in"] == 28 + 40 + 26
    assert s1["dropped"] == {"short:forbidden/word": 1, "short:words": 25}
    assert s1["documents_out"] == s1["documents_in"] - 26 == s1["counts"]["docs"]
    docs = _records(tmp_path / "out1")
    assert s1["counts"]["words"] == sum(doc["words"] for doc in docs)
    assert all(engine.COUNTS_FIELD not in doc for doc in docs)
    assert docs[0] == {"text": "document number 1 has a few words", "source": "a", "id": "a.jsonl:2", "words": 7}
    assert {"text": "document number 101 has a few words", "meta": {"n": 1}, "id": "sub/b.jsonl.gz:2",
            "words": 7} in docs  # every field kept
    rejected = tmp_path / "out1" / "rejected"
    assert sorted(p.name for p in rejected.iterdir()) == ["short_forbidden_word.jsonl.gz", "short_words.jsonl.gz"]
    samples = [json.loads(x) for x in gzip.decompress((rejected / "short_words.jsonl.gz").read_bytes()).splitlines()]
    assert [s["id"] for s in samples] == ["a.jsonl:1", "a.jsonl:5", "a.jsonl:9"]  # the first 3, in input order


def test_rerun_skips_finished_shards_and_redoes_changed_settings(tmp_path):
    d = _corpus(tmp_path)
    out = tmp_path / "out"
    args = (str(d / "**" / "*"), str(out))
    first = engine.run_local(DropShort(), *args, workers=1, chunk_bytes=400, progress=False)
    before = _files(out)
    assert first["resumed_shards"] == 0
    plan = engine.make_plan("short", engine.stage_config(DropShort()), args[0],
                            io.plan_shards(args[0], chunk_bytes=400), json.loads(
                                (out / "_parts" / "plan.json").read_text())["options"])
    assert engine.complete(out, plan)
    (out / "_parts" / "part-00001.json").unlink()  # as if killed before shard 1 finished
    (out / "part-00001.jsonl.gz").unlink()
    again = engine.run_local(DropShort(), *args, workers=1, chunk_bytes=400, progress=False)
    assert again["resumed_shards"] == first["shards"] - 1 and again["documents_in"] == first["documents_in"]
    assert _files(out) == before
    changed = engine.run_local(DropShort(min_words=7), *args, workers=1, chunk_bytes=400, progress=False)
    assert changed["resumed_shards"] == 0 and changed["documents_out"] < first["documents_out"]
    assert not engine.complete(out, plan)


def test_parquet_in_and_out_keep_every_field(tmp_path):
    d = _corpus(tmp_path)
    engine.run_local(DropShort(), str(d / "sub" / "*"), str(tmp_path / "pq"), workers=1, fmt_out="parquet",
                     progress=False)
    docs = _records(tmp_path / "pq", "parquet")
    assert docs == _records_of(DropShort(), d / "sub" / "*")
    again = tmp_path / "again"  # Parquet as input: ids and fields survive
    stats = engine.run_local(DropShort(), str(tmp_path / "pq" / "*.parquet"), str(again), workers=1, progress=False)
    assert stats["documents_in"] == len(docs) and _records(again) == docs


def _records_of(stage, inputs):
    docs = []
    for _, doc in io.iter_documents(str(inputs)):
        kept, _ = stage(doc)
        if kept is not None:
            kept.pop(engine.COUNTS_FIELD)
            docs.append(kept)
    return docs


def test_shard_writer_refuses_a_field_parquet_cannot_hold_and_leaves_no_file(tmp_path):
    path = tmp_path / "x.parquet"
    with pytest.raises(JaxllmError, match="fields \\['extra'\\] that the first rows lack"):
        with io.ShardWriter(path, "parquet") as w:
            for i in range(1001):
                w.write({"text": "t", "id": str(i)})
            w.write({"text": "t", "id": "new", "extra": 1})
            w.commit()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"fmt_out": "csv"}, r"output format 'csv' is not one of jsonl.gz, parquet"),
    ({"on_bad_record": "ignore"}, r"on_bad_record must be skip or error, got 'ignore'"),
    ({"workers": -1}, r"workers must be 0 \(all cores\) or more, got -1"),
    ({"chunk_bytes": 0}, r"chunk_bytes must be at least 1, got 0"),
    ({"samples_per_reason": -1}, r"samples_per_reason must be 0 or more, got -1"),
])  # fmt: skip
def test_bad_engine_options_are_one_line_errors(tmp_path, kwargs, message):
    d = _corpus(tmp_path)
    with pytest.raises(JaxllmError, match=message):
        engine.run_local(DropShort(), str(d / "c.txt"), str(tmp_path / "out"), progress=False, **kwargs)
    with pytest.raises(JaxllmError, match=r"matches no files"):
        engine.run_local(DropShort(), str(d / "nothing*.jsonl"), str(tmp_path / "out"), progress=False)


class _Unpicklable(DropShort):
    def __init__(self):
        super().__init__()
        self.rule = lambda text: len(text) > 3  # a lambda cannot be pickled


def test_a_stage_workers_cannot_receive_is_a_one_line_error(tmp_path):
    d = _corpus(tmp_path)
    with pytest.raises(JaxllmError, match=r"stage 'short' cannot be sent to worker processes \(.*\); make it "
                                          r"picklable or run with workers=1"):
        engine.run_local(_Unpicklable(), str(d / "**" / "*"), str(tmp_path / "out"), workers=2, chunk_bytes=300,
                         progress=False)


def test_every_range_size_reads_each_line_once(tmp_path):
    """Ranges of any size, ends falling on line starts, blank lines, CRLF and a last line without a newline."""
    path = tmp_path / "t.txt"
    path.write_bytes(b"alpha one\r\n\nbeta\n\n\ngamma three words\nd\r\n\nepsilon at the end")
    whole = [doc for _, doc in io.iter_documents(str(path))]
    assert [d["id"] for d in whole] == ["t.txt:1", "t.txt:3", "t.txt:6", "t.txt:7", "t.txt:9"]
    for chunk in range(1, 60):
        assert [doc for _, doc in io.iter_documents(str(path), chunk_bytes=chunk)] == whole, chunk


def test_a_large_parquet_file_is_split_by_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": [f"row {i} " * (i % 7 + 1) for i in range(100)], "n": list(range(100))}),
                   path, row_group_size=10)
    whole = [doc for _, doc in io.iter_documents(str(path))]
    assert [d["id"] for d in whole] == [f"p.parquet:{i}" for i in range(1, 101)]
    for chunk in (1, 150, 400, 1000):
        shards = io.plan_shards(str(path), chunk_bytes=chunk)
        assert len(shards) > 1 and shards[-1].stop is None
        assert [doc for _, doc in io.iter_documents(str(path), chunk_bytes=chunk)] == whole, chunk
