"""Compares MoE dispatch modes: step time and dropped tokens while training on the bundled corpus.

    python tools/bench_moe.py                                   # configs/tiny-moe.yaml on this machine
    python tools/bench_moe.py --steps 60 model.d_model=512      # any config overrides
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/bench_moe.py mesh.data=2 mesh.expert=4

Each mode trains the same model from the same initialisation on the same batches; the table gives the
median step time after the first (compiling) step, the mean fraction of routed token copies dropped
over the last half of the steps, and the last loss. A dense model with the same active MLP width
(2 x expert_mlp_dim) is the reference row.

`--synthetic` times the same train step (`jaxllm.bench.setup`: compiled once, before timing) on one
random batch instead (no data pipeline: for machines without grain); its dropped fraction is that of a
router at initialisation.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax

from jaxllm.config import load_config
from jaxllm.platforms import keep_off_tpu

CONFIG = Path(__file__).parents[1] / "configs" / "tiny-moe.yaml"
MODES = {
    "dropless": ["model.moe.dispatch=dropless"],
    "capacity 1.0": ["model.moe.dispatch=capacity", "model.moe.capacity_factor=1.0"],
    "capacity 1.25": ["model.moe.dispatch=capacity", "model.moe.capacity_factor=1.25"],
    "capacity 2.0": ["model.moe.dispatch=capacity", "model.moe.capacity_factor=2.0"],
}


def run(overrides: list[str], steps: int) -> dict[str, float]:
    from jaxllm.train.loop import Trainer

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(CONFIG, [*overrides, f"run_dir={run_dir}", "eval.sources=[]", "train.progress_bar=false",
                                   f"train.steps={steps}"])
        trainer = Trainer(cfg)
        times, dropped, loss = [], [], float("nan")
        try:
            for step in range(steps):
                batch = trainer.next_batch()
                start = time.perf_counter()
                metrics = jax.device_get(trainer.train_step(batch))
                times.append(time.perf_counter() - start)
                if step >= steps // 2:
                    dropped.append(float(metrics.get("moe_dropped_fraction", 0.0)))
                loss = float(metrics["loss"])
        finally:
            trainer.close()
    return {"step_ms": 1000 * statistics.median(times[1:]), "dropped": statistics.mean(dropped), "loss": loss}


def run_synthetic(overrides: list[str], steps: int) -> dict[str, float]:
    """The train step `jaxllm train` runs (bench's setup: compiled once, ahead of the timing) on one
    random batch."""
    from jaxllm import bench

    cfg = load_config(CONFIG, [*overrides, "eval.sources=[]", f"train.steps={steps}"])
    setup = bench.setup(cfg)
    times = bench.timed(setup.run_step, 1, steps)
    metrics = jax.device_get(setup.run_step())
    return {"step_ms": 1000 * statistics.median(times), "dropped": float(metrics.get("moe_dropped_fraction", 0.0)),
            "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--synthetic", action="store_true", help="random tokens, no data pipeline")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.moe.num_experts=16")
    args = parser.parse_args()
    keep_off_tpu()  # no libtpu noise off a TPU VM, as in `jaxllm` (before any device is touched)
    cfg = load_config(CONFIG, args.overrides)
    width = 2 * (cfg.model.moe.expert_mlp_dim or cfg.model.mlp_dim)
    rows = {"dense (reference)": ["model.moe=null", f"model.mlp_dim={width}"], **MODES}
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}; {args.steps} steps of configs/tiny-moe.yaml "
          f"{' '.join(args.overrides)}")
    print("| dispatch | step (ms, median) | dropped copies | loss at the end |\n|---|---|---|---|")
    for name, extra in rows.items():
        r = (run_synthetic if args.synthetic else run)([*args.overrides, *extra], args.steps)
        print(f"| {name} | {r['step_ms']:.1f} | {r['dropped']:.2%} | {r['loss']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
