"""The Beam pipeline (DirectRunner) writes what the local engine writes: the same part files byte for byte, the
same rejected samples and per-shard files, the same stats; its counters agree."""

from __future__ import annotations

import pytest

from jaxllm.config import JaxllmError
from jaxllm.dataprep import engine
from tests.dataprep.test_engine import DropShort, _corpus, _files, _records

pytest.importorskip("apache_beam")

from jaxllm.dataprep.beam import run_beam  # noqa: E402

_TIMING = ("elapsed_s", "documents_per_s", "cpu_s", "documents_per_s_per_core", "workers", "output", "engine",
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
