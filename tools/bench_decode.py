"""Encoder-decoder decode tokens/s before vs after caching the cross-attention keys/values, in one run.

    python tools/bench_decode.py --before 5456e20            # T5-small-like, random weights, greedy
    python tools/bench_decode.py --before REF --repeats 3 --batch 2 --src-len 256 --new-tokens 33

"before" is the jaxllm package of git revision REF (extracted with `git archive` into a temporary
directory), "after" this checkout's. Each measurement runs in its own process (PYTHONPATH set to the
tree), before and after interleaved `--repeats` times, each with the 1-minute load average at its
start: on a shared machine compare runs taken close together. Decode tokens/s = batch * (new_tokens - 1)
/ (time of new_tokens tokens - time of 1 token), as `jaxllm bench --generate` (prefill excluded).
The worker uses only APIs present before and after (load_config, init_params, generate)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# T5 v1.1 small: 6 + 6 layers, d_model 512, 8 heads of 64, gated-GELU 1024, vocab 32128.
T5_SMALL = ["model.d_model=512", "model.num_layers=6", "model.num_decoder_layers=6", "model.num_heads=8",
            "model.mlp_dim=1024", "model.dtype=float32"]


def worker(args) -> dict:
    import jax
    import numpy as np

    from jaxllm import models, sharding
    from jaxllm.config import GenerateConfig, MeshConfig, load_config
    from jaxllm.infer.generate import generate

    cfg = load_config(str(ROOT / "configs" / "t5-base.yaml"), T5_SMALL)
    m = cfg.model
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    graphdef, params, _ = models.init_params(m, mesh, sharding.make_rules(), seed=0)
    prompts = np.random.default_rng(0).integers(2, m.vocab_size, (args.batch, args.src_len)).tolist()

    def run(n):
        gen = GenerateConfig(max_new_tokens=n, temperature=0.0)
        return generate(graphdef, params, m, prompts, gen, eos_id=None, pad_id=0, decoder_start_id=0)

    def timed(n):
        run(n)  # compile
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            run(n)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    first, full = timed(1), timed(args.new_tokens)
    return {"decode_tokens_per_sec": args.batch * (args.new_tokens - 1) / max(full - first, 1e-9),
            "prefill_s": first, "platform": jax.devices()[0].platform}


def extract(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "jaxllm"], check=True, capture_output=True).stdout
    path = into / "archive.tar"
    path.write_bytes(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", required=True, help="git revision without the cross-attention cache")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--src-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--steps", type=int, default=3, help="timed runs per length (median)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"before": extract(args.before, Path(tmp)), "after": ROOT}
        for repeat in range(args.repeats):
            for name, tree in trees.items():
                load = os.getloadavg()[0]
                env = {**os.environ, "PYTHONPATH": str(tree)}
                cmd = [sys.executable, __file__, "--worker", "--batch", str(args.batch), "--src-len", str(args.src_len),
                       "--new-tokens", str(args.new_tokens), "--steps", str(args.steps), "--before", args.before]
                out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                rows.append({"tree": name, "repeat": repeat, "load_avg_1m": load, **result})
                print(f"{name:6} repeat {repeat}: {result['decode_tokens_per_sec']:8.1f} decode tokens/s "
                      f"(prefill {result['prefill_s']:.2f} s, {result['platform']}, load average {load:.1f})",
                      flush=True)
    for name in ("before", "after"):
        speeds = [r["decode_tokens_per_sec"] for r in rows if r["tree"] == name]
        print(f"{name}: median {statistics.median(speeds):.1f} decode tokens/s over {len(speeds)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
