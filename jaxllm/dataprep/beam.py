"""A per-document stage (engine.DocStage) as an Apache Beam pipeline: the same shards, documents, output files
and stats as the local engine (engine.run_local), on any Beam runner (DirectRunner here; Dataflow, Flink, Spark
on clusters: docs/data.md).

    Create(shards) -> Reshuffle                      one element per input shard (io.plan_shards)
      -> ReadAndApply                                io.read_shard (same parsing, ids, bad records), the stage;
                                                     Beam counters: documents_in/out, dropped:<reason>, count:<name>
         kept:    (shard, (position, doc)) -> GroupByKey -> sorted by position -> part-NNNNN.<fmt> (io.ShardWriter)
         dropped: ((shard, reason), (position, doc)) -> Count + the first `samples_per_reason` by position
         shard:   (shard, documents in, bad records, seconds)
      -> CoGroupByKey(shard) -> _parts/part-NNNNN.json + .rejected.jsonl.gz   (the local engine's per-shard files)
    then engine.merge_stats: stats.json and rejected/<reason>.jsonl.gz, as the local engine writes them.

A shard's kept documents meet on one worker to be written in order (a shard is at most `chunk_bytes` of a large
file, or one input file). Inputs and OUTPUT may be local paths (DirectRunner, or a file system every worker
mounts) or any Beam file system such as gs://: a remote input shard is copied to the worker's local disk to be
read, and the files written are made locally and copied up. Remote inputs are not split into ranges.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from jaxllm.config import JaxllmError
from jaxllm.data import readers
from jaxllm.dataprep import engine, io
from jaxllm.utils import atomic_write_text

NAMESPACE = "jaxllm.dataprep"
MISSING = "apache-beam is not installed; pip install -e '.[data]' (or pip install apache-beam)"


def import_beam() -> Any:
    """apache_beam, imported without the warnings its Google Cloud modules log (on the root logger) when their
    optional clients are missing."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        import apache_beam as beam
    except ImportError:
        raise JaxllmError(MISSING) from None
    finally:
        root.setLevel(level)
    return beam


def make_pipeline(runner: str, pipeline_args: Sequence[str]) -> Any:
    """A Beam pipeline on `runner` with `pipeline_args`. "DirectRunner" runs as Beam's FnApiRunner in this
    process: the batch engine Beam's DirectRunner itself picks, without its first attempt to download and start
    the Prism runner (a network fetch). Beam's INFO logs are kept out of the command's output."""
    beam = import_beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    beam_logger = logging.getLogger("apache_beam")
    if beam_logger.level == logging.NOTSET:
        beam_logger.setLevel(logging.WARNING)
    args = [f"--runner={'FnApiRunner' if runner == 'DirectRunner' else runner}", *pipeline_args]
    try:
        return beam.Pipeline(options=PipelineOptions(args))
    except Exception as e:  # unknown runner names and bad flags
        raise JaxllmError(f"Beam cannot start a pipeline with --runner={runner} ({e})") from None


def is_remote(path: str) -> bool:
    return "://" in path


# Files on any Beam file system: local paths directly, remote ones staged through the worker's local disk.

@contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding the file `path` (itself when local; else a temporary copy)."""
    if not is_remote(path):
        yield path
        return
    from apache_beam.io.filesystems import FileSystems

    suffix = "".join(Path(path).suffixes[-2:])
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as out, FileSystems.open(path, compression_type="uncompressed") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        yield tmp
    finally:
        os.unlink(tmp)


def put(local: str | Path, dest: str) -> None:
    """Copies a finished local file to `dest` on a remote file system (atomic there: one object write)."""
    from apache_beam.io.filesystems import FileSystems

    with open(local, "rb") as src, FileSystems.create(dest, compression_type="uncompressed") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def plan_remote(inputs: str) -> list[io.Shard]:
    """The shards of remote inputs (a glob or comma list on a Beam file system): one per file, sorted."""
    from apache_beam.io.filesystems import FileSystems

    files: set[str] = set()
    for part in (p.strip() for p in inputs.split(",") if p.strip()):
        found = [m.path for r in FileSystems.match([part]) for m in r.metadata_list]
        if not found:
            raise JaxllmError(f"input {part!r} matches no files; check the path or glob")
        files.update(found)
    ordered = sorted(files)
    root = os.path.dirname(os.path.commonprefix(ordered)) if len(ordered) > 1 else os.path.dirname(ordered[0])
    return [io.Shard(f, readers.file_format(f, ""), f[len(root):].lstrip("/")) for f in ordered]


# The pipeline's functions (module level: pickled to the workers).

class _ReadAndApply:
    """DoFn body: one shard's documents through the stage (see the module docstring for the outputs)."""

    def __init__(self, stage: engine.DocStage, options: dict):
        self.stage, self.options = stage, options

    def __call__(self, task: tuple[int, io.Shard]):
        beam = import_beam()
        from apache_beam.metrics import Metrics

        index, shard = task
        start, cpu = time.perf_counter(), time.process_time()
        bad = io.BadRecords(self.options["on_bad_record"])
        docs_in = docs_out = 0
        dropped: Counter = Counter()
        with local_copy(shard.path) as path:
            local = shard if path == shard.path else io.Shard(path, shard.fmt, shard.name)

            def report(where: str, problem: str) -> None:  # a staged copy's messages name the original
                bad(where.replace(path, shard.path, 1), problem)

            for position, doc in enumerate(io.read_shard(local, text_field=self.options["text_field"],
                                                         id_field=self.options["id_field"], bad=report)):
                docs_in += 1
                kept, reason = self.stage(doc)
                if kept is None:
                    reason = reason or f"{self.stage.name}:unspecified"
                    dropped[reason] += 1
                    yield beam.pvalue.TaggedOutput("dropped", ((index, reason), (position, doc)))
                    continue
                docs_out += 1
                extra = kept.pop(engine.COUNTS_FIELD, None)
                if extra:
                    yield beam.pvalue.TaggedOutput("counts", (index, dict(extra)))
                    for name, n in extra.items():
                        Metrics.counter(NAMESPACE, f"count:{name}").inc(n)
                yield index, (position, kept)
        for reason, n in dropped.items():
            Metrics.counter(NAMESPACE, f"dropped:{reason}").inc(n)
        Metrics.counter(NAMESPACE, "documents_in").inc(docs_in)
        Metrics.counter(NAMESPACE, "documents_out").inc(docs_out)
        Metrics.counter(NAMESPACE, "bad_records").inc(bad.count)
        yield beam.pvalue.TaggedOutput("shard", (index, {
            "index": index, "input": shard.describe(), "documents_in": docs_in, "bad_records": bad.count,
            "bad_record_examples": bad.examples, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu}))


def _write_part(group: tuple[int, Any], output: str, fmt: str) -> tuple[int, int]:
    """Writes part `index` from its (position, doc) values (None: the shard's marker); returns (index, written)."""
    index, values = group
    docs = sorted((v for v in values if v is not None), key=lambda v: v[0])
    name = io.output_name(index, fmt)
    with _local_target(output, name) as path:
        with io.ShardWriter(path, fmt) as writer:
            for _, doc in docs:
                writer.write(doc)
    return index, len(docs)


def _write_part_stats(joined: tuple[int, dict], output: str) -> None:
    """The local engine's per-shard files (_parts/part-NNNNN.json last, with its .rejected.jsonl.gz)."""
    index, groups = joined
    (shard,) = groups["shard"]
    dropped = dict(sorted(groups["dropped"]))
    counts: Counter = Counter()
    for extra in groups["counts"]:
        counts.update(extra)
    samples = sorted((position, reason, doc) for reason, firsts in groups["samples"] for position, doc in firsts)
    stats = {**shard, "documents_out": sum(groups["written"]), "dropped": dropped,
             "counts": dict(sorted(counts.items()))}
    stats = {key: stats[key] for key in ("index", "input", "documents_in", "documents_out", "dropped", "counts",
                                         "bad_records", "bad_record_examples", "seconds", "cpu_seconds")}
    with _local_target(output, f"{engine.PARTS}/part-{index:05d}.rejected.jsonl.gz") as path:
        io.write_jsonl_gz(path, [{"reason": reason, "doc": doc} for _, reason, doc in samples])
    with _local_target(output, f"{engine.PARTS}/part-{index:05d}.json") as path:
        atomic_write_text(path, json.dumps(stats) + "\n")


@contextmanager
def _local_target(output: str, name: str) -> Iterator[str]:
    """A local path to write OUTPUT/name at: itself for a local OUTPUT, else a temporary file copied up after."""
    if not is_remote(output):
        yield os.path.join(output, name)
        return
    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, os.path.basename(name))
        yield path
        put(path, f"{output.rstrip('/')}/{name}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_beam(stage: engine.DocStage, inputs: str, output: str, *, runner: str = "DirectRunner",
             pipeline_args: Sequence[str] = (), fmt_out: str = "jsonl.gz", text_field: str = "text",
             id_field: str = "id", on_bad_record: str = "skip", samples_per_reason: int = 20,
             chunk_bytes: int = io.DEFAULT_CHUNK_BYTES) -> dict:
    """Runs `stage` over `inputs` into `output` as a Beam pipeline on `runner` (module docstring); returns the
    stats (those of engine.run_local, with `engine` "beam:<runner>" and `beam_counters`)."""
    beam = import_beam()
    if fmt_out not in io.OUTPUT_FORMATS:
        raise JaxllmError(f"output format {fmt_out!r} is not one of {', '.join(io.OUTPUT_FORMATS)}")
    io.BadRecords(on_bad_record)
    remote_in = any(is_remote(p) for p in inputs.split(","))
    shards = plan_remote(inputs) if remote_in else io.plan_shards(inputs, chunk_bytes=chunk_bytes)
    options = dict(format=fmt_out, text_field=text_field, id_field=id_field, on_bad_record=on_bad_record,
                   samples_per_reason=samples_per_reason)
    plan = engine.make_plan(stage.name, engine.stage_config(stage), inputs, [] if remote_in else shards, options)
    with _staged_output(output, plan, fmt_out) as local_out:
        start = time.perf_counter()
        pipeline = make_pipeline(runner, pipeline_args)
        read = (pipeline
                | "Shards" >> beam.Create(list(enumerate(shards)))
                | "Spread" >> beam.Reshuffle()
                | "ReadAndApply" >> beam.FlatMap(_ReadAndApply(stage, options)).with_outputs(
                    "dropped", "counts", "shard", main="kept"))
        markers = read.shard | "Marker" >> beam.Map(lambda kv: (kv[0], None))
        written = ((read.kept, markers) | "KeptAndMarkers" >> beam.Flatten()
                   | "ByShard" >> beam.GroupByKey()
                   | "WritePart" >> beam.Map(_write_part, output, fmt_out))
        drops = read.dropped
        counted = (drops | "DropKeys" >> beam.Keys() | "CountDrops" >> beam.combiners.Count.PerElement()
                   | "ByShardDrops" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1]))))
        samples = (drops | "FirstSamples" >> beam.combiners.Top.SmallestPerKey(max(samples_per_reason, 1),
                                                                              key=lambda v: v[0])
                   | "ByShardSamples" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1][:samples_per_reason]))))
        _ = ({"shard": read.shard, "written": written, "dropped": counted, "samples": samples, "counts": read.counts}
             | "JoinByShard" >> beam.CoGroupByKey()
             | "WritePartStats" >> beam.Map(_write_part_stats, output))
        result = _run(pipeline)
        counters = {c.key.metric.name: c.committed for c in result.metrics().query()["counters"]
                    if c.key.metric.namespace == NAMESPACE}
        parts = engine.finished_parts(local_out, len(shards)) if not is_remote(output) else \
            _fetch_parts(output, local_out, len(shards))
        if len(parts) != len(shards):
            raise JaxllmError(f"the Beam pipeline finished {len(parts)} of {len(shards)} shards; see its log")
        processed = sum(p["documents_in"] for p in parts.values())
        stats = engine.merge_stats(local_out, [parts[i] for i in range(len(shards))], plan,
                                   engine=f"beam:{runner}", workers=0, elapsed=time.perf_counter() - start,
                                   processed=processed, resumed=0)
        stats["beam_counters"] = dict(sorted(counters.items()))
        stats["output"] = output
        atomic_write_text(Path(local_out) / engine.STATS, json.dumps(stats, indent=1) + "\n")
    return stats


def _run(pipeline: Any) -> Any:
    """Runs the pipeline to the end; a JaxllmError raised in a worker (e.g. a bad record with on_bad_record
    error) comes back as itself when the runner keeps it as the cause, else with the runner's message."""
    try:
        result = pipeline.run()
        result.wait_until_finish()
        return result
    except JaxllmError:
        raise
    except Exception as e:
        cause: Optional[BaseException] = e
        while cause is not None:
            if isinstance(cause, JaxllmError):
                raise JaxllmError(str(cause)) from None
            cause = cause.__cause__ or cause.__context__
        message = str(e).strip().splitlines()
        found = [line for line in message if "JaxllmError" in line]
        if found:
            raise JaxllmError(found[-1].split("JaxllmError:", 1)[-1].strip()) from None
        raise


@contextmanager
def _staged_output(output: str, plan: dict, fmt: str) -> Iterator[str]:
    """A local directory for the stats: OUTPUT itself (made ready as the local engine does), or for a remote
    OUTPUT a temporary one whose stats.json and rejected/ are copied up at the end."""
    if not is_remote(output):
        out = engine.prepare_output(output, plan, fmt)
        for index in range(len(plan["shards"])):  # a Beam run redoes every shard
            (out / engine.PARTS / f"part-{index:05d}.json").unlink(missing_ok=True)
        (out / engine.STATS).unlink(missing_ok=True)
        yield str(out)
        return
    tmp = tempfile.mkdtemp()
    try:
        yield tmp
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file() and engine.PARTS not in path.parts:
                put(path, f"{output.rstrip('/')}/{path.relative_to(tmp)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch_parts(output: str, local_out: str, count: int) -> dict[int, dict]:
    """The per-shard files of a remote OUTPUT copied into the local staging directory; their stats."""
    for index in range(count):
        for name in (f"part-{index:05d}.json", f"part-{index:05d}.rejected.jsonl.gz"):
            with local_copy(f"{output.rstrip('/')}/{engine.PARTS}/{name}") as path:
                dest = Path(local_out) / engine.PARTS / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, dest)
    return engine.finished_parts(local_out, count)
