"""Duplicate removal as an Apache Beam pipeline: the same candidate pairs, clusters and survivors as the local
engine (dataprep/dedup.py), so the same output shards, on any Beam runner.

    shards -> sign (length, exact key, band keys, signature per document)
           -> (bucket key, document) -> GroupByKey -> edges (bucket's first document, each other one),
              dropped when their estimated Jaccard is below the threshold (verify)
           -> connected components by min-label propagation: every document of an edge starts labelled with
              itself; each round gives every document the smallest label among itself and its neighbours.
              `rounds` rounds are unrolled in the pipeline; one more round must change nothing (checked
              after the run: else the run fails asking for more rounds). A cluster needs as many rounds as
              its diameter in edges; buckets join documents as stars, so near-duplicate clusters stay shallow.
           -> per cluster, the survivor (the longest text, ties by input order) -> removed documents per
              shard -> each shard rewritten by the engine's per-shard writer (engine.process_shard).
Documents are numbered shard << 40 | index in shard, which sorts in input order. Nothing is collected on one
worker but the cluster-size histogram. The output directory must be a file system every worker writes to (a
local directory with DirectRunner; on Dataflow a shared mount, e.g. Filestore or a GCS FUSE mount).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from jaxllm.config import JaxllmError
from jaxllm.dataprep import engine, io
from jaxllm.dataprep.minhash import (
    EXACT,
    MISSING_EXTRA,
    NEAR,
    DedupParams,
    Signer,
    Verdicts,
    estimated_jaccard,
)
from jaxllm.utils import atomic_write_text

_SHARD_BITS = 40  # documents per shard < 2**40


def _sign(shard: int, shards: tuple, params: DedupParams, text_field: str, id_field: str, on_bad_record: str):
    """(node, length, keys, signature bytes) of each document of one shard."""
    signer = Signer(params)
    empty = np.full(params.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32).tobytes()
    docs = io.read_shard(shards[shard], text_field=text_field, id_field=id_field, bad=io.BadRecords(on_bad_record))
    for index, doc in enumerate(docs):
        keys, sig = signer.keys(doc[text_field])
        yield (shard << _SHARD_BITS) | index, len(doc[text_field]), keys, empty if sig is None else sig.tobytes()


def _bucket_edges(bucket, threshold: float, verify: bool):
    """(first document, other document) of one bucket, in input order; with `verify`, only pairs whose
    estimated Jaccard reaches the threshold (as dedup._group_partition)."""
    _, members = bucket
    members = sorted(members)
    anchor, anchor_sig = members[0]
    for node, sig in members[1:]:
        if verify:
            a, b = np.frombuffer(anchor_sig, np.uint32), np.frombuffer(sig, np.uint32)
            if estimated_jaccard(a, b) < threshold:
                continue
        yield anchor, node


def _spread(joined):
    """One round of min-label propagation: the node's label to itself and to each neighbour."""
    node, grouped = joined
    label = min(grouped["label"])
    yield node, label
    for neighbours in grouped["adjacency"]:
        for other in neighbours:
            yield other, label


def _by_cluster(joined):
    """(cluster label, (-length, node, exact key)) of a document in an edge; counts the documents whose label
    the last round changed (the convergence check)."""
    _, grouped = joined
    label = list(grouped["label"])
    if not label:
        return
    if list(grouped["before"]) != label:
        from apache_beam.metrics import Metrics

        Metrics.counter("jaxllm.dedup", "unconverged").inc()
    yield label[0], next(iter(grouped["info"]))


def _removed(cluster):
    """(shard, (index, EXACT or NEAR)) of each document of a cluster but its survivor; the cluster's size."""
    _, members = cluster
    members = sorted(members)  # (-length, node, exact key): the survivor first
    _, _, survivor_exact = members[0]
    for _, node, exact in members[1:]:
        yield "removed", (node >> _SHARD_BITS, (node & ((1 << _SHARD_BITS) - 1), EXACT if exact == survivor_exact
                                                 else NEAR))
    yield "size", len(members)


def _write_shard(joined, shards: tuple, output: str, options: dict) -> dict:
    shard, grouped = joined
    removed = sorted(grouped["removed"])
    index = np.array([r[0] for r in removed], dtype=np.int64)
    reasons = np.array([r[1] for r in removed], dtype=np.uint8)
    return engine.process_shard(Verdicts(index, reasons), shards[shard], shard, output, options)


def _write_sizes(sizes: list, path: str) -> None:
    atomic_write_text(path, json.dumps(sorted(sizes)))


def dedup_beam(inputs: str, output: str, params: DedupParams | None = None, *, runner: str = "DirectRunner",
               pipeline_args=(), rounds: int = 8, fmt_out: str = "jsonl.gz", text_field: str = "text",
               id_field: str = "id", on_bad_record: str = "skip", samples_per_reason: int = 20,
               chunk_bytes: int = io.DEFAULT_CHUNK_BYTES) -> dict:
    """dedup.dedup as a Beam pipeline on `runner` (module docstring): the same output files and stats.
    `pipeline_args`: Beam options, e.g. ["--project=P", "--region=R", "--temp_location=gs://B/tmp"]."""
    try:
        import apache_beam as beam
        from apache_beam.metrics.metric import MetricsFilter
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise JaxllmError(f"--runner {runner} needs apache-beam; {MISSING_EXTRA}") from None
    if fmt_out not in io.OUTPUT_FORMATS:
        raise JaxllmError(f"dedup: output format must be one of {', '.join(io.OUTPUT_FORMATS)}, got {fmt_out!r}")
    io.BadRecords(on_bad_record)
    if rounds < 1:
        raise JaxllmError(f"dedup: rounds must be >= 1, got {rounds}")
    start = time.perf_counter()
    params = params or DedupParams()
    shards = tuple(io.plan_shards(inputs, chunk_bytes=chunk_bytes))
    signer = Signer(params)
    options = {"format": fmt_out, "text_field": text_field, "id_field": id_field,
               "on_bad_record": on_bad_record, "samples_per_reason": samples_per_reason}
    config = {**dataclasses.asdict(params), "engine": "beam"}
    plan = engine.make_plan("dedup", config, inputs, shards, options)
    if engine.complete(output, plan):
        return json.loads((Path(output) / engine.STATS).read_text())
    out = engine.prepare_output(output, plan, fmt_out)
    work = out / ".dedup-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    verify = params.mode == "minhash" and params.verify
    p = beam.Pipeline(runner=runner, options=PipelineOptions(list(pipeline_args)))
    shard_ids = p | "shards" >> beam.Create(list(range(len(shards))))
    signed = shard_ids | "sign" >> beam.FlatMap(_sign, shards, params, text_field, id_field, on_bad_record)
    info = signed | "info" >> beam.Map(lambda r: (r[0], (-r[1], r[0], r[2][0])))
    edges = (signed
             | "buckets" >> beam.FlatMap(lambda r: [(key, (r[0], r[3])) for key in r[2]])
             | "group buckets" >> beam.GroupByKey()
             | "edges" >> beam.FlatMap(_bucket_edges, params.threshold, verify))
    adjacency = (edges
                 | "both ways" >> beam.FlatMap(lambda e: [e, (e[1], e[0])])
                 | "neighbours" >> beam.GroupByKey()
                 | "lists" >> beam.MapTuple(lambda node, others: (node, sorted(set(others)))))
    labels = adjacency | "start" >> beam.MapTuple(lambda node, _: (node, node))
    for r in range(rounds + 1):
        before = labels
        labels = ({"label": labels, "adjacency": adjacency}
                  | f"join {r}" >> beam.CoGroupByKey()
                  | f"spread {r}" >> beam.FlatMap(_spread)
                  | f"min {r}" >> beam.CombinePerKey(min))
    clusters = ({"before": before, "label": labels, "info": info}
                | "join info" >> beam.CoGroupByKey()
                | "by cluster" >> beam.FlatMap(_by_cluster)
                | "clusters" >> beam.GroupByKey()
                | "survivors" >> beam.FlatMap(_removed))
    removed = clusters | "removed only" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "removed" else [])
    (clusters
     | "sizes only" >> beam.FlatMap(lambda kv: [kv[1]] if kv[0] == "size" else [])
     | "all sizes" >> beam.combiners.ToList()
     | "write sizes" >> beam.Map(_write_sizes, str(work / "sizes.json")))
    ({"shard": shard_ids | "keyed" >> beam.Map(lambda s: (s, None)), "removed": removed}
     | "per shard" >> beam.CoGroupByKey()
     | "write" >> beam.Map(_write_shard, shards, str(out), options))
    result = p.run()
    result.wait_until_finish()
    unconverged = result.metrics().query(MetricsFilter().with_name("unconverged"))["counters"]
    if unconverged and unconverged[0].committed:
        raise JaxllmError(f"dedup: connected components did not converge in {rounds} rounds "
                          f"({unconverged[0].committed} documents still changing); rerun with more rounds")
    parts = engine.finished_parts(out, len(shards))
    parts = [parts[i] for i in range(len(shards))]
    n = sum(part["documents_in"] for part in parts)
    stats = engine.merge_stats(out, parts, plan, engine="beam", workers=0, elapsed=time.perf_counter() - start,
                               processed=n, resumed=0)
    sizes = np.array(json.loads((work / "sizes.json").read_text()), dtype=np.int64)
    shutil.rmtree(work, ignore_errors=True)
    stats.update({
        "runner": runner, "rounds": rounds,
        "clusters": {"count": len(sizes), "documents": int(sizes.sum()), "largest": int(sizes.max(initial=0)),
                     "sizes": {str(k): int(c) for k, c in enumerate(np.bincount(sizes)) if c}},
        "bands": signer.bands, "rows": signer.rows,
    })  # fmt: skip
    atomic_write_text(out / engine.STATS, json.dumps(stats, indent=1) + "\n")
    return stats
