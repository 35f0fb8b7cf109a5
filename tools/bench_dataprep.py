"""Documents/s and MB/s per core of each data-preparation stage on one input, and from them a sizing on paper
for a corpus of any size on a cluster (docs/data.md "Throughput and sizing").

    python tools/bench_dataprep.py --input builtin:kjv --scratch /tmp/bench-dataprep [--corpus-tb 1]

Every stage reads the same input (not chained), with one worker process, so each rate is that stage's own.
CPU time (user + system, of this process and its reaped children: the workers) is measured, not wall time,
so a machine shared with other jobs distorts the rates less. Stages: `copy` (the engine alone: read jsonl,
write jsonl.gz), `clean` (defaults), `dedup` (MinHash defaults), `decontaminate` (against builtin:kjv-valid's
file, 13-grams), `tokenize` (builtin:kjv-sp4k, seq_len 128).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

from jaxllm.data import ASSETS
from jaxllm.dataprep import engine, io


class Copy:
    name = "copy"

    def __call__(self, doc: dict):
        return doc, None


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_stage(name: str, inputs: str, out: str) -> None:
    common = dict(workers=1, samples_per_reason=0)
    if name == "copy":
        engine.run_local(Copy(), inputs, out, progress=False, **common)
    elif name == "clean":
        from jaxllm.dataprep.clean import Cleaner

        engine.run_local(Cleaner({}), inputs, out, progress=False, **common)
    elif name == "decontaminate":
        from jaxllm.dataprep.decontaminate import Decontaminator

        stage = Decontaminator({"files": [str(ASSETS / "kjv-valid.jsonl.gz")]})
        engine.run_local(stage, inputs, out, progress=False, **common)
    elif name == "dedup":
        from jaxllm.dataprep.dedup import dedup

        dedup(inputs, out, **common)
    else:
        from jaxllm.dataprep.shards import tokenize_to_shards

        tokenize_to_shards(inputs, out, "builtin:kjv-sp4k", 128, workers=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", default="builtin:kjv")
    parser.add_argument("--scratch", default="/tmp/bench-dataprep")
    parser.add_argument("--stages", default="copy,clean,dedup,decontaminate,tokenize")
    parser.add_argument("--corpus-tb", type=float, default=1.0, help="the corpus of the sizing, in TB of text")
    parser.add_argument("--vcpus-per-worker", type=int, default=16, help="e.g. 16 for n2-standard-16")
    args = parser.parse_args()
    docs = list(io.iter_documents(args.input))
    megabytes = sum(len(doc["text"].encode()) for _, doc in docs) / 1e6
    print(f"input {args.input}: {len(docs)} documents, {megabytes:.2f} MB of text")
    print(f"{'stage':14s} {'cpu_s':>7s} {'wall_s':>7s} {'docs/s/core':>12s} {'MB/s/core':>10s} "
          f"{'core-h per TB':>14s}")
    total = 0.0
    for name in args.stages.split(","):
        out = Path(args.scratch) / name
        shutil.rmtree(out, ignore_errors=True)
        cpu, wall = cpu_seconds(), time.perf_counter()
        run_stage(name, args.input, str(out))
        cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
        rate = megabytes / cpu
        core_hours = 1e6 / rate / 3600  # one TB = 1e6 MB
        total += core_hours if name != "copy" else 0.0  # every stage's rate already includes the engine's I/O
        print(f"{name:14s} {cpu:7.1f} {wall:7.1f} {len(docs) / cpu:12,.0f} {rate:10.2f} {core_hours:14,.0f}",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
    need = total * args.corpus_tb
    print(f"all stages but copy: {total:,.0f} core-hours per TB; {args.corpus_tb:g} TB: {need:,.0f} core-hours")
    for workers in (50, 100, 250, 500):
        vcpus = workers * args.vcpus_per_worker
        print(f"  {workers:4d} workers x {args.vcpus_per_worker} vCPUs = {vcpus:6d}: {need / vcpus:6.1f} h "
              "(one vCPU counted as one core measured here)")


if __name__ == "__main__":
    main()
