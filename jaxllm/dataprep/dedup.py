"""Exact and near-duplicate removal on one machine, all cores, in memory bounded by one partition.

Passes (each input shard in a worker process where the pass is per shard):
  1. sign:   each document -> its length, exact key, MinHash signature and band keys (dataprep/minhash.py);
             written per shard as (bucket key, document index) pairs ordered by partition (key %
             partitions), plus the signatures (for verification), lengths and exact keys.
  2. group:  one partition at a time (memory = that partition: 16 bytes x keys x documents / partitions):
             sort by key; every document of a bucket is a candidate of the bucket's first document (input
             order); a candidate pair whose estimated Jaccard is below the threshold is dropped (`verify`);
             the rest join a union-find over document indices (8 bytes per document).
  3. choose: clusters = connected components; each keeps one survivor (the longest text, ties by input
             order). Memory: about 40 bytes per document (parent, root, length, exact key and sort order
             as int64) plus one byte of verdict.
  4. filter: each shard rewritten with its surviving documents, all fields, in input order, by the engine's
             per-shard writer (engine.process_shard): part-NNNNN files, rejected samples, stats.json.
The Beam pipeline (dataprep/dedup_beam.py) makes the same candidate pairs and so the same survivors.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import resource
import shutil
import time
from pathlib import Path

import numpy as np

from jaxllm.config import JaxllmError
from jaxllm.dataprep import engine, io
from jaxllm.dataprep.minhash import (
    EXACT,
    KEEP,
    NEAR,
    DedupParams,
    Signer,
    UnionFind,
    Verdicts,
    estimated_jaccard,
)
from jaxllm.utils import atomic_write_bytes, atomic_write_text

_EDGE_CHUNK = 1 << 16  # candidate pairs verified at a time


@dataclasses.dataclass(frozen=True)
class Job:
    """What every worker needs (picklable)."""

    shards: tuple[io.Shard, ...]
    work: str
    params: DedupParams
    partitions: int
    text_field: str
    id_field: str
    on_bad_record: str
    keep_ids: bool  # write each shard's document ids (for clusters.jsonl.gz)


def _sign_shard(job: Job, shard: int) -> dict:
    """Pass 1 for one shard: writes keys-S.bin (the pair count of each partition, then the (key, index in shard)
    int64 pairs ordered by partition), meta-S.bin ((length, exact key) int64 per document), sig-S.bin (uint32
    [documents, num_perm], with `verify`) and ids-S.json (with `keep_ids`)."""
    cpu = time.process_time()
    signer = Signer(job.params)
    verify = job.params.mode == "minhash" and job.params.verify
    keys, owners, lengths, exact, sigs, ids = [], [], [], [], [], []
    empty = np.full(job.params.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)  # an empty text's
    docs = io.read_shard(job.shards[shard], text_field=job.text_field, id_field=job.id_field,
                         bad=io.BadRecords(job.on_bad_record))
    for index, doc in enumerate(docs):
        doc_keys, sig = signer.keys(doc[job.text_field])
        keys += doc_keys
        owners += [index] * len(doc_keys)
        lengths.append(len(doc[job.text_field]))
        exact.append(doc_keys[0])
        if verify:
            sigs.append(empty if sig is None else sig)
        if job.keep_ids:
            ids.append(doc[job.id_field])
    keys_a, owners_a = np.array(keys, dtype=np.int64), np.array(owners, dtype=np.int64)
    part = keys_a % job.partitions
    order = np.argsort(part, kind="stable")
    counts = np.bincount(part, minlength=job.partitions).astype(np.int64)
    pairs = np.stack([keys_a[order], owners_a[order]], axis=1)
    atomic_write_bytes(f"{job.work}/keys-{shard}.bin", counts.tobytes() + pairs.tobytes())
    meta = np.stack([np.array(lengths, dtype=np.int64), np.array(exact, dtype=np.int64)], axis=1)
    atomic_write_bytes(f"{job.work}/meta-{shard}.bin", meta.tobytes())
    if verify:
        sig_a = np.stack(sigs) if sigs else np.zeros((0, job.params.num_perm), np.uint32)
        atomic_write_bytes(f"{job.work}/sig-{shard}.bin", sig_a.tobytes())
    if job.keep_ids:
        atomic_write_text(f"{job.work}/ids-{shard}.json", json.dumps(ids))
    return {"documents": len(lengths), "cpu_seconds": time.process_time() - cpu}


def _group_partition(job: Job, p: int, offsets: np.ndarray, uf: UnionFind, sigs: list) -> dict:
    """Pass 2 for one partition: candidate pairs from shared keys, verified, joined in `uf`."""
    parts = []
    for shard in range(len(job.shards)):
        path = f"{job.work}/keys-{shard}.bin"
        counts = np.fromfile(path, dtype=np.int64, count=job.partitions)
        skip = 8 * (job.partitions + 2 * int(counts[:p].sum()))
        pairs = np.fromfile(path, dtype=np.int64, count=2 * int(counts[p]), offset=skip).reshape(-1, 2)
        parts.append(pairs + np.array([0, offsets[shard]]))
    pairs = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    key, doc = pairs[order, 0], pairs[order, 1]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    anchor = doc[np.maximum.accumulate(np.where(first, np.arange(len(key)), 0))]
    a, b = anchor[~first], doc[~first]
    keep = a != b  # a document listed twice under one key (two equal bands) is no pair
    a, b = a[keep], b[keep]
    if len(a):
        pair = np.unique(np.stack([a, b], axis=1), axis=0)
        a, b = pair[:, 0], pair[:, 1]
    candidates, rejected = len(a), 0
    if sigs:
        passed = np.ones(len(a), dtype=bool)
        for start in range(0, len(a), _EDGE_CHUNK):
            sl = slice(start, start + _EDGE_CHUNK)
            similarity = estimated_jaccard(_gather(sigs, offsets, a[sl]), _gather(sigs, offsets, b[sl]))
            passed[sl] = similarity >= job.params.threshold
        rejected = int((~passed).sum())
        a, b = a[passed], b[passed]
    for x, y in zip(a.tolist(), b.tolist()):
        uf.union(x, y)
    return {"candidate_edges": candidates, "rejected_edges": rejected}


def _gather(sigs: list, offsets: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Signature rows of global document indices, from the per-shard memory maps."""
    out = np.empty((len(index), sigs[0].shape[1] if sigs else 0), dtype=np.uint32)
    shard = np.searchsorted(offsets, index, side="right") - 1
    for s in np.unique(shard):
        mask = shard == s
        out[mask] = sigs[s][index[mask] - offsets[s]]
    return out


def choose_survivors(roots: np.ndarray, lengths: np.ndarray, exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(verdict per document: KEEP, EXACT or NEAR; the survivor's index per document). The survivor of a
    cluster is the longest document, ties by the smallest index (input order); a removed document is an
    exact duplicate when its exact key equals its survivor's."""
    n = len(roots)
    index = np.arange(n, dtype=np.int64)
    order = np.lexsort((index, -lengths, roots))
    head = np.ones(n, dtype=bool)
    head[1:] = roots[order][1:] != roots[order][:-1]
    survivor_of_root = np.empty(n, dtype=np.int64)
    survivor_of_root[roots[order][head]] = order[head]
    survivor = survivor_of_root[roots]
    verdict = np.where(exact == exact[survivor], EXACT, NEAR).astype(np.uint8)
    verdict[survivor == index] = KEEP
    return verdict, survivor


def _filter_shard(job: Job, shard: int, output: str, options: dict) -> dict:
    cpu = time.process_time()
    verdict = np.fromfile(f"{job.work}/verdict-{shard}.bin", dtype=np.uint8)
    removed = np.flatnonzero(verdict)
    stats = engine.process_shard(Verdicts(removed, verdict[removed]), job.shards[shard], shard, output, options)
    return {**stats, "cpu_seconds": time.process_time() - cpu}


def dedup(inputs: str, output: str, params: DedupParams | None = None, *, workers: int = 0,
          fmt_out: str = "jsonl.gz", text_field: str = "text", id_field: str = "id", on_bad_record: str = "skip",
          partitions: int = 16, samples_per_reason: int = 20, write_clusters: bool = False,
          chunk_bytes: int = io.DEFAULT_CHUNK_BYTES) -> dict:
    """Removes duplicates from the documents of `inputs` (files, a glob, comma-separated; io.plan_shards) into
    `output`: part-NNNNN.<fmt> per input shard (survivors in input order, every field), stats.json,
    rejected/<reason>.jsonl.gz (the first removed documents of each reason) and, with `write_clusters`,
    clusters.jsonl.gz (per document of a cluster of two or more, in input order: its id, the id of its
    cluster's survivor, whether it is kept). A finished run of the same plan is not redone. Returns the stats."""
    if fmt_out not in io.OUTPUT_FORMATS:
        raise JaxllmError(f"dedup: output format must be one of {', '.join(io.OUTPUT_FORMATS)}, got {fmt_out!r}")
    io.BadRecords(on_bad_record)  # checks the policy's name
    if partitions < 1:
        raise JaxllmError(f"dedup: partitions must be >= 1 (e.g. 16), got {partitions}")
    if samples_per_reason < 0:
        raise JaxllmError(f"dedup: samples_per_reason must be 0 or more, got {samples_per_reason}")
    start, cpu = time.perf_counter(), time.process_time()
    params = params or DedupParams()
    shards = io.plan_shards(inputs, chunk_bytes=chunk_bytes)
    signer = Signer(params)  # checks the extras before starting workers
    options = {"format": fmt_out, "text_field": text_field, "id_field": id_field,
               "on_bad_record": on_bad_record, "samples_per_reason": samples_per_reason}
    config = {**dataclasses.asdict(params), "partitions": partitions, "clusters": write_clusters}
    plan = engine.make_plan("dedup", config, inputs, shards, options)
    if engine.complete(output, plan):
        return json.loads((Path(output) / engine.STATS).read_text())
    out = engine.prepare_output(output, plan, fmt_out)  # dedup is global: an unfinished run is redone whole
    work = out / ".dedup-work"
    shutil.rmtree(work, ignore_errors=True)
    (out / "clusters.jsonl.gz").unlink(missing_ok=True)
    job = Job(tuple(shards), str(work), params, partitions, text_field, id_field, on_bad_record, write_clusters)
    workers = min(engine.resolve_workers(workers), len(shards))
    seconds = {}
    with _pool(workers) as pool:
        t = time.perf_counter()
        signed = _map(pool, _sign_shard, [(job, s) for s in range(len(shards))])
        seconds["sign"] = time.perf_counter() - t
        t = time.perf_counter()
        offsets = np.concatenate([[0], np.cumsum([r["documents"] for r in signed])]).astype(np.int64)
        survivor, sizes, pairs = _cluster(job, offsets)
        seconds["group"] = time.perf_counter() - t
        t = time.perf_counter()
        parts = _map(pool, _filter_shard, [(job, s, str(out), options) for s in range(len(shards))])
        seconds["filter"] = time.perf_counter() - t
    if write_clusters:
        _write_clusters(job, out / "clusters.jsonl.gz", offsets, survivor, sizes)
    shutil.rmtree(work, ignore_errors=True)
    n = int(offsets[-1])
    elapsed = time.perf_counter() - start
    stats = engine.merge_stats(out, parts, plan, engine="local", workers=workers, elapsed=elapsed, processed=n,
                               resumed=0)
    cpu_total = time.process_time() - cpu + sum(r["cpu_seconds"] for r in signed + parts)
    cluster_sizes = sizes[sizes > 1]
    stats.update({
        "documents_per_s_per_core": round(n / cpu_total, 1) if cpu_total > 0 else None,
        "cpu_s": round(cpu_total, 3),
        "clusters": {"count": len(cluster_sizes), "documents": int(cluster_sizes.sum()),
                     "largest": int(cluster_sizes.max(initial=0)),
                     "sizes": {str(k): int(c) for k, c in enumerate(np.bincount(cluster_sizes)) if c}},
        **pairs, "bands": signer.bands, "rows": signer.rows,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "peak_rss_mb_main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })  # fmt: skip
    atomic_write_text(out / engine.STATS, json.dumps(stats, indent=1) + "\n")
    return stats


def _cluster(job: Job, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Passes 2 and 3: (survivor index per document, -1 when alone; cluster size by root index; edge counts);
    writes each shard's verdicts to verdict-S.bin."""
    n, count = int(offsets[-1]), len(job.shards)
    sigs = []
    if job.params.mode == "minhash" and job.params.verify:
        sigs = [np.memmap(f"{job.work}/sig-{s}.bin", dtype=np.uint32, mode="r").reshape(-1, job.params.num_perm)
                if offsets[s + 1] > offsets[s] else np.zeros((0, job.params.num_perm), np.uint32)
                for s in range(count)]
    uf, pairs = UnionFind(n), {"candidate_edges": 0, "rejected_edges": 0}
    for p in range(job.partitions):
        for k, v in _group_partition(job, p, offsets, uf, sigs).items():
            pairs[k] += v
    del sigs
    roots = uf.roots()
    del uf
    meta = np.concatenate([np.fromfile(f"{job.work}/meta-{s}.bin", dtype=np.int64).reshape(-1, 2)
                           for s in range(count)])
    lengths, exact = meta[:, 0], meta[:, 1]
    verdict, survivor = choose_survivors(roots, lengths, exact)
    sizes = np.bincount(roots, minlength=n)
    survivor = np.where(sizes[roots] > 1, survivor, -1)  # -1: alone in its cluster
    for s in range(count):
        atomic_write_bytes(f"{job.work}/verdict-{s}.bin", verdict[offsets[s]:offsets[s + 1]].tobytes())
    return survivor, sizes, pairs


def _write_clusters(job: Job, path: Path, offsets: np.ndarray, survivor: np.ndarray, sizes: np.ndarray) -> None:
    """clusters.jsonl.gz from the ids kept in pass 1 (memory: the ids of one shard, and of the survivors)."""
    wanted = np.unique(survivor[survivor >= 0])
    survivor_id = {}
    for s in range(len(job.shards)):
        ids = json.loads(Path(f"{job.work}/ids-{s}.json").read_text())
        for i in wanted[(wanted >= offsets[s]) & (wanted < offsets[s + 1])].tolist():
            survivor_id[i] = ids[i - offsets[s]]
    rows = []
    for s in range(len(job.shards)):
        ids = json.loads(Path(f"{job.work}/ids-{s}.json").read_text())
        for i in np.flatnonzero(survivor[offsets[s]:offsets[s + 1]] >= 0).tolist():
            head = int(survivor[offsets[s] + i])
            rows.append({"id": ids[i], "cluster": survivor_id[head], "kept": bool(head == offsets[s] + i)})
    io.write_jsonl_gz(path, rows)


class _Inline:
    """A stand-in for a process pool when one worker is asked for (tests, small inputs)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _pool(workers: int):
    if workers <= 1:
        return _Inline()
    return multiprocessing.get_context("spawn").Pool(workers)  # no fork: the parent may hold threads (JAX)


def _call(args):
    fn, rest = args[0], args[1:]
    return fn(*rest)


def _map(pool: multiprocessing.pool.Pool | None, fn, arglist: list) -> list:
    if pool is None:
        return [fn(*a) for a in arglist]
    return pool.map(_call, [(fn, *a) for a in arglist], chunksize=1)


def dedup_command(args) -> int:
    """`jaxllm data dedup` (cli.py): the options as parsed there."""
    params = DedupParams(mode=args.mode, ngram=args.ngram, num_perm=args.num_perm, threshold=args.threshold,
                         bands=args.bands, rows=args.rows, verify=not args.no_verify, seed=args.seed,
                         lowercase=not args.case_sensitive, unicode=args.unicode,
                         collapse_whitespace=not args.keep_whitespace, strip_punctuation=args.strip_punctuation)
    common = {"fmt_out": args.format, "text_field": args.text_field, "id_field": args.id_field,
              "on_bad_record": args.on_bad_record, "samples_per_reason": args.samples_per_reason}
    if args.runner == "local":
        if args.pipeline_arg:
            raise JaxllmError("--pipeline-arg is for Beam runners; add --runner DirectRunner (or DataflowRunner, ...)")
        stats = dedup(args.input, args.output, params, workers=args.workers, partitions=args.partitions,
                      write_clusters=args.clusters, **common)
    else:
        from jaxllm.dataprep.dedup_beam import dedup_beam

        if args.clusters:
            raise JaxllmError("--clusters is written by the local runner only; drop it or use --runner local")
        stats = dedup_beam(args.input, args.output, params, runner=args.runner, pipeline_args=args.pipeline_arg,
                           **common)
    dropped = ", ".join(f"{n} {reason}" for reason, n in stats["dropped"].items()) or "none"
    print(f"dedup: {stats['documents_in']} documents in, {stats['documents_out']} out (dropped: {dropped}); "
          f"{stats['clusters']['count']} clusters; wrote {args.output}")
    return 0
