"""Builds the bundled RL prompt sets (`builtin:kjv-rl`, `builtin:kjv-rl-valid`) from the instruction sets.

    python tools/make_rl_prompts.py jaxllm/assets

Each line is a TRL conversational prompt record `{"prompt": [{"role": "user", "content": ...}], "answer": ...,
"task": ...}`: the user turn of a `book`, `first_word` or `last_word` conversation of `kjv-sft.jsonl.gz`
(-> kjv-rl) or `kjv-sft-valid.jsonl.gz` (-> kjv-rl-valid), the assistant's reply its answer, checkable with
the `exact_match` reward. The `continue` and `quote` tasks have no single checkable answer and are left
out. Records keep their order (kjv-sft's shuffle; kjv-sft-valid's grouping by task, so kjv-rl-valid-book,
-first-word and -last-word are ranges), and the held-out set stays held out: its verses come from the
chapters no training instruction uses. Deterministic: running it again reproduces the files byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from make_instructions import HELD_OUT, _write  # the held-out tasks, the same gzip writer

TASKS = tuple(HELD_OUT)  # book, first_word, last_word: one right answer each


def prompts(path: Path) -> list[dict]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record["task"] not in TASKS:
                continue
            user, assistant = record["messages"]
            out.append({"prompt": [user], "answer": assistant["content"], "task": record["task"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("assets", type=Path, help="jaxllm/assets (reads kjv-sft*.jsonl.gz, writes kjv-rl*.jsonl.gz)")
    args = parser.parse_args()
    for source, target in (("kjv-sft", "kjv-rl"), ("kjv-sft-valid", "kjv-rl-valid")):
        records = prompts(args.assets / f"{source}.jsonl.gz")
        _write(args.assets / f"{target}.jsonl.gz", records)
        counts = {t: sum(r["task"] == t for r in records) for t in TASKS}
        ranges, start = [], 0
        for t in TASKS:  # the held-out set's task ranges (meaningful where records are grouped by task)
            ranges.append(f"{t} {start}..{start + counts[t]}")
            start += counts[t]
        print(f"{target}: {len(records)} prompts {counts} ({', '.join(ranges)})")


if __name__ == "__main__":
    main()
