"""Held-out preference accuracy of trained policies, one table for every method (docs/post-training.md).

    python tools/eval_preferences.py --reference runs/tiny-sft runs/tiny-sft runs/tiny-dpo runs/tiny-kto ...

Each policy is evaluated as a DPO run of configs/tiny-dpo.yaml would evaluate it, on the held-out pairs
(builtin:kjv-pref-valid, split by corruption), against the same frozen reference: `rewards/accuracies` (the
share of pairs whose implicit reward beta * log(pi / pi_ref) is higher for the chosen response),
`logps/accuracies` (the share whose chosen response the policy itself finds more likely) and
`rewards/margins`. Prints a markdown table; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
from pathlib import Path

from jaxllm.config import load_config
from jaxllm.data import ASSETS
from jaxllm.train.loop import Trainer

KINDS = ("shuffled", "truncated", "other_book")
METRICS = ("rewards/accuracies", "logps/accuracies", "rewards/margins")


def evaluate(policy: str, reference: str, sources: dict[str, str], config: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"train.init_from={policy}", f"preference.reference={reference}", f"run_dir={run_dir}",
                     "eval.sources=[" + ", ".join(f"{{path: {p}}}" for p in sources.values()) + "]",
                     "train.progress_bar=false"]
        trainer = Trainer(load_config(config, overrides))
        try:
            metrics = trainer.evaluate()
        finally:
            trainer.close()
    out = {f"all {m}": metrics[f"eval_{m}"] for m in METRICS}
    for kind, path in sources.items():
        out.update({f"{kind} {m}": metrics[f"eval_{m}/{path}"] for m in METRICS})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("policies", nargs="+", help="run directories (or checkpoints, or Hugging Face directories)")
    parser.add_argument("--reference", required=True, help="the frozen reference of the implicit rewards")
    parser.add_argument("--config", default="configs/tiny-dpo.yaml")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    records = [json.loads(line) for line in gzip.open(ASSETS / "kjv-pref-valid.jsonl.gz", "rt", encoding="utf-8")]
    with tempfile.TemporaryDirectory() as tmp:
        sources = {}
        for kind in KINDS:
            path = Path(tmp) / f"{kind}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records if r["corruption"] == kind))
            sources[kind] = str(path)
        results = {policy: evaluate(policy, args.reference, sources, args.config) for policy in args.policies}
    columns = [f"{k} {m}" for k in ("all", *KINDS) for m in METRICS[:2]] + ["all rewards/margins"]
    print("| policy | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for policy, row in results.items():
        print(f"| {policy} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
