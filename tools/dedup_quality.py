"""Precision and recall of `jaxllm data dedup` on a synthetic corpus with known duplicate clusters.

The corpus: "documents" of sentences of real words (the vocabulary of the bundled KJV corpus, drawn uniformly),
each either unrelated or the source of a cluster of near-copies made by word edits (substitutions, insertions,
deletions) and sentence reorderings, at several target similarities (word 5-gram Jaccard about 0.95, 0.85,
0.7 and 0.5 to the source), plus exact copies. The truth is the set of document pairs whose *actual* shingle
Jaccard is at least the threshold (so a pair's label does not depend on how it was made); precision and recall
are computed for those pairs (a predicted pair = two documents in one output cluster) and for removed
documents (as many should go as the truth clusters' sizes less one each; a removed document is right when it
has a truth pair). MinHash estimates the Jaccard with a standard error of about sqrt(J(1-J)/num_perm) (0.04 at
J=0.8, 112 permutations), so pairs within `margin` of the threshold are a coin toss: `*_margin` scores count a
predicted pair right when its Jaccard is >= threshold - margin and ask recall only of pairs >= threshold +
margin.

    python tools/dedup_quality.py --documents 20000 --thresholds 0.7 0.85 --workers 2
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jaxllm.dataprep.dedup import dedup
from jaxllm.dataprep.minhash import DedupParams, UnionFind, normalize, shingles

LEVELS = (0.95, 0.85, 0.7, 0.5)  # target word 5-gram Jaccard of a near-copy to its source


def vocabulary() -> list[str]:
    words = set()
    with gzip.open(ROOT / "jaxllm" / "assets" / "kjv.jsonl.gz", "rt") as f:
        for line in itertools.islice(f, 200):
            words.update(w.strip(".,;:?!()'\"").lower() for w in json.loads(line)["text"].split())
    return sorted(w for w in words if w.isalpha())


def _sentences(rng: random.Random, vocab: list[str], words: int) -> list[list[str]]:
    out, left = [], words
    while left > 0:
        n = min(left, rng.randint(8, 20))
        out.append([rng.choice(vocab) for _ in range(n)])
        left -= n
    return out


def _edit(rng: random.Random, vocab: list[str], sents: list[list[str]], rate: float, swap: bool) -> list[list[str]]:
    """Substitutions, insertions and deletions at `rate` per word, and with `swap` two sentences reordered."""
    out = []
    for sent in sents:
        new = []
        for w in sent:
            r = rng.random()
            if r < rate / 3:
                new.append(rng.choice(vocab))  # substitution
            elif r < 2 * rate / 3:
                new += [w, rng.choice(vocab)]  # insertion
            elif r < rate:
                continue  # deletion
            else:
                new.append(w)
        out.append(new or [rng.choice(vocab)])
    if swap and len(out) > 2:
        i = rng.randrange(len(out) - 1)
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


# (word edit rate, sentence swap) giving a 5-gram Jaccard near each level for ~200-word documents (an edit
# breaks up to 5 shingles, a swap about 12); measured, and the truth uses the actual Jaccard anyway.
_EDITS = {1.0: (0.0, False), 0.95: (0.005, False), 0.85: (0.008, True), 0.7: (0.026, True), 0.5: (0.056, True)}


def make_corpus(documents: int, seed: int = 0, words: tuple[int, int] = (120, 300)) -> list[dict]:
    """`documents` records {"id", "text", "source"}: about 40% in clusters (sources with 1-4 copies at random
    levels, or exact copies), the rest unrelated; shuffled."""
    rng, vocab = random.Random(seed), vocabulary()
    docs: list[dict] = []
    cluster = 0
    while len(docs) < documents:
        sents = _sentences(rng, vocab, rng.randint(*words))
        if rng.random() < 0.25:
            copies = rng.randint(1, 4)
            docs.append({"text": " ".join(" ".join(s) for s in sents), "source": cluster, "level": 1.0})
            for _ in range(copies):
                level = rng.choice(LEVELS + (1.0,))
                text = " ".join(" ".join(s) for s in _edit(rng, vocab, sents, *_EDITS[level]))
                docs.append({"text": text, "source": cluster, "level": level})
            cluster += 1
        else:
            docs.append({"text": " ".join(" ".join(s) for s in sents), "source": -1, "level": 0.0})
    docs = docs[:documents]
    rng.shuffle(docs)
    for i, d in enumerate(docs):
        d["id"] = f"doc{i:07d}"
    return docs


def pair_jaccards(docs: list[dict], ngram: int = 5) -> dict[tuple[int, int], float]:
    """The actual shingle Jaccard of every pair (i < j) of documents of one generated cluster (documents of
    different clusters are unrelated random text: Jaccard ~0)."""
    p = DedupParams()
    grams = [set(shingles(normalize(d["text"], p), ngram)) for d in docs]
    by_source: dict[int, list[int]] = {}
    for i, d in enumerate(docs):
        if d["source"] >= 0:
            by_source.setdefault(d["source"], []).append(i)
    out = {}
    for members in by_source.values():
        for i, j in itertools.combinations(sorted(members), 2):
            a, b = grams[i], grams[j]
            out[(i, j)] = len(a & b) / max(len(a | b), 1)
    return out


def _components(n: int, pairs) -> list[int]:
    uf = UnionFind(n)
    for i, j in pairs:
        uf.union(i, j)
    return uf.roots().tolist()


def measure(docs: list[dict], threshold: float, workdir: Path, workers: int = 1, margin: float = 0.05,
            **params) -> dict:
    """Runs dedup on `docs` and scores its clusters against the truth at `threshold`."""
    inputs = workdir / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    shards = 4
    for s in range(shards):
        with gzip.open(inputs / f"shard{s}.jsonl.gz", "wt") as f:
            for d in docs[s::shards]:
                f.write(json.dumps(d) + "\n")
    out = workdir / f"out-{threshold}"
    t = time.perf_counter()
    stats = dedup(str(inputs / "*.jsonl.gz"), str(out), DedupParams(threshold=threshold, **params),
                  workers=workers, write_clusters=True)
    seconds = time.perf_counter() - t
    index = {d["id"]: i for i, d in enumerate(docs)}
    clusters: dict[str, list[int]] = {}
    removed = set()
    with gzip.open(out / "clusters.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            clusters.setdefault(row["cluster"], []).append(index[row["id"]])
            if not row["kept"]:
                removed.add(index[row["id"]])
    predicted = {tuple(sorted(p)) for members in clusters.values() for p in itertools.combinations(members, 2)}
    jaccard = pair_jaccards(docs)
    truth = {p for p, j in jaccard.items() if j >= threshold}
    sure = {p for p, j in jaccard.items() if j >= threshold + margin}  # clearly duplicates
    plausible = {p for p, j in jaccard.items() if j >= threshold - margin}  # not clearly distinct
    roots = _components(len(docs), truth)
    should_remove = len(docs) - len(set(roots))
    partnered = {i for pair in truth for i in pair}  # documents with a duplicate at this threshold
    return {
        "threshold": threshold, "margin": margin, "documents": len(docs), "truth_pairs": len(truth),
        "predicted_pairs": len(predicted),
        "pair_precision": _ratio(predicted & truth, predicted), "pair_recall": _ratio(predicted & truth, truth),
        "pair_precision_margin": _ratio(predicted & plausible, predicted),
        "pair_recall_margin": _ratio(predicted & sure, sure),
        "removed": len(removed), "should_remove": should_remove,
        "removed_precision": _ratio(removed & partnered, removed),
        "removed_recall": min(len(removed & partnered), should_remove) / max(should_remove, 1),
        "bands": stats["bands"], "rows": stats["rows"], "seconds": round(seconds, 2),
        "documents_per_s_per_core": stats["documents_per_s_per_core"],
    }  # fmt: skip


def _ratio(hit: set, of: set) -> float:
    return round(len(hit) / len(of), 4) if of else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--documents", type=int, default=20000)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.7, 0.85])
    ap.add_argument("--workers", type=int, default=0, help="0 = all cores")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    docs = make_corpus(args.documents, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        for threshold in args.thresholds:
            print(json.dumps(measure(docs, threshold, Path(tmp), workers=args.workers)))


if __name__ == "__main__":
    main()
