"""Compiled memory of a distillation gradient as the vocabulary grows: the whole [B, L, V] logits of student
and teacher at once (train.loss_chunk=0) against `--chunk` positions at a time.

    python tools/distill_memory.py                       # V = 4k, 32k, 128k; B=4, L=512, chunk 128
    python tools/distill_memory.py --vocab 4096 131072 --batch 8 --length 1024

The program is the gradient of the distill objective (jaxllm.train.distill.distill_loss) w.r.t. a tiny
student's parameters, with a tiny teacher, lowered and compiled for this machine's first device without
running; `temp` is XLA's buffer assignment for intermediates (`memory_analysis().temp_size_in_bytes`),
`args` the parameters and batch. One [B, L, V] float32 logits array is shown for scale.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, load_config
from jaxllm.models import model_spec
from jaxllm.train.distill import distill_loss
from jaxllm.train.frozen import FrozenModel

MIB = 2**20


def compiled_memory(vocab: int, batch: int, length: int, chunk: int) -> tuple[int, int]:
    """(temp bytes, argument bytes) of the compiled gradient."""
    student = ModelConfig(vocab_size=vocab, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                          max_seq_len=length, tie_embeddings=True)
    teacher_cfg = dataclasses.replace(student, d_model=128, num_layers=3, mlp_dim=256)
    cfg = load_config(None, ["data.objective.name=distill", "distill.teacher=unused", f"distill.vocab={vocab}",
                             f"train.loss_chunk={chunk}"])
    graphdef, params = model_spec(student)[:2]
    t_graphdef, t_params = model_spec(teacher_cfg)[:2]
    tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    batch_spec = {"inputs": tokens, "targets": tokens, "positions": tokens, "segment_ids": tokens,
                  "loss_mask": jax.ShapeDtypeStruct((batch, length), jnp.float32)}
    norms = {"tokens": jnp.float32(batch * length), "positions": jnp.float32(batch * length)}

    def grad(p, t, b):
        frozen = {"teacher": FrozenModel(t, t_graphdef, teacher_cfg)}
        return jax.grad(lambda p: distill_loss(p, graphdef, b, norms, None, frozen, cfg), has_aux=True)(p)

    stats = jax.jit(grad).lower(params, t_params, batch_spec).compile().memory_analysis()
    return stats.temp_size_in_bytes, stats.argument_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    args = parser.parse_args()
    print(f"B={args.batch} L={args.length}; temp MiB (args MiB) of the gradient, per loss_chunk")
    print(f"{'V':>8} {'one [B,L,V] f32':>16} {'loss_chunk=0':>18} {f'loss_chunk={args.chunk}':>18}")
    for vocab in args.vocab:
        whole = compiled_memory(vocab, args.batch, args.length, 0)
        chunked = compiled_memory(vocab, args.batch, args.length, args.chunk)
        logits = args.batch * args.length * vocab * 4
        print(f"{vocab:>8} {logits / MIB:>16.0f} {whole[0] / MIB:>10.0f} ({whole[1] / MIB:>4.0f}) "
              f"{chunked[0] / MIB:>10.0f} ({chunked[1] / MIB:>4.0f})", flush=True)


if __name__ == "__main__":
    main()
