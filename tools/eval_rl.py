"""Held-out reward of a policy: mean reward of its greedy and of its sampled completions (jaxllm.rl.evaluate).

    python tools/eval_rl.py runs/tiny-sft --data builtin:kjv-rl-valid --rewards exact_match --samples 4

RUN is a jaxllm run or checkpoint (or a Hugging Face directory). `--rewards` is a comma-separated list of
reward functions: built-in names (exact_match, numeric, format, length, ...) or `module:function`; `--rewards-json`
gives the full specs instead (the config's rl.rewards list, e.g. '[{"function": "format", "args": {"pattern":
"..."}}]'). Prints the metrics (greedy/reward, greedy/rewards/NAME/mean, per task, sampled/..., sampled/pass@n)
and the seconds it took; `--json FILE` writes them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jaxllm.infer.judge import open_model
from jaxllm.rl.evaluate import held_out_reward, read_records
from jaxllm.rl.rewards import reward_functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a jaxllm run directory or checkpoint, or a Hugging Face model directory")
    parser.add_argument("--data", default="builtin:kjv-rl-valid", help="builtin:NAME or a jsonl file of prompts")
    parser.add_argument("--rewards", default="exact_match", help="comma-separated reward functions")
    parser.add_argument("--rewards-json", help="the reward specs as a JSON list (overrides --rewards)")
    parser.add_argument("--samples", type=int, default=4, help="sampled completions per prompt (0: greedy only)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64, help="rows generated at once")
    parser.add_argument("--limit", type=int, help="only the first LIMIT records")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the metrics here")
    args = parser.parse_args()
    specs = json.loads(args.rewards_json) if args.rewards_json else [
        {"function": name.strip()} for name in args.rewards.split(",") if name.strip()]
    funcs = reward_functions(specs, where="--rewards")
    model, records = open_model(args.run), read_records(args.data, args.limit)
    start = time.perf_counter()
    metrics = held_out_reward(model, records, funcs, samples=args.samples, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    metrics["seconds"] = time.perf_counter() - start
    for key, value in metrics.items():
        print(f"{key:40s} {value:.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1) + "\n")


if __name__ == "__main__":
    main()
