"""Rollout sampling tokens/s (jaxllm.rl.rollout) next to jaxllm.infer.generate.generate, same model, same
prompts and rows, both sampling, in one process:

    python tools/bench_rollout.py                          # runs/tiny if present, else configs/tiny.yaml's model
    python tools/bench_rollout.py --model runs/tiny --prompts 8 --n 4 --new-tokens 64 --repeats 5

Both draw `--new-tokens` tokens for every row (no stop ids: the same work), from prompts of random ids of
ragged lengths (up to --prompt-len), n rows per prompt (generate: num_return_sequences=n), padded to the
same width. Tokens/s = rows * new_tokens / the median time of `--repeats` calls after the first; compile
time = the first call's time minus that median. The 1-minute load average is printed: on a shared machine
the numbers are only comparable with others taken close together.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_model(path: str | None):
    """(model config, graphdef, params): a jaxllm run's trained weights, else configs/tiny.yaml's model initialised."""
    from jaxllm import models, sharding
    from jaxllm.config import MeshConfig, load_config

    mesh = sharding.make_mesh(MeshConfig(data=-1))
    rules = sharding.make_rules()
    if path is None and (ROOT / "runs" / "tiny").is_dir():
        path = str(ROOT / "runs" / "tiny")
    if path is not None:
        from jaxllm.train.frozen import open_pretrained

        pretrained = open_pretrained(path)
        return pretrained.config, models.model_spec(pretrained.config)[0], pretrained.params(mesh, rules), path
    cfg = load_config(str(ROOT / "configs" / "tiny.yaml")).model
    graphdef, params, _ = models.init_params(cfg, mesh, rules, seed=0)
    return cfg, graphdef, params, "configs/tiny.yaml (random init)"


def timed(calls: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (first call's seconds, median of `repeats` later calls' seconds)}; the later calls of the
    different names interleaved, so a change in the machine's load touches them alike."""
    import jax

    def once(fn) -> float:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start

    first = {name: once(fn) for name, fn in calls.items()}
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            times[name].append(once(fn))
    return {name: (first[name], statistics.median(times[name])) for name in calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a jaxllm run / checkpoint or Hugging Face directory")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--prompt-len", type=int, default=32, help="the longest prompt (others are shorter)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import jax
    import numpy as np

    from jaxllm.config import GenerateConfig
    from jaxllm.infer.generate import generate
    from jaxllm.rl.rollout import SamplingSettings, bucket_width, rollout

    cfg, graphdef, params, source = load_model(args.model)
    rng = np.random.default_rng(0)
    lengths = rng.integers(max(1, args.prompt_len // 2), args.prompt_len + 1, args.prompts)
    lengths[0] = args.prompt_len
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]
    width = bucket_width(args.prompt_len, cfg, args.new_tokens)
    rows = args.prompts * args.n
    settings = SamplingSettings(num_generations=args.n, max_new_tokens=args.new_tokens, temperature=args.temperature)
    gen = GenerateConfig(max_new_tokens=args.new_tokens, temperature=args.temperature, num_return_sequences=args.n)
    calls = {
        "rollout": lambda: rollout(graphdef, params, cfg, prompts, settings, jax.random.key(0), 0),
        "generate": lambda: generate(graphdef, params, cfg, prompts, gen, None, 0, width=width),
    }
    results = {"model": source, "devices": f"{jax.device_count()} x {jax.devices()[0].platform}", "rows": rows,
               "prompt_width": width, "new_tokens": args.new_tokens, "load_1min": os.getloadavg()[0]}
    for name, (first, steady) in timed(calls, args.repeats).items():
        results[name] = {"tokens_per_sec": rows * args.new_tokens / steady, "steady_s": steady,
                         "compile_s": max(first - steady, 0.0)}
    results["load_1min_after"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    print(f"rollout {results['rollout']['tokens_per_sec']:,.0f} tokens/s (compile {results['rollout']['compile_s']:.1f} s)"
          f" | generate {results['generate']['tokens_per_sec']:,.0f} tokens/s (compile "
          f"{results['generate']['compile_s']:.1f} s) | {rows} rows x {args.new_tokens} new tokens, load "
          f"{results['load_1min']:.1f} -> {results['load_1min_after']:.1f}")


if __name__ == "__main__":
    main()
