#!/usr/bin/env bash
# The GPU measurements behind docs/performance.md, in one run (about 8 minutes on one H100).
# Usage, from the repository root on a GPU machine:  OUT=results bash tools/gpu_bench.sh [part]
# part: all (default) | check | train | scaling | generate | profile
set -u
OUT=${OUT:-results}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch runs in the same process for the side-by-side
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
part=${1:-all}
run() { echo "== $*"; timeout 600 "$@" 2>&1 | grep -v -i "warning" | tail -25; }
if [ "$part" = all ] || [ "$part" = check ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
  run python3 tools/check_attention.py
fi
if [ "$part" = all ] || [ "$part" = train ]; then
  run python3 tools/bench.py configs/bench-1b.yaml train.batch_size=8 --peer both --out "$OUT/bench-1b-b8.json"
  run python3 tools/bench.py configs/bench-1b.yaml train.batch_size=16 --peer none --out "$OUT/bench-1b-b16.json"
  run python3 tools/bench.py configs/bench-1b.yaml train.batch_size=8 model.attention_impl=xla --peer none --out "$OUT/bench-1b-b8-xla.json"
fi
if [ "$part" = all ] || [ "$part" = scaling ]; then
  for sl in "16 1024" "8 2048" "4 4096" "2 8192"; do set -- $sl
    run python3 tools/bench.py configs/bench-100m.yaml model.dtype=bfloat16 model.max_seq_len=8192 train.batch_size=$1 data.seq_len=$2 --peer none --steps 5 --out "$OUT/scaling-100m-$2.json"
  done
  run python3 tools/bench.py configs/bench-100m.yaml model.dtype=bfloat16 train.batch_size=16 data.seq_len=2048 --peer both --out "$OUT/bench-100m.json"
fi
if [ "$part" = all ] || [ "$part" = generate ]; then
  run python3 tools/bench.py configs/bench-1b.yaml --peer eager --steps 3 --warmup 1 --generate --out "$OUT/generate-1b.json"
fi
if [ "$part" = all ] || [ "$part" = profile ]; then
  # Where the 1B step's time goes: its parts timed alone, and a trace to read in TensorBoard/Perfetto.
  run python3 tools/bench.py configs/bench-1b.yaml train.batch_size=8 --peer none --steps 6 --breakdown --profile "$OUT/trace-1b-b8" --out "$OUT/breakdown-1b-b8.json"
fi
