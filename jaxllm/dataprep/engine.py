"""The local engine: one per-document stage over a corpus, on all cores of one machine, streaming, resumable.

A `DocStage` is a picklable, pure, deterministic callable `doc -> (kept doc, None) | (None, drop reason)`.
A kept document may carry `COUNTS_FIELD` ("_counts"): a dict of counts (e.g. {"pii:email": 2}) that the
engine pops before writing and sums into `stats["counts"]`. A stage may expose `config` (a dataclass or a
dict): it is part of the run's plan, so changed settings redo the stage instead of resuming it.

`run_local` plans the input shards (io.plan_shards), processes each in a worker process (one record in
memory at a time plus the output stream) and writes, in OUTPUT:
- `part-NNNNN.<fmt>`: the kept documents of input shard NNNNN, in input order (jsonl.gz or parquet);
- `stats.json`: documents in/out, drops per reason, counts, bad records (file:line), rates; written last:
  a complete stage is one whose stats.json holds the current plan's hash (`complete`);
- `rejected/<reason>.jsonl.gz`: the first `samples_per_reason` dropped documents of each reason;
- `_parts/`: the plan and, per finished shard, its stats (the resume marker) and rejected samples.
The output is byte-identical whatever the number of workers; a re-run skips finished shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import resource
import shutil
import time
from collections import Counter
from dataclasses import asdict, is_dataclass
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from jaxllm.config import JaxllmError
from jaxllm.data.readers import json_objects
from jaxllm.dataprep import io
from jaxllm.utils import atomic_write_text, ensure_writable_dir

logger = logging.getLogger("jaxllm.dataprep")

COUNTS_FIELD = "_counts"
STATS = "stats.json"
PARTS = "_parts"
_PROGRESS_SECONDS = 0.2  # between updates of the shared progress counter


class DocStage(Protocol):
    """A per-document stage: picklable, pure, deterministic."""

    name: str

    def __call__(self, doc: dict) -> tuple[Optional[dict], Optional[str]]:
        """(the kept, possibly modified, doc, None) or (None, drop reason e.g. "gopher_quality:mean_word_length")."""
        ...


def stage_config(stage: Any) -> Any:
    """The stage's settings as JSON-able data (its `config`), for the plan."""
    config = getattr(stage, "config", None)
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def make_plan(stage_name: str, config: Any, inputs: str, shards: list[io.Shard], options: dict) -> dict:
    """What a run computes: the stage and its settings, the input shards (with their sizes and times) and the
    output options. Equal plans give equal outputs."""
    files = []
    for shard in shards:
        entry = shard.to_json()
        if shard.fmt != "hf":
            st = os.stat(shard.path)
            entry.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
        files.append(entry)
    plan = {"stage": stage_name, "config": config, "inputs": inputs, "shards": files, "options": options}
    return json.loads(json.dumps(plan))  # as read back from plan.json (tuples as lists)


def plan_hash(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def complete(output: str | Path, plan: dict) -> bool:
    """Whether OUTPUT holds the finished run of `plan` (its stats.json carries the plan's hash)."""
    try:
        stats = json.loads((Path(output) / STATS).read_text())
    except (OSError, ValueError):
        return False
    return stats.get("plan_hash") == plan_hash(plan)


def prepare_output(output: str | Path, plan: dict, fmt: str) -> Path:
    """Makes OUTPUT ready for `plan`: a run of another plan (its parts, stats, samples) is removed; parts of the
    same plan are kept for resuming; stale temporary files are removed."""
    out = ensure_writable_dir(output, "output")
    parts = out / PARTS
    try:
        old = json.loads((parts / "plan.json").read_text())
    except (OSError, ValueError):
        old = None
    if old is not None and old != plan:
        logger.info("%s holds a run of other inputs or settings: starting it again", out)
        for name in [io.output_name(i, old["options"]["format"]) for i in range(len(old["shards"]))]:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(parts, ignore_errors=True)
        shutil.rmtree(out / "rejected", ignore_errors=True)
        (out / STATS).unlink(missing_ok=True)
    for tmp in out.glob(".part-*.tmp"):
        tmp.unlink(missing_ok=True)
    parts.mkdir(exist_ok=True)
    if old != plan:
        atomic_write_text(parts / "plan.json", json.dumps(plan, indent=1, sort_keys=True) + "\n")
    return out


def process_shard(stage: DocStage, shard: io.Shard, index: int, output: str | Path, options: dict,
                  progress: Optional[Callable[[int], None]] = None) -> dict:
    """Runs `stage` over one input shard: writes part `index`, its samples of rejected documents and, last, its
    stats (the marker that it is done). Returns the stats."""
    out = Path(output)
    start, cpu = time.perf_counter(), time.process_time()
    bad = io.BadRecords(options["on_bad_record"])
    dropped: Counter = Counter()
    counts: Counter = Counter()
    samples: list[dict] = []
    per_reason: Counter = Counter()
    docs_in = pending = 0
    last = start
    with io.ShardWriter(out / io.output_name(index, options["format"]), options["format"]) as writer:
        for doc in io.read_shard(shard, text_field=options["text_field"], id_field=options["id_field"], bad=bad):
            docs_in += 1
            kept, reason = stage(doc)
            if kept is None:
                reason = reason or f"{stage.name}:unspecified"
                dropped[reason] += 1
                if per_reason[reason] < options["samples_per_reason"]:
                    per_reason[reason] += 1
                    samples.append({"reason": reason, "doc": doc})
            else:
                extra = kept.pop(COUNTS_FIELD, None)
                if extra:
                    counts.update(extra)
                writer.write(kept)
            pending += 1
            if progress is not None and time.perf_counter() - last > _PROGRESS_SECONDS:
                progress(pending)
                pending, last = 0, time.perf_counter()
        docs_out = writer.count
    if progress is not None and pending:
        progress(pending)
    stats = {
        "index": index, "input": shard.describe(), "documents_in": docs_in, "documents_out": docs_out,
        "dropped": dict(sorted(dropped.items())), "counts": dict(sorted(counts.items())),
        "bad_records": bad.count, "bad_record_examples": bad.examples,
        "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
        "peak_rss_mb": peak_rss_mb(),
    }  # fmt: skip
    io.write_jsonl_gz(out / PARTS / f"part-{index:05d}.rejected.jsonl.gz", samples)
    atomic_write_text(out / PARTS / f"part-{index:05d}.json", json.dumps(stats) + "\n")
    return stats


def peak_rss_mb() -> float:
    """This process's peak resident memory: Linux's VmHWM (of this program image; ru_maxrss would count the
    parent's memory at the fork of a spawned worker), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def finished_parts(output: str | Path, count: int) -> dict[int, dict]:
    """The stats of the parts of OUTPUT that are done."""
    done = {}
    for index in range(count):
        try:
            done[index] = json.loads((Path(output) / PARTS / f"part-{index:05d}.json").read_text())
        except (OSError, ValueError):
            pass
    return done


def reason_file(reason: str) -> str:
    """rejected/<reason>.jsonl.gz with the reason made a safe file name ("gopher:x/y" -> "gopher_x_y")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", reason) + ".jsonl.gz"


def merge_stats(output: str | Path, parts: list[dict], plan: dict, *, engine: str, workers: int, elapsed: float,
                processed: int, resumed: int) -> dict:
    """The run's stats from its parts' (in input order), with the first samples of each drop reason written to
    rejected/; writes stats.json (last: it marks the stage complete) and returns it."""
    out = Path(output)
    dropped: Counter = Counter()
    counts: Counter = Counter()
    examples: list[str] = []
    for part in parts:
        dropped.update(part["dropped"])
        counts.update(part["counts"])
        examples.extend(part["bad_record_examples"])
    docs_in = sum(p["documents_in"] for p in parts)
    cpu = sum(p["cpu_seconds"] for p in parts)
    limit = plan["options"]["samples_per_reason"]
    samples: dict[str, list[dict]] = {}
    for part in parts:
        path = out / PARTS / f"part-{part['index']:05d}.rejected.jsonl.gz"
        for _, sample in json_objects(path, "rejected samples"):
            kept = samples.setdefault(sample["reason"], [])
            if len(kept) < limit:
                kept.append(sample["doc"])
    shutil.rmtree(out / "rejected", ignore_errors=True)
    for reason, docs in samples.items():
        io.write_jsonl_gz(out / "rejected" / reason_file(reason), docs)
    stats = {
        "stage": plan["stage"], "engine": engine, "inputs": plan["inputs"], "output": str(output),
        "format": plan["options"]["format"], "shards": len(parts), "workers": workers,
        "documents_in": docs_in, "documents_out": sum(p["documents_out"] for p in parts),
        "dropped_total": sum(dropped.values()), "dropped": dict(sorted(dropped.items())),
        "counts": dict(sorted(counts.items())),
        "bad_records": sum(p["bad_records"] for p in parts), "bad_record_examples": examples[:20],
        "elapsed_s": round(elapsed, 3), "documents_per_s": round(processed / elapsed, 1) if elapsed > 0 else None,
        "cpu_s": round(cpu, 3), "documents_per_s_per_core": round(docs_in / cpu, 1) if cpu > 0 else None,
        "resumed_shards": resumed, "plan_hash": plan_hash(plan),
        "peak_rss_mb": {"main": peak_rss_mb(),
                        "worker": max((p.get("peak_rss_mb") or 0 for p in parts), default=0)},
        "parts": [{"part": io.output_name(p["index"], plan["options"]["format"]), "input": p["input"],
                   "documents_in": p["documents_in"], "documents_out": p["documents_out"]} for p in parts],
    }  # fmt: skip
    atomic_write_text(out / STATS, json.dumps(stats, indent=1) + "\n")
    return stats


def resolve_workers(workers: int) -> int:
    if workers < 0:
        raise JaxllmError(f"workers must be 0 (all cores) or more, got {workers}")
    return workers or len(os.sched_getaffinity(0))


def run_local(stage: DocStage, inputs: str, output: str, *, workers: int = 0, fmt_out: str = "jsonl.gz",
              text_field: str = "text", id_field: str = "id", on_bad_record: str = "skip",
              samples_per_reason: int = 20, chunk_bytes: int = io.DEFAULT_CHUNK_BYTES,
              progress: bool = True) -> dict:
    """Runs `stage` over `inputs` into `output` (module docstring) with `workers` processes (0 = all cores);
    returns the stats."""
    if fmt_out not in io.OUTPUT_FORMATS:
        raise JaxllmError(f"output format {fmt_out!r} is not one of {', '.join(io.OUTPUT_FORMATS)}")
    io.BadRecords(on_bad_record)  # checks the policy's name
    if samples_per_reason < 0:
        raise JaxllmError(f"samples_per_reason must be 0 or more, got {samples_per_reason}")
    shards = io.plan_shards(inputs, chunk_bytes=chunk_bytes)
    options = dict(format=fmt_out, text_field=text_field, id_field=id_field, on_bad_record=on_bad_record,
                   samples_per_reason=samples_per_reason)
    plan = make_plan(stage.name, stage_config(stage), inputs, shards, options)
    out = prepare_output(output, plan, fmt_out)
    done = finished_parts(out, len(shards))
    todo = [(i, shard) for i, shard in enumerate(shards) if i not in done]
    workers = min(resolve_workers(workers), max(len(todo), 1))
    if done:
        logger.info("%s: %d of %d shards already done, resuming", out, len(done), len(shards))
    start = time.perf_counter()
    processed = 0
    from tqdm import tqdm

    with tqdm(desc=stage.name, unit="doc", disable=not progress, smoothing=0.1) as bar:
        if workers <= 1:
            for index, shard in todo:
                done[index] = process_shard(stage, shard, index, out, options, bar.update)
        else:
            for stats in _pool_map(stage, todo, out, options, workers, bar):
                done[stats["index"]] = stats
        processed = sum(done[i]["documents_in"] for i, _ in todo)
    stats = merge_stats(out, [done[i] for i in range(len(shards))], plan, engine="local", workers=workers,
                        elapsed=time.perf_counter() - start, processed=processed, resumed=len(shards) - len(todo))
    if stats["bad_records"]:
        logger.warning("skipped %d bad records (stats.json lists the first), e.g. %s", stats["bad_records"],
                       stats["bad_record_examples"][0])
    return stats


# Worker processes (spawned: no state inherited from the parent but what is passed here).
_WORKER: dict[str, Any] = {}


def _init_worker(stage: DocStage, output: Path, options: dict, counter: Any) -> None:
    _WORKER.update(stage=stage, output=output, options=options, counter=counter)


def _count(n: int) -> None:
    counter = _WORKER["counter"]
    with counter.get_lock():
        counter.value += n


def _worker_task(task: tuple[int, io.Shard]) -> dict:
    index, shard = task
    return process_shard(_WORKER["stage"], shard, index, _WORKER["output"], _WORKER["options"], _count)


def _pool_map(stage: DocStage, todo: list, output: Path, options: dict, workers: int, bar: Any):
    """Yields the stats of each task as workers finish them, keeping the progress bar current."""
    try:
        ForkingPickler.dumps(stage)  # what starting the workers does; a failure there is a long traceback
    except Exception as e:  # noqa: BLE001 (pickling raises many types: PicklingError, AttributeError, TypeError)
        raise JaxllmError(f"stage {stage.name!r} cannot be sent to worker processes ({type(e).__name__}: {e}); "
                          "make it picklable or run with workers=1") from None
    ctx = mp.get_context("spawn")  # no fork: the parent may hold threads (progress bar, JAX) and big state
    counter = ctx.Value("q", 0)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(stage, output, options, counter)) as pool:
        results = pool.imap_unordered(_worker_task, todo)
        left = len(todo)
        while left:
            try:
                stats = results.next(timeout=0.5)
            except mp.TimeoutError:
                bar.update(counter.value - bar.n)
                continue
            left -= 1
            bar.update(counter.value - bar.n)
            yield stats
