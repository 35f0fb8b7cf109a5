#!/usr/bin/env bash
# Post-training steps side by side with TRL (issues 12 and 13): jaxllm's pretraining, SFT, distillation and DPO
# steps next to TRL's SFTTrainer, GKDTrainer and DPOTrainer on the same model, batch and examples. Run on an idle machine
# (nothing else on the cores): the timings are the result. A few minutes on a 2-core CPU (not yet timed idle).
# Usage, from the repository root:  OUT=results bash tools/bench_post_training.sh [part]
# part: all (default) | sft | distill | dpo
set -u
OUT=${OUT:-results}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TRL_EXPERIMENTAL_SILENCE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # on a GPU torch runs in the same process
dev=$(python3 -c "from jaxllm.platforms import keep_off_tpu; keep_off_tpu(); import jax; print(jax.devices()[0].platform)" 2>/dev/null)
part=${1:-all}
run() { echo "== $*"; timeout 1800 "$@" 2>&1 | grep -v -i "warning\|examples/s\|train_runtime\|tokenizer has new" | tail -25; }
if [ "$part" = all ] || [ "$part" = sft ]; then
  # SFT rows (the sft objective's step on packed prompt + completion rows) against TRL packed padding-free
  # (bfd, TRL's recommendation) and padded per example, and a pretraining row, on the tiny model of
  # configs/tiny.yaml (what configs/tiny-sft.yaml fine-tunes; that config takes its model from runs/tiny).
  run python3 -m jaxllm.cli bench configs/tiny.yaml --peer trl --trl-packing both --out "$OUT/post-training-sft-$dev.json"
fi
if [ "$part" = all ] || [ "$part" = distill ]; then
  # The distillation config's teacher must exist (runs/tiny: jaxllm train configs/tiny.yaml).
  if [ -f configs/tiny-distill.yaml ]; then
    run python3 -m jaxllm.cli bench configs/tiny-distill.yaml --peer trl --out "$OUT/post-training-distill-$dev.json"
  else
    echo "configs/tiny-distill.yaml is missing: no distillation rows"
  fi
fi
if [ "$part" = all ] || [ "$part" = dpo ]; then
  # DPO (its reference a copy of the policy, as TRL's is of its own) against TRL's DPOTrainer on the same pairs.
  # The model's shapes come from train.init_from (runs/tiny-sft: jaxllm train configs/tiny.yaml, then
  # configs/tiny-sft.yaml); without it the tiny model of configs/tiny.yaml is given explicitly.
  if [ -e runs/tiny-sft ]; then
    run python3 -m jaxllm.cli bench configs/tiny-dpo.yaml --peer trl --out "$OUT/post-training-dpo-$dev.json"
  else
    echo "runs/tiny-sft is missing: the dpo rows use configs/tiny.yaml's model"
    model=$(python3 -c "
from jaxllm.config import load_config
m = load_config('configs/tiny.yaml').model
print(' '.join(f'model.{k}={getattr(m, k)}' for k in ('family', 'vocab_size', 'd_model', 'num_layers', 'num_heads',
      'num_kv_heads', 'mlp_dim', 'max_seq_len', 'tie_embeddings', 'dtype')))" 2>/dev/null)
    run python3 -m jaxllm.cli bench configs/tiny-dpo.yaml train.init_from=runs/tiny-sft $model --peer trl \
      --out "$OUT/post-training-dpo-$dev.json"
  fi
fi
