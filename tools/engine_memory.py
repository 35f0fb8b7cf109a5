"""Peak memory and throughput of the local engine (jaxllm.dataprep.engine) on corpora of growing size: the
memory of a worker must not grow with the corpus (it holds one record plus the output stream).

    python tools/engine_memory.py /tmp/engine-mem --sizes-mb 50,200,800 --workers 2

Writes a jsonl corpus of each size (King James chapters, each record given a serial number so no two are
equal), runs a stage that keeps every document (`copy`: the engine's own cost, reading jsonl and writing
jsonl.gz) over it with `--chunk-mb` ranges, and prints per size: documents, MB, documents/s and MB/s per core
(worker CPU time), and the peak RSS of the workers and of the main process.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from jaxllm.dataprep import engine, io


class Copy:
    """Keeps every document unchanged: the engine's own cost."""

    name = "copy"

    def __call__(self, doc: dict):
        return doc, None


def write_corpus(path: Path, megabytes: int) -> int:
    chapters = [doc["text"] for _, doc in io.iter_documents("builtin:kjv")]
    written = n = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes << 20:
            line = json.dumps({"text": chapters[n % len(chapters)], "serial": n}) + "\n"
            f.write(line)
            written += len(line.encode())
            n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="scratch directory (corpora and outputs; removed after each size)")
    parser.add_argument("--sizes-mb", default="50,200,800")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--chunk-mb", type=int, default=32)
    args = parser.parse_args()
    root = Path(args.dir)
    print("corpus_mb  documents  shards  docs/s/core  MB/s/core  peak_rss_worker_mb  peak_rss_main_mb")
    for size in (int(s) for s in args.sizes_mb.split(",")):
        root.mkdir(parents=True, exist_ok=True)
        corpus = root / f"corpus-{size}mb.jsonl"
        docs = write_corpus(corpus, size)
        stats = engine.run_local(Copy(), str(corpus), str(root / "out"), workers=args.workers,
                                 chunk_bytes=args.chunk_mb << 20, samples_per_reason=0, progress=False)
        assert stats["documents_out"] == docs
        mb_per_core = size / stats["cpu_s"]
        print(f"{size:9d}  {docs:9d}  {stats['shards']:6d}  {stats['documents_per_s_per_core']:11,.0f}  "
              f"{mb_per_core:9.1f}  {stats['peak_rss_mb']['worker']:18.1f}  {stats['peak_rss_mb']['main']:16.1f}",
              flush=True)
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
