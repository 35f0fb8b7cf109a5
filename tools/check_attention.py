"""Checks the fused attention kernel against the XLA reference on this machine's accelerator.

On a GPU: cuDNN flash attention (packed segments, GQA, causal, sliding window) vs the XLA kernel with
a dense mask, in bfloat16, forward and gradients; prints relative errors and timings. On a CPU only the
XLA path exists (the CPU test suite checks it against an einsum reference).
Usage: python tools/check_attention.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.attention import Masking, attention_mask, dot_product_attention


def case(B=4, L=2048, N=32, K=8, H=64, window=None, segments=3, seed=0, dtype=jnp.bfloat16):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(k1, (B, L, N, H), dtype)
    k = jax.random.normal(k2, (B, L, K, H), dtype)
    v = jax.random.normal(k3, (B, L, K, H), dtype)
    # Packed rows: `segments` documents of random lengths, then padding.
    cuts = np.sort(np.random.default_rng(seed).integers(1, L - 64, (B, segments - 1)), axis=1)
    seg = np.zeros((B, L), np.int32)
    pos = np.zeros((B, L), np.int32)
    for b in range(B):
        bounds = [0, *cuts[b], L - 64]
        for i in range(segments):
            seg[b, bounds[i]:bounds[i + 1]] = i + 1
            pos[b, bounds[i]:bounds[i + 1]] = np.arange(bounds[i + 1] - bounds[i])
    seg, pos, idx = jnp.asarray(seg), jnp.asarray(pos), jnp.arange(L)
    dense = attention_mask(seg, pos, idx, seg, pos, idx, True, window)
    return (q, k, v), Masking(dense, seg, seg, True, window, "xla"), Masking(None, seg, seg, True, window, "cudnn"), seg


def rel(a, b, valid):
    a, b = np.asarray(a, np.float32)[valid], np.asarray(b, np.float32)[valid]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def timeit(f, *args, n=10):
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


def plain_causal(q, k, v, scale):
    """cuDNN through the public API: causal only (rows without packing): the speed ceiling."""
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")


def main():
    print("backend", jax.default_backend(), jax.devices()[0].device_kind, "jax", jax.__version__)
    if jax.default_backend() != "gpu":
        print("no GPU: nothing to compare (cuDNN only runs on NVIDIA GPUs)")
        return
    for window in (None, 256):
        (q, k, v), dense, fused, seg = case(window=window)
        valid = np.asarray(seg) > 0
        scale = q.shape[-1] ** -0.5

        def loss(masking):
            return lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, masking, None, scale).astype(jnp.float32) ** 2)

        ref = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, dense, None, scale))
        fast = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, fused, None, scale))
        g_ref = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))
        g_fast = jax.jit(jax.grad(loss(fused), argnums=(0, 1, 2)))
        out_err = rel(fast(q, k, v), ref(q, k, v), valid)
        grad_errs = [rel(a, b, valid) for a, b in zip(g_fast(q, k, v), g_ref(q, k, v))]
        g_plain = jax.jit(jax.grad(lambda q, k, v: jnp.sum(plain_causal(q, k, v, scale).astype(jnp.float32) ** 2),
                                   argnums=(0, 1, 2)))
        print(f"plain causal cudnn fwd+bwd ms {1e3 * timeit(g_plain, q, k, v):.2f}")
        print(f"window={window}: forward rel err {out_err:.2e}; grad rel err q/k/v "
              + " ".join(f"{e:.2e}" for e in grad_errs)
              + f"; fwd+bwd ms xla {1e3 * timeit(g_ref, q, k, v):.2f} cudnn {1e3 * timeit(g_fast, q, k, v):.2f}")


if __name__ == "__main__":
    main()
