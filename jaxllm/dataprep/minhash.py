"""The pure parts of duplicate removal, shared by the local engine (dataprep/dedup.py) and the Beam
pipeline (dataprep/dedup_beam.py): text normalisation, word n-gram shingles, MinHash signatures
(datasketch), LSH band keys, union-find, and the survivor rule. No I/O here.

Every document gets *bucket keys*: one exact key (a hash of its normalised text) and, for near-duplicate
removal, one key per LSH band (a hash of the band's rows of its MinHash signature). Documents that share a
key are candidates; candidates joined (transitively) form a cluster; each cluster keeps one survivor.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import unicodedata
from array import array

import numpy as np

from jaxllm.config import JaxllmError

_SPACE = re.compile(r"\s+")
_PUNCTUATION = re.compile(r"[^\w\s]")
MISSING_EXTRA = "pip install -e '.[data]'"
KEEP, EXACT, NEAR = 0, 1, 2  # a document's verdict
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate"}


@dataclasses.dataclass(frozen=True)
class DedupParams:
    """What makes two documents duplicates. `mode`: "exact" (same normalised text) or "minhash" (exact, plus
    near-duplicates whose MinHash bands collide). bands/rows: given, or derived from `threshold` (0 = derive)."""

    mode: str = "minhash"
    ngram: int = 5  # words per shingle
    num_perm: int = 112  # as FineWeb: 14 bands x 8 rows
    threshold: float = 0.8  # Jaccard similarity above which documents count as duplicates
    bands: int = 0
    rows: int = 0
    verify: bool = True  # drop candidate pairs whose estimated Jaccard is below `threshold`
    seed: int = 1
    lowercase: bool = True
    unicode: str = "NFC"  # NFC, NFKC, NFD, NFKD or none
    collapse_whitespace: bool = True
    strip_punctuation: bool = False

    def __post_init__(self):
        problems = []
        if self.mode not in ("exact", "minhash"):
            problems.append(f"mode must be exact or minhash, got {self.mode!r}")
        if self.ngram < 1:
            problems.append(f"ngram must be >= 1 (words per shingle, e.g. 5), got {self.ngram}")
        if self.num_perm < 2:
            problems.append(f"num_perm must be >= 2 (e.g. 112 or 128), got {self.num_perm}")
        if not 0.0 < self.threshold <= 1.0:
            problems.append(f"threshold must be a Jaccard similarity in (0, 1], e.g. 0.8; got {self.threshold}")
        if (self.bands > 0) != (self.rows > 0) or self.bands < 0 or self.rows < 0:
            problems.append(f"give both bands and rows (> 0), or neither to derive them from the threshold; got "
                            f"bands={self.bands} rows={self.rows}")
        elif self.bands * self.rows > self.num_perm:
            problems.append(f"bands x rows = {self.bands * self.rows} exceeds num_perm={self.num_perm}; raise "
                            f"num_perm or lower bands/rows")
        if self.unicode not in ("NFC", "NFKC", "NFD", "NFKD", "none"):
            problems.append(f"unicode must be NFC, NFKC, NFD, NFKD or none, got {self.unicode!r}")
        if problems:
            raise JaxllmError("dedup: " + "; ".join(problems))

    def band_shape(self) -> tuple[int, int]:
        """(bands, rows): as given, else lsh_params."""
        if self.bands:
            return self.bands, self.rows
        return lsh_params(self.threshold, self.num_perm, self.verify)


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, verify: bool) -> tuple[int, int]:
    """The (bands, rows), bands x rows <= num_perm, minimising w_fp x (false positive area below `threshold`)
    + w_fn x (false negative area above it), where a pair of Jaccard s becomes a candidate with probability
    1 - (1 - s**rows)**bands: the rule of datasketch's MinHashLSH (datasketch.lsh._optimal_param, whose
    scipy integration costs a second; here a trapezoid rule on a grid, same choices). datasketch weighs both
    0.5; with `verify` false candidates are dropped afterwards and only cost time, so false negatives weigh
    0.9 (threshold 0.8, 112 permutations: 12 x 9 finds a pair at 0.85 with probability 0.96, 9 x 12 0.75)."""
    w_fp, w_fn = (0.1, 0.9) if verify else (0.5, 0.5)
    below = np.linspace(0.0, threshold, 1001)[:, None]
    above = np.linspace(threshold, 1.0, 1001)[:, None]
    best, choice = np.inf, (1, 1)
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1)
        fp = np.trapezoid(1 - (1 - below**rows) ** bands, below[:, 0], axis=0)
        fn = np.trapezoid((1 - above**rows) ** bands, above[:, 0], axis=0)
        error = w_fp * fp + w_fn * fn
        i = int(np.argmin(error))  # the first of equal errors, as datasketch's loop
        if error[i] < best:
            best, choice = error[i], (bands, int(rows[i]))
    return choice


def normalize(text: str, p: DedupParams) -> str:
    """The text as compared: Unicode form, lowercase, punctuation removed, whitespace collapsed (per `p`)."""
    if p.unicode != "none":
        text = unicodedata.normalize(p.unicode, text)
    if p.lowercase:
        text = text.lower()
    if p.strip_punctuation:
        text = _PUNCTUATION.sub(" ", text)
    if p.collapse_whitespace:
        text = _SPACE.sub(" ", text).strip()
    return text


def shingles(normalized: str, ngram: int) -> list[bytes]:
    """The distinct word n-grams of a normalised text (a shorter text is one shingle; an empty one none)."""
    words = normalized.split()
    if len(words) <= ngram:
        return [" ".join(words).encode()] if words else []
    return list({" ".join(words[i:i + ngram]).encode() for i in range(len(words) - ngram + 1)})


def _key(tag: bytes, data: bytes) -> int:
    """A 63-bit bucket key (non-negative in an int64)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=tag).digest(), "little") >> 1


class Signer:
    """Bucket keys and signatures of documents under one DedupParams. Picklable (sent to worker processes
    and Beam workers); the MinHash permutations are made once."""

    def __init__(self, params: DedupParams):
        self.params = params
        self.bands, self.rows = params.band_shape() if params.mode == "minhash" else (0, 0)
        self._template = None
        if params.mode == "minhash":
            try:
                from datasketch import MinHash
            except ImportError:
                raise JaxllmError(f"near-duplicate removal needs datasketch; {MISSING_EXTRA}") from None
            self._template = MinHash(num_perm=params.num_perm, seed=params.seed)

    def signature(self, normalized: str) -> np.ndarray | None:
        """The MinHash signature (uint32 [num_perm]) of a normalised text; None for an empty text (which only
        ever matches other empty texts, by its exact key) or in exact mode."""
        if self._template is None:
            return None
        grams = shingles(normalized, self.params.ngram)
        if not grams:
            return None
        from datasketch import MinHash

        m = MinHash(num_perm=self.params.num_perm, seed=self.params.seed, scheme=self._template.scheme,
                    permutations=self._template.permutations)
        m.update_batch(grams)
        return m.hashvalues

    def keys(self, text: str) -> tuple[list[int], np.ndarray | None]:
        """(bucket keys: the exact key first, then one per band; the signature or None)."""
        normalized = normalize(text, self.params)
        keys = [_key(b"exact", normalized.encode())]
        sig = self.signature(normalized)
        if sig is not None:
            rows = self.rows
            keys += [_key(b"band%d" % b, sig[b * rows:(b + 1) * rows].tobytes()) for b in range(self.bands)]
        return keys, sig


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Fraction of equal MinHash values, row by row ([..., num_perm] -> [...])."""
    return np.mean(sig_a == sig_b, axis=-1)


def survivor_order(length: int, order: tuple) -> tuple:
    """The survivor rule as a sort key (smallest wins): the longest text (characters of the text field),
    ties broken by the earliest in input order ((input file index, record index))."""
    return (-length, *order)


class UnionFind:
    """Disjoint sets over document indices 0..n-1: one int64 per document (8 bytes/doc), path halving;
    the root of a set is its smallest index."""

    def __init__(self, n: int):
        self.parent = array("q", range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, a: int, b: int) -> bool:
        """Joins the sets of a and b; True when they were apart."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if ra < rb:
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb
        return True

    def roots(self) -> np.ndarray:
        """The root of every index (int64 [n]), by pointer jumping over the parent array."""
        roots = np.frombuffer(self.parent, dtype=np.int64).copy()
        while True:
            jumped = roots[roots]
            if np.array_equal(jumped, roots):
                return roots
            roots = jumped


class Verdicts:
    """The filter pass as a per-document stage of the engine: the documents of one shard arrive in order
    (engine.process_shard); the n-th is dropped when n is among `removed` (sorted indices in the shard, with
    their `reasons`: EXACT or NEAR)."""

    name = "dedup"

    def __init__(self, removed: np.ndarray, reasons: np.ndarray):
        self.removed, self.reasons = removed, reasons
        self._next = self._cursor = 0

    def __call__(self, doc: dict) -> tuple[dict | None, str | None]:
        index, self._next = self._next, self._next + 1
        if self._cursor < len(self.removed) and self.removed[self._cursor] == index:
            self._cursor += 1
            return None, REASONS[int(self.reasons[self._cursor - 1])]
        return doc, None
