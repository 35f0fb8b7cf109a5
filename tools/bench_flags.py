"""XLA flag sets compared on the train step, one process per set (flags are read once per process),
the sets alternated round by round so a changing machine load hits them alike.

    python tools/bench_flags.py configs/tiny.yaml --flags=";--xla_cpu_use_onednn=true" [--rounds 4]
        [--steps 10] [model.remat=full ...]

`--flags=` takes the XLA_FLAGS values separated by ";" (the first, here empty, is the baseline).

Prints each set's median step time and its ratio to the first set (the median of per-round ratios).
Run it on an idle machine (`uptime`); docs/performance.md lists what was tried.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(config: str, steps: int, overrides: list[str]) -> None:
    import jax

    from jaxllm import bench, sharding
    from jaxllm.config import load_config

    setup = bench._setup(load_config(config, overrides))
    with sharding.activate(setup.mesh, setup.rules):
        step = setup.step_fn.lower(setup.state, setup.batch).compile()
    state, times = setup.state, []
    for i in range(3 + steps):
        t = time.perf_counter()
        state, metrics = step(state, setup.batch)
        jax.block_until_ready(metrics["loss"])
        if i >= 3:
            times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps(statistics.median(times)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--flags", required=True, help='XLA_FLAGS values separated by ";", the first the baseline')
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, overrides = p.parse_known_args()
    if args.worker:
        _worker(args.config, args.steps, overrides)
        return 0
    sets = args.flags.split(";")
    medians: dict[str, list[float]] = {f: [] for f in sets}
    for r in range(args.rounds):
        for flags in sets:
            cmd = [sys.executable, __file__, args.config, "--worker", "--flags=", "--steps", str(args.steps),
                   *overrides]
            out = subprocess.run(cmd, env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if not lines:
                print(f"{flags!r} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            medians[flags].append(json.loads(lines[0][7:]))
            print(f"round {r} load {os.getloadavg()[0]:.2f} {flags or '(none)'}: "
                  f"{1e3 * medians[flags][-1]:.1f} ms", flush=True)
    base = medians[sets[0]]
    for flags, ms in medians.items():
        ratio = statistics.median(m / b for m, b in zip(ms, base))
        print(f"{flags or '(none)':60s} {1e3 * statistics.median(ms):8.1f} ms  x{ratio:.3f} of the first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
