"""Multi-head attention (MHA/GQA/MQA, self or cross), the mask rule, and KV-cache writes.

One mask rule serves packing, padding, causality, sliding windows and cached decoding: a query attends
to a key when both belong to the same (non-zero) segment, the key is not later than the query (causal
stacks), and (with a window) the key lies fewer than `sliding_window` positions back. Masks and
position biases are computed once per stack and shared by its layers, and so is the choice of kernel
(`resolve_impl`, carried in `Masking`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.layers import Dense
from jaxllm.models.positions import apply_rope, rope_inv_freq
from jaxllm.sharding import active_platform, constrain


class Masking(NamedTuple):
    """What decides who attends to whom, and with which kernel: computed once per stack (`resolve_impl`)
    and shared by its layers.

    dense_BLS: the boolean mask (built for the XLA kernel; None when the kernel builds its own).
    The segment ids and the causal/window settings feed kernels that take them directly (cuDNN, splash).
    impl: the kernel ("xla", "cudnn", "splash", "splash_interpret"); cross-attention always uses XLA.
    """

    dense_BLS: jax.Array | None
    q_segment_BL: jax.Array
    kv_segment_BS: jax.Array
    causal: bool
    sliding_window: int | None
    impl: str = "xla"


class LayerCache(NamedTuple):
    """One layer's cached keys/values [B, S, K, H] and where the current tokens are written; in a
    decoder with cross-attention also the keys/values of the encoder memory [B, S_enc, K, H], computed
    once at prefill (None until then)."""

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    index: jax.Array
    cross_k_BSKH: jax.Array | None = None
    cross_v_BSKH: jax.Array | None = None


def attention_mask(
    q_segment_BL: jax.Array,
    q_pos_BL: jax.Array,
    q_index_L: jax.Array,
    kv_segment_BS: jax.Array,
    kv_pos_BS: jax.Array,
    kv_index_S: jax.Array,
    causal: bool = True,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean mask_BLS: True where query l may attend to key s (the XLA kernel's input)."""
    mask = (q_segment_BL[:, :, None] == kv_segment_BS[:, None, :]) & (kv_segment_BS[:, None, :] != 0)
    if causal:
        mask &= (q_index_L[:, None] >= kv_index_S[None, :])[None]
    if sliding_window is not None:
        mask &= (q_pos_BL[:, :, None] - kv_pos_BS[:, None, :]) < sliding_window
    return mask


# Kernels that take segment ids instead of a dense mask, and aligned query/key rows.
FUSED_KERNELS = ("cudnn", "splash", "splash_interpret")


def resolve_impl(impl: str, dtype, has_bias: bool, decoding: bool, length: int | None = None) -> str:
    """The kernel of a stack's self-attention; the one place it is decided (`Stack.run` carries it to the
    layers in `Masking`; the trainer asks it whether cuDNN's segment bound applies). The fused kernels
    take aligned query/key rows, so decoding with a cache always uses XLA. "auto": cuDNN flash attention
    on GPUs (bf16/fp16), Pallas splash attention on TPUs (sequences a multiple of 128), for training and
    prefill without a position bias; XLA otherwise (ALiBi/T5 biases, CPUs). `dtype`: the compute dtype."""
    if decoding:
        return "xla"
    if impl != "auto":
        return impl
    if has_bias:
        return "xla"
    backend = active_platform()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu" and (length is None or length % 128 == 0):
        return "splash"
    return "xla"


def dot_product_attention(q_BLNH, k_BSKH, v_BSKH, masking: Masking, bias_BNLS, scale: float) -> jax.Array:
    """softmax(scale * q.k + bias, masked) . v, with K kv heads shared by groups of N/K query heads,
    computed by the kernel `masking.impl`."""
    impl = masking.impl
    if impl == "cudnn":
        return _cudnn_attention(q_BLNH, k_BSKH, v_BSKH, masking, bias_BNLS, scale)
    if impl in ("splash", "splash_interpret"):
        if bias_BNLS is not None:
            raise ValueError("splash attention takes no position bias; use attention_impl=xla")
        return splash_attention(q_BLNH, k_BSKH, v_BSKH, masking, scale, interpret=impl == "splash_interpret")
    return _xla_attention(q_BLNH, k_BSKH, v_BSKH, masking.dense_BLS, bias_BNLS, scale)


def _xla_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, bias_BNLS, scale: float) -> jax.Array:
    """The XLA kernel: jax.nn.dot_product_attention's XLA path (logits and softmax in float32, masked
    logits set to a large negative number), laid out for XLA's CPU backend: heads first, the query
    heads of a kv head folded into the query length ([B, K, G*L, H]), so both matmuls and their
    gradients are plain batched matmuls. jax.nn's [B, L, K, G, H] layout made the backward pass
    transpose the [L, S] probabilities several times per layer (docs/performance.md)."""
    B, L, N, H = q_BLNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    q_BKQH = q_BLNH.reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * L, H)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    logits = jnp.einsum("bkqh,bksh->bkqs", q_BKQH, k_BKSH, preferred_element_type=jnp.float32)
    logits_BKGLS = logits.reshape(B, K, G, L, S) * jnp.float32(scale)
    if bias_BNLS is not None:  # [B or 1, N or 1, L, S]
        b, n = bias_BNLS.shape[:2]
        bias = bias_BNLS.astype(q_BLNH.dtype).astype(jnp.float32)
        logits_BKGLS = logits_BKGLS + (bias.reshape(b, K, G, L, S) if n == N else bias[:, :, None])
    large_negative = -0.7 * float(jnp.finfo(jnp.float32).max)
    logits_BKGLS = jnp.where(mask_BLS[:, None, None], logits_BKGLS, large_negative)
    probs_BKQS = jax.nn.softmax(logits_BKGLS, axis=-1).astype(v_BSKH.dtype).reshape(B, K, G * L, S)
    out_BKQH = jnp.einsum("bkqs,bksh->bkqh", probs_BKQS, v_BKSH)
    return out_BKQH.reshape(B, K, G, L, H).transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)


# cuDNN's packed layout takes a fixed number of segment slots per row, and its workspace grows with it;
# the trainer checks every batch against this bound (a row with more documents is an error, never
# silently wrong attention).
MAX_SEGMENTS = 16


def segment_offsets(segment_ids_BL: jax.Array, max_segments: int = MAX_SEGMENTS) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout of a row of contiguous segments (ids 1, 2, ...; padding 0 before the first, as online
    RL's left-padded prompts, or after the last): offsets [B, M+1] (start of each segment, -1 after the last) and
    lengths [B, M] (-1 after the last)."""
    B, L = segment_ids_BL.shape
    M = min(max_segments, L)
    previous = jnp.pad(segment_ids_BL[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    is_start = (segment_ids_BL != previous) & (segment_ids_BL != 0)
    starts_BM = jax.vmap(lambda row: jnp.nonzero(row, size=M, fill_value=-1)[0])(is_start).astype(jnp.int32)
    end_B = (L - jnp.argmax((segment_ids_BL != 0)[:, ::-1], axis=1)).astype(jnp.int32)  # one past the last real
    following = jnp.concatenate([starts_BM[:, 1:], jnp.full((B, 1), -1, jnp.int32)], axis=1)
    ends_BM = jnp.where(following >= 0, following, end_B[:, None])
    lengths_BM = jnp.where(starts_BM >= 0, ends_BM - starts_BM, -1)
    offsets_BM1 = jnp.concatenate([starts_BM, jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return offsets_BM1, lengths_BM


def _cudnn_attention(q_BLNH, k_BSKH, v_BSKH, masking: Masking, bias_BNLS, scale: float) -> jax.Array:
    """cuDNN fused (flash) attention. Packed rows use its segment layout (offsets and lengths per
    segment), so no [L, S] mask is ever built; self-attention only (query and key rows align)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_dpa

    offsets, lengths = segment_offsets(masking.q_segment_BL)
    mask_type = MaskType.PADDING_CAUSAL if masking.causal else MaskType.PADDING
    return cudnn_dpa(
        q_BLNH, k_BSKH, v_BSKH, bias=None if bias_BNLS is None else bias_BNLS.astype(q_BLNH.dtype),
        q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets, scale=scale,
        mask_type=mask_type, qkv_layout="BTNH", sliding_window_length=masking.sliding_window,
    )


def splash_attention(q_BLNH, k_BSKH, v_BSKH, masking: Masking, scale: float, interpret: bool = False) -> jax.Array:
    """Pallas splash attention (TPU): block-sparse flash attention with segment ids, so packed rows
    need no [L, S] mask. GQA runs the multi-query kernel once per kv head. The kernel is per device:
    under a mesh it runs inside shard_map over the batch and kv-head shards. `interpret` runs the
    kernel in the Pallas interpreter (any backend; used by the CPU tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    from jaxllm.sharding import shard_map_by_names

    B, L, N, H = q_BLNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    if masking.sliding_window is not None:
        mask = masks.LocalMask((L, L), window_size=(masking.sliding_window - 1, 0 if masking.causal else None), offset=0)
    else:
        mask = masks.CausalMask((L, L)) if masking.causal else masks.FullMask((L, L))
    block = min(512, L)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)

    def per_device(q_BLKGH, k_BSKH, v_BSKH, seg_BL):
        kernel = splash.make_splash_mqa(masks.MultiHeadMask([mask] * G), block_sizes=sizes, head_shards=1,
                                        q_seq_shards=1, interpret=interpret)
        q_BKGLH = (q_BLKGH * scale).transpose(0, 2, 3, 1, 4)
        k_BKLH, v_BKLH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)

        def one_row(q_KGLH, k_KLH, v_KLH, seg_L):
            ids = splash.SegmentIds(q=seg_L, kv=seg_L)
            return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q_KGLH, k_KLH, v_KLH)

        return jax.vmap(one_row)(q_BKGLH, k_BKLH, v_BKLH, seg_BL).transpose(0, 3, 1, 2, 4)  # [B, L, K, G, H]

    # Query heads grouped by kv head, so a head-sharded mesh splits queries and keys alike.
    q_BLKGH = q_BLNH.reshape(B, L, K, G, H)
    names_q, names_kv = ("batch", None, "act_kv_heads", None, None), ("batch", None, "act_kv_heads", None)
    out_BLKGH = shard_map_by_names(per_device, (names_q, names_kv, names_kv, ("batch", None)), names_q)(
        q_BLKGH, k_BSKH, v_BSKH, masking.q_segment_BL)
    return out_BLKGH.reshape(B, L, N, H)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, cross: bool = False):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        self.scale = h**-0.5 if cfg.scale_attention else 1.0
        # RoPE rotates self-attention only. A tuple of floats: static, hashable module data.
        use_rope = cfg.positions == "rope" and not cross
        self.inv_freq = tuple(rope_inv_freq(h, cfg.rope_theta, cfg.rope_scaling).tolist()) if use_rope else None
        bias = cfg.attention_bias
        self.q = Dense((d,), (n, h), ("embed", "heads", "head_dim"), cfg, rngs, use_bias=bias)
        self.k = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, rngs, use_bias=bias)
        self.v = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, rngs, use_bias=bias)
        self.o = Dense((n, h), (d,), ("heads", "head_dim", "embed"), cfg, rngs, use_bias=cfg.output_bias)

    def __call__(
        self,
        x_BLD: jax.Array,
        positions_BL: jax.Array,
        masking: Masking,
        bias_BNLS: jax.Array | None = None,
        cache: LayerCache | None = None,
        memory_BSD: jax.Array | None = None,
        memory_kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attention output [B, L, D] and, with a cache, this layer's updated (k, v); cross-attention
        returns the memory's (k, v) (what a decoding cache keeps).

        Self-attention reads keys/values from x (and the cache); cross-attention from memory_BSD, or
        from memory_kv, the memory's keys/values computed once before (cached decoding).
        """
        q_BLNH = constrain(self.q(x_BLD), ("batch", "length", "act_heads", None))
        cross = memory_BSD is not None or memory_kv is not None
        if memory_kv is not None:  # cached: stored in the cache's dtype
            k_BSKH, v_BSKH = (a.astype(q_BLNH.dtype) for a in memory_kv)
        else:
            source_BSD = memory_BSD if cross else x_BLD
            k_BSKH = constrain(self.k(source_BSD), ("batch", "length", "act_kv_heads", None))
            v_BSKH = constrain(self.v(source_BSD), ("batch", "length", "act_kv_heads", None))
        new_cache = (k_BSKH, v_BSKH) if cross else None
        if self.inv_freq is not None:
            q_BLNH = apply_rope(q_BLNH, positions_BL, self.inv_freq)
            k_BSKH = apply_rope(k_BSKH, positions_BL, self.inv_freq)
        if cache is not None and not cross:
            start = (0, cache.index, 0, 0)
            k_BSKH = jax.lax.dynamic_update_slice(cache.k_BSKH, k_BSKH.astype(cache.k_BSKH.dtype), start)
            v_BSKH = jax.lax.dynamic_update_slice(cache.v_BSKH, v_BSKH.astype(cache.v_BSKH.dtype), start)
            new_cache = (k_BSKH, v_BSKH)
            k_BSKH, v_BSKH = k_BSKH.astype(q_BLNH.dtype), v_BSKH.astype(q_BLNH.dtype)
        out_BLNH = dot_product_attention(q_BLNH, k_BSKH, v_BSKH, masking, bias_BNLS, self.scale)
        out_BLNH = constrain(out_BLNH, ("batch", "length", "act_heads", None))
        return self.o(out_BLNH), new_cache
