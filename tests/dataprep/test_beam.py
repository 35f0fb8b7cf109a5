"""The Beam pipeline (DirectRunner) writes what the local engine writes: the same part files byte for byte, the
same rejected samples and per-shard files, the same stats; its counters agree."""

from __future__ import annotations

import pytest

from jaxllm.config import JaxllmError
from jaxllm.dataprep import engine
from tests.dataprep.test_engine import DropShort, _corpus, _files, _records

pytest.importorskip("apache_beam")

from jaxllm.dataprep.beam import run_beam

_TIMING = ("elapsed_s", "documents_per_s", "cpu_s", "documents_per_s_per_core", "workers", "output", "engine",
           "peak_rss_mb",
           "beam_counters")


@pytest.mark.parametrize("fmt", ["jsonl.gz", "parquet"])
def test_beam_direct_runner_writes_what_the_local_engine_writes(tmp_path, fmt):
    d = _corpus(tmp_path)
    inputs = str(d / "**" / "*")
    local = engine.run_local(DropShort(), inputs, str(tmp_path / "local"), workers=1, chunk_bytes=300,
                             samples_per_reason=3, fmt_out=fmt, progress=False)
    beam = run_beam(DropShort(), inputs, str(tmp_path / "beam"), chunk_bytes=300, samples_per_reason=3, fmt_out=fmt)
    assert _files(tmp_path / "beam") == _files(tmp_path / "local")
    assert _records(tmp_path / "beam", fmt) == _records(tmp_path / "local", fmt)
    assert local["shards"] > 3 and beam["engine"] == "beam:DirectRunner"
    assert {k: v for k, v in beam.items() if k not in _TIMING} == {k: v for k, v in local.items() if k not in _TIMING}
    counters = beam["beam_counters"]
    assert counters["documents_in"] == local["documents_in"] and counters["documents_out"] == local["documents_out"]
    assert {k.removeprefix("dropped:"): v for k, v in counters.items() if k.startswith("dropped:")} == local["dropped"]
    assert {k.removeprefix("count:"): v for k, v in counters.items() if k.startswith("count:")} == local["counts"]
    assert counters["bad_records"] == local["bad_records"] == 2


def test_beam_reports_a_bad_record_with_its_file_and_line(tmp_path):
    d = _corpus(tmp_path)
    with pytest.raises(JaxllmError, match=r"a\.jsonl:3: invalid JSON"):
        run_beam(DropShort(), str(d / "a.jsonl"), str(tmp_path / "out"), on_bad_record="error")


def test_beam_reads_and_writes_a_remote_file_system(tmp_path):
    """gs:// and the like: a test file system ("fake://", a directory underneath) stands in for a bucket."""
    import os

    from apache_beam.io.filesystem import FileMetadata
    from apache_beam.io.localfilesystem import LocalFileSystem

    root = str(tmp_path / "bucket")

    class FakeBucket(LocalFileSystem):
        @classmethod
        def scheme(cls):
            return "fake"

        def _local(self, path):
            return os.path.join(root, path.removeprefix("fake://"))

        def _list(self, prefix):
            for meta in super()._list(self._local(prefix)):
                yield FileMetadata("fake://" + os.path.relpath(meta.path, root), meta.size_in_bytes,
                                   meta.last_updated_in_seconds)

        def create(self, path, *args, **kwargs):
            os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
            return super().create(self._local(path), *args, **kwargs)

        def open(self, path, *args, **kwargs):
            return super().open(self._local(path), *args, **kwargs)

    _corpus(tmp_path / "bucket")
    local = engine.run_local(DropShort(), str(tmp_path / "bucket" / "in" / "*.*"), str(tmp_path / "local"),
                             workers=1, samples_per_reason=3, progress=False)
    beam = run_beam(DropShort(), "fake://in/*.*", "fake://out", samples_per_reason=3)
    out = tmp_path / "bucket" / "out"
    assert beam["output"] == "fake://out" and (out / "stats.json").is_file()
    assert {n: b for n, b in _files(out).items() if n != "_parts/plan.json"} == \
        {n: b for n, b in _files(tmp_path / "local").items() if n != "_parts/plan.json"}
    assert beam["bad_record_examples"] == [x.replace(f"{root}/", "fake://") for x in local["bad_record_examples"]]
    assert beam["bad_record_examples"][0].startswith("fake://in/a.jsonl:3: invalid JSON")
    differ = _TIMING + ("inputs", "plan_hash", "parts", "bad_record_examples")
    assert {k: v for k, v in beam.items() if k not in differ} == {k: v for k, v in local.items() if k not in differ}


def test_beam_unknown_runner_is_a_one_line_error(tmp_path):
    d = _corpus(tmp_path)
    with pytest.raises(JaxllmError, match=r"Beam cannot start a pipeline with --runner=NoSuchRunner "
                                          r"\(Unexpected pipeline runner: NoSuchRunner"):
        run_beam(DropShort(), str(d / "c.txt"), str(tmp_path / "out"), runner="NoSuchRunner")
