"""Duplicate removal (jaxllm/dataprep/dedup.py, minhash.py, dedup_beam.py): exact keys under normalisation,
near-duplicate clusters (transitive), the survivor rule, determinism, the CLI, quality on a synthetic corpus
with known clusters, and the Beam pipeline against the local engine."""

import gzip
import importlib.util
import json
import random
from pathlib import Path

import pytest

from jaxllm.cli import main
from jaxllm.config import JaxllmError
from jaxllm.dataprep.dedup import dedup
from jaxllm.dataprep.minhash import DedupParams, lsh_params, normalize, shingles

ROOT = Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("dedup_quality", ROOT / "tools" / "dedup_quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def _write(path: Path, docs: list, bad_after: int = -1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(d) for d in docs]
    if bad_after >= 0:
        lines.insert(bad_after, "{not json")
    path.write_text("\n".join(lines) + "\n")


def _read(path: Path) -> list:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _kept(out: Path) -> list:
    return [d for part in sorted(out.glob("part-*.jsonl.gz")) for d in _read(part)]


def _words(seed: int, n: int) -> list:
    rng = random.Random(seed)
    vocab = quality.vocabulary()
    return [rng.choice(vocab) for _ in range(n)]


def _substitute(words: list, positions) -> list:
    out = list(words)
    for i in positions:
        out[i] = "zz" + out[i]
    return out


def _jaccard(a: str, b: str) -> float:
    sa, sb = (set(shingles(normalize(t, DedupParams()), 5)) for t in (a, b))
    return len(sa & sb) / len(sa | sb)


def test_exact_dedup_normalises_unicode_case_and_whitespace_and_keeps_the_longest(tmp_path):
    docs = [
        {"id": "a", "text": "Caf\u00e9 au lait", "n": 1},
        {"id": "b", "text": "other text entirely"},
        {"id": "c", "text": "  CAFE\u0301   au\tlait ", "n": 3},  # NFD accent, case, whitespace: longest
        {"id": "d", "text": "cafe au lait"},  # no accent: a different text
        {"id": "e", "text": "caf\u00e9 AU lait"},  # as long as "a": ties go to the first in input order
    ]
    _write(tmp_path / "in" / "x.jsonl", docs)
    stats = dedup(str(tmp_path / "in" / "x.jsonl"), str(tmp_path / "out"), DedupParams(mode="exact"), workers=1)
    assert [d["id"] for d in _kept(tmp_path / "out")] == ["b", "c", "d"]
    assert _kept(tmp_path / "out")[1] == docs[2]  # every field kept as read
    assert stats["dropped"] == {"exact_duplicate": 2} and stats["clusters"]["sizes"] == {"3": 1}
    assert [d["id"] for d in _read(tmp_path / "out" / "rejected" / "exact_duplicate.jsonl.gz")] == ["a", "e"]
    # the survivor rule's tie: equal lengths keep the first in input order
    _write(tmp_path / "in2" / "x.jsonl", [docs[4], docs[0]])
    dedup(str(tmp_path / "in2" / "x.jsonl"), str(tmp_path / "out2"), DedupParams(mode="exact"), workers=1)
    assert [d["id"] for d in _kept(tmp_path / "out2")] == ["e"]
    # case-sensitive: "CAFÉ", "Café" and "café" differ
    dedup(str(tmp_path / "in" / "x.jsonl"), str(tmp_path / "out3"), DedupParams(mode="exact", lowercase=False),
          workers=1)
    assert [d["id"] for d in _kept(tmp_path / "out3")] == ["a", "b", "c", "d", "e"]


def _chain(tmp_path: Path):
    """A, B, C: B is A with 10 words changed in its first half, C is B with 10 more in its second half (and
    one word longer): A~B and B~C are near-duplicates at 0.6, A and C are not."""
    base = _words(1, 300)
    b = _substitute(base, range(3, 150, 15))
    c = _substitute(b, range(153, 300, 15)) + ["amen"]
    texts = [" ".join(w) for w in (base, b, c)]
    assert _jaccard(texts[0], texts[1]) > 0.65 and _jaccard(texts[1], texts[2]) > 0.65
    assert _jaccard(texts[0], texts[2]) < 0.55
    docs = [{"id": "A", "text": texts[0]}, {"id": "x", "text": " ".join(_words(2, 200))},
            {"id": "B", "text": texts[1]}, {"id": "C", "text": texts[2]}, {"id": "y", "text": " ".join(_words(3, 50))}]
    _write(tmp_path / "chain" / "0.jsonl", docs[:3], bad_after=1)  # a bad record between: indices stay aligned
    _write(tmp_path / "chain" / "1.jsonl", docs[3:])
    return str(tmp_path / "chain" / "*.jsonl")


def test_chain_linked_near_duplicates_collapse_to_the_longest(tmp_path):
    inputs = _chain(tmp_path)
    stats = dedup(inputs, str(tmp_path / "out"), DedupParams(threshold=0.6), workers=1, write_clusters=True)
    assert [d["id"] for d in _kept(tmp_path / "out")] == ["x", "C", "y"]
    assert stats["dropped"] == {"near_duplicate": 2} and stats["bad_records"] == 1
    rows = _read(tmp_path / "out" / "clusters.jsonl.gz")
    assert rows == [{"id": "A", "cluster": "C", "kept": False}, {"id": "B", "cluster": "C", "kept": False},
                    {"id": "C", "cluster": "C", "kept": True}]
    # exact mode sees no duplicates here
    stats = dedup(inputs, str(tmp_path / "exact"), DedupParams(mode="exact"), workers=1)
    assert stats["documents_out"] == 5


def test_output_does_not_depend_on_partitions_or_reruns(tmp_path):
    docs = quality.make_corpus(120, seed=3)
    for s in range(3):
        _write(tmp_path / "in" / f"{s}.jsonl", docs[s::3])
    inputs = str(tmp_path / "in" / "*.jsonl")
    first = dedup(inputs, str(tmp_path / "a"), DedupParams(threshold=0.8), workers=1, partitions=1)
    dedup(inputs, str(tmp_path / "b"), DedupParams(threshold=0.8), workers=1, partitions=7)
    assert first["dropped_total"] > 10
    for name in ["part-00000.jsonl.gz", "part-00001.jsonl.gz", "part-00002.jsonl.gz",
                 "rejected/exact_duplicate.jsonl.gz", "rejected/near_duplicate.jsonl.gz"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    again = dedup(inputs, str(tmp_path / "a"), DedupParams(threshold=0.8), workers=1, partitions=1)
    assert again == first  # a finished run of the same plan is not redone


def test_lsh_params_match_datasketch():
    from datasketch.lsh import _optimal_param

    assert lsh_params(0.8, 112, False) == _optimal_param(0.8, 112, 0.5, 0.5) == (9, 12)
    assert lsh_params(0.7, 128, True) == _optimal_param(0.7, 128, 0.1, 0.9)  # scipy's integration: ~1 s each


def test_cli_writes_outputs_and_stats_and_rejects_bad_options(tmp_path, capsys):
    inputs = _chain(tmp_path)
    out = tmp_path / "out"
    assert main(["data", "dedup", "--input", inputs, "--output", str(out), "--threshold", "0.6",
                 "--workers", "1", "--format", "parquet"]) == 0
    assert "5 documents in, 3 out" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["documents_out"] == 3 and (out / "part-00001.parquet").is_file()
    assert (out / "rejected" / "near_duplicate.jsonl.gz").is_file()
    assert main(["data", "dedup", "--input", inputs, "--output", str(out), "--bands", "4"]) == 2
    assert "give both bands and rows" in capsys.readouterr().err
    with pytest.raises(JaxllmError, match="threshold must be a Jaccard similarity"):
        DedupParams(threshold=80)


def test_precision_and_recall_on_a_synthetic_corpus(tmp_path):
    docs = quality.make_corpus(400, seed=1)
    for threshold in (0.7, 0.85):
        r = quality.measure(docs, threshold, tmp_path)
        assert r["truth_pairs"] > 50, r
        assert r["pair_precision_margin"] >= 0.95 and r["pair_recall_margin"] >= 0.95, r
        assert r["removed_precision"] >= 0.95 and r["removed_recall"] >= 0.9, r


def test_beam_direct_runner_removes_the_same_documents(tmp_path):
    pytest.importorskip("apache_beam")
    from jaxllm.dataprep.dedup_beam import dedup_beam

    _chain(tmp_path)  # A - B - C: label propagation needs two rounds
    docs = [json.loads(line) for line in (tmp_path / "chain" / "0.jsonl").read_text().splitlines() if "{n" not in line]
    docs += quality.make_corpus(60, seed=5) + [{"id": "e1", "text": ""}, {"id": "e2", "text": "  "}]
    docs += [json.loads(line) for line in (tmp_path / "chain" / "1.jsonl").read_text().splitlines()]
    for s in range(2):
        _write(tmp_path / "in" / f"{s}.jsonl", docs[s::2])
    inputs, params = str(tmp_path / "in" / "*.jsonl"), DedupParams(threshold=0.6)
    local = dedup(inputs, str(tmp_path / "local"), params, workers=1)
    with pytest.raises(JaxllmError, match="did not converge in 1 rounds"):
        dedup_beam(inputs, str(tmp_path / "beam"), params, rounds=1)
    beam = dedup_beam(inputs, str(tmp_path / "beam"), params, rounds=3)
    assert local["dropped_total"] > 5 and beam["dropped"] == local["dropped"]
    assert beam["clusters"] == local["clusters"]
    for name in ["part-00000.jsonl.gz", "part-00001.jsonl.gz", "rejected/exact_duplicate.jsonl.gz",
                 "rejected/near_duplicate.jsonl.gz"]:
        assert (tmp_path / "beam" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert "C" in [d["id"] for d in _kept(tmp_path / "beam")] and "e2" in [d["id"] for d in _kept(tmp_path / "beam")]
