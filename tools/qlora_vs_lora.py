"""A short LoRA run on a bfloat16 base against the same run on an NF4 base (QLoRA), on the bundled corpus.

    jaxllm train configs/tiny.yaml                       # the base: runs/tiny
    python tools/qlora_vs_lora.py --base runs/tiny --steps 100

Both runs start from the same checkpoint with the same adapters' initialisation, batches and
optimizer (configs/lora_tiny.yaml and configs/lora_tiny_qlora.yaml, both computing in bfloat16); the
table gives the held-out loss (builtin:kjv-valid) before and after, and the training loss.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import jax

from jaxllm.config import load_config
from jaxllm.train.loop import Trainer
from jaxllm.train.metrics import read_metrics

CONFIGS = Path(__file__).parents[1] / "configs"
RUNS = {
    "LoRA, bf16 base": ("lora_tiny.yaml", ["model.dtype=bfloat16"]),
    "QLoRA, NF4 base (double quant)": ("lora_tiny_qlora.yaml", []),
    "QLoRA, int8 base": ("lora_tiny_qlora.yaml", ["model.quant.kind=int8"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the run directory or checkpoint to fine-tune")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; base {args.base}; {args.steps} steps")
    print("| run | held-out loss before | after | train loss (first 10 / last 10 steps) | step (ms) |\n|---|---|---|---|---|")
    for name, (config, extra) in RUNS.items():
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = load_config(CONFIGS / config, [f"train.init_from={args.base}", f"run_dir={run_dir}",
                                                 f"train.steps={args.steps}", f"eval.every={args.steps}",
                                                 "train.log_every=1", "train.progress_bar=false",
                                                 "checkpoint.every=100000", *extra, *args.overrides])
            trainer = Trainer(cfg)
            try:
                before = trainer.evaluate()["eval_loss"]
                summary = trainer.run()
            finally:
                trainer.close()
            rows = read_metrics(run_dir)
            losses = [r["loss"] for r in rows]
            step_ms = 1000 * statistics.median(r["step_time"] for r in rows[1:])
            print(f"| {name} | {before:.4f} | {summary['eval_loss']:.4f} | {statistics.mean(losses[:10]):.4f} / "
                  f"{statistics.mean(losses[-10:]):.4f} | {step_ms:.0f} |", flush=True)


if __name__ == "__main__":
    main()
