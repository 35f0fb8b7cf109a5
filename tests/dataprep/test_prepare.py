"""`jaxllm data prepare`: the stages chained (each one's output the next one's input), complete stages skipped,
a changed setting redoing its stage and those after it, config errors as one line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import yaml

from jaxllm.cli import main
from jaxllm.config import ConfigError
from jaxllm.dataprep import io
from jaxllm.dataprep.prepare import load_prepare_config, run_prepare

EVAL = "the quick brown fox jumps over the lazy dog while the farmer counts his sheep at dawn"


def _corpus(root: Path) -> str:
    chapters = [doc["text"] for _, doc in io.iter_documents("builtin:kjv-nt")][:11]
    d = root / "raw"
    d.mkdir()
    a = [{"text": t} for t in chapters[:6]]
    b = [{"text": t} for t in chapters[6:10]] + [
        {"text": chapters[0], "note": "exact copy"},
        {"text": "Home\nLogin\nCart\nSearch", "note": "junk"},
        {"text": chapters[10] + f"\nAs the saying goes, {EVAL}.", "note": "contaminated"},
    ]
    for name, docs in (("a", a), ("b", b)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (root / "eval.jsonl").write_text(json.dumps({"text": EVAL}) + "\n")
    return str(d / "*.jsonl")


def _config(root: Path, tokenize: bool = True) -> Path:
    cfg = {"prepare": {
        "input": _corpus(root), "output": str(root / "out"), "workers": 1,
        "stages": [
            {"clean": {"language": {"enabled": False}}},
            {"dedup": {"threshold": 0.8}},
            {"decontaminate": {"files": [str(root / "eval.jsonl")]}},
            {"tokenize": {"tokenizer": "builtin:kjv-sp4k", "seq_len": 64, "rows_per_shard": 50}},
        ][:4 if tokenize else 3]}}  # fmt: skip
    path = root / "prep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != "prepare.json"}


def test_prepare_chains_the_stages_and_skips_complete_ones(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["data", "prepare", str(path)]) == 0
    table = capsys.readouterr().out
    assert "decontaminate" in table and "train on the shards with data.sources=[{path: " in table
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["01-clean", "02-dedup", "03-decontaminate", "04-tokenize",
                                                    "prepare.json"]
    record = json.loads((out / "prepare.json").read_text())
    rows = [record[name]["summary"] for name in sorted(record)]
    assert [r["in"] for r in rows] == [13, 12, 11, 10]  # clean drops the junk, dedup the copy, decontaminate one
    assert [r["out"] for r in rows[:3]] == [12, 11, 10]
    stats = json.loads((out / "03-decontaminate" / "stats.json").read_text())
    assert stats["dropped"] == {"decontaminate:eval.jsonl": 1}
    rejected = gzip.decompress((out / "03-decontaminate" / "rejected" / "decontaminate_eval.jsonl.jsonl.gz")
                               .read_bytes()).decode()
    assert json.loads(rejected)["note"] == "contaminated" and json.loads(rejected)["id"] == "b.jsonl:7"
    meta = json.loads((out / "04-tokenize" / "metadata.json").read_text())
    assert meta["seq_len"] == 64 and meta["sources"]["documents"] == 10 and meta["rows"] == rows[3]["out"]

    before = _mtimes(out)
    again = run_prepare(load_prepare_config(path), progress=False, log=lambda _: None)
    assert [r["status"] for r in again] == ["skipped"] * 4 and _mtimes(out) == before

    changed = run_prepare(load_prepare_config(path, ["prepare.stages.1.dedup.mode=exact"]), progress=False,
                          log=lambda _: None)
    assert [r["status"] for r in changed] == ["skipped", "ran", "ran", "ran"]
    assert _mtimes(out)["01-clean/part-00000.jsonl.gz"] == before["01-clean/part-00000.jsonl.gz"]

    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "another evaluation text"}) + "\n")  # edited
    edited = run_prepare(load_prepare_config(path, ["prepare.stages.1.dedup.mode=exact"]), progress=False,
                         log=lambda _: None)
    assert [r["status"] for r in edited] == ["skipped", "skipped", "ran", "ran"] and edited[2]["out"] == 11


@pytest.mark.parametrize("raw, overrides, message", [
    ({"prepare": {"input": "x", "output": "y", "stages": [{"clen": {}}]}}, [],
     r"prepare.stages.0: unknown stage 'clen'; stages are clean, dedup, decontaminate, tokenize"),
    ({"prepare": {"input": "x", "output": "y", "stages": [{"tokenize": {}}, {"clean": {}}]}}, [],
     r"prepare.stages.0: tokenize writes ArrayRecord rows, which no stage reads: put it last"),
    ({"prepare": {"input": "x", "output": "y", "stages": [{"clean": {}, "dedup": {}}]}}, [],
     r"prepare.stages.0 must be one stage, like `- clean: \{...\}`"),
    ({"prepare": {"output": "y", "stages": ["clean"]}}, [], r"prepare.input is not set"),
    ({"prepare": {"input": "x", "output": "y", "stages": ["clean"]}, "data": {}}, [],
     r"unknown top-level key\(s\) data; a data-preparation config holds one `prepare:` block"),
    ({"prepare": {"input": "x", "output": "gs://b/out", "stages": ["clean"]}}, [],
     r"prepare.output gs://b/out is not a local path: .* jaxllm data clean --runner DataflowRunner"),
    ({"prepare": {"input": "x", "output": "y", "stages": ["clean"]}}, ["prepare.engine=spark"],
     r"prepare.engine must be one of local, beam, got 'spark'"),
    ({"prepare": {"input": "x", "output": "y", "stages": [{"clean": {"gopher": {}}}]}}, [],
     r"unknown config key 'prepare.stages.0.clean.gopher'"),
    ({"prepare": {"input": "x", "output": "y", "stages": [{"dedup": {"threshold": 1.5}}]}}, [],
     r"prepare.stages.0.dedup: dedup: threshold"),
    ({"prepare": {"input": "x", "output": "y", "stages": [{"tokenize": {"tokenizer": "builtin:kjv-sp4k",
                                                                      "seq_length": 64}}]}}, [],
     r"tokenize: unknown setting\(s\) seq_length; settings are tokenizer, seq_len, "),
])  # fmt: skip
def test_prepare_config_errors_name_the_fix(tmp_path, raw, overrides, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_prepare_config(path, overrides)


def test_prepare_on_beam_writes_what_the_local_engine_writes(tmp_path):
    pytest.importorskip("apache_beam")
    path = _config(tmp_path, tokenize=False)  # tokenize has no Beam pipeline
    local = run_prepare(load_prepare_config(path), progress=False, log=lambda _: None)
    beam = run_prepare(load_prepare_config(path, ["prepare.engine=beam", f"prepare.output={tmp_path / 'beam'}"]),
                       progress=False, log=lambda _: None)
    assert [(r["in"], r["out"]) for r in beam] == [(r["in"], r["out"]) for r in local]
    files = [p.relative_to(tmp_path / "out") for p in sorted((tmp_path / "out").rglob("*"))
             if p.parent.name == "rejected" or p.name.startswith("part-") and p.parent.name != "_parts"]
    assert len(files) == 3 * 2 + 3  # two parts per stage, the rejected samples of one reason per stage
    for name in files:
        assert (tmp_path / "beam" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name
