"""Benchmark a config side by side with Hugging Face transformers: `python tools/bench.py CONFIG [...]`.

The same as `jaxllm bench`; see `jaxllm bench --help` and docs/performance.md."""

import sys

from jaxllm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
