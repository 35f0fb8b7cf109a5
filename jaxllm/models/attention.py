"""Multi-head attention with grouped/multi-query heads, masks from segment ids and positions, and a KV cache.

One mask rule serves packing, padding, causality, sliding windows and cached decoding: a query attends
to a key when both belong to the same (non-zero) segment, the key is not later than the query, and
(with a window) the key lies fewer than `sliding_window` positions back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.layers import Dense
from jaxllm.models.positions import apply_rope, rope_inv_freq
from jaxllm.sharding import constrain


class CacheView(NamedTuple):
    """One layer's view of the KV cache during decoding.

    k_BSKH, v_BSKH: this layer's cached keys/values (S = cache length).
    index: where the current L new tokens are written (same for every row).
    segment_ids_BS, positions_BS: of every cache slot, already including the new tokens.
    """

    k_BSKH: jax.Array
    v_BSKH: jax.Array
    index: jax.Array
    segment_ids_BS: jax.Array
    positions_BS: jax.Array


def attention_mask(
    q_segment_BL: jax.Array,
    q_pos_BL: jax.Array,
    q_index_L: jax.Array,
    kv_segment_BS: jax.Array,
    kv_pos_BS: jax.Array,
    kv_index_S: jax.Array,
    sliding_window: int | None,
) -> jax.Array:
    """Boolean mask_BLS: True where query l may attend to key s."""
    same = (q_segment_BL[:, :, None] == kv_segment_BS[:, None, :]) & (kv_segment_BS[:, None, :] != 0)
    causal = q_index_L[:, None] >= kv_index_S[None, :]
    mask = same & causal[None]
    if sliding_window is not None:
        mask &= (q_pos_BL[:, :, None] - kv_pos_BS[:, None, :]) < sliding_window
    return mask


def dot_product_attention(q_BLNH, k_BSKH, v_BSKH, mask_BLS, impl: str) -> jax.Array:
    """softmax(q.k / sqrt(H) masked) . v, with K kv heads shared by groups of N/K query heads."""
    implementation = None if impl == "auto" else impl
    return jax.nn.dot_product_attention(
        q_BLNH, k_BSKH, v_BSKH, mask=mask_BLS[:, None, :, :], implementation=implementation
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.sliding_window = cfg.sliding_window
        self.impl = cfg.attention_impl
        self.use_rope = cfg.positions == "rope"
        # A tuple of floats: static (hashable) module data, turned into a constant when traced.
        self.inv_freq = tuple(rope_inv_freq(h, cfg.rope_theta, cfg.rope_scaling).tolist()) if self.use_rope else None
        bias = cfg.attention_bias
        self.q = Dense((d,), (n, h), ("embed", "heads", "head_dim"), cfg, rngs, use_bias=bias)
        self.k = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, rngs, use_bias=bias)
        self.v = Dense((d,), (k, h), ("embed", "kv_heads", "head_dim"), cfg, rngs, use_bias=bias)
        self.o = Dense((n, h), (d,), ("heads", "head_dim", "embed"), cfg, rngs, use_bias=cfg.output_bias)

    def __call__(
        self,
        x_BLD: jax.Array,
        positions_BL: jax.Array,
        segment_ids_BL: jax.Array,
        cache: CacheView | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns the attention output [B, L, D] and, when decoding, this layer's updated (k, v) cache."""
        q_BLNH = constrain(self.q(x_BLD), ("batch", "length", "act_heads", None))
        k_BLKH = constrain(self.k(x_BLD), ("batch", "length", "act_kv_heads", None))
        v_BLKH = constrain(self.v(x_BLD), ("batch", "length", "act_kv_heads", None))
        if self.use_rope:
            q_BLNH = apply_rope(q_BLNH, positions_BL, self.inv_freq)
            k_BLKH = apply_rope(k_BLKH, positions_BL, self.inv_freq)
        L = x_BLD.shape[1]
        if cache is None:
            index_L = jnp.arange(L)
            mask = attention_mask(
                segment_ids_BL, positions_BL, index_L, segment_ids_BL, positions_BL, index_L, self.sliding_window
            )
            out_BLNH = dot_product_attention(q_BLNH, k_BLKH, v_BLKH, mask, self.impl)
            new_cache = None
        else:
            start = (0, cache.index, 0, 0)
            k_BSKH = jax.lax.dynamic_update_slice(cache.k_BSKH, k_BLKH.astype(cache.k_BSKH.dtype), start)
            v_BSKH = jax.lax.dynamic_update_slice(cache.v_BSKH, v_BLKH.astype(cache.v_BSKH.dtype), start)
            S = k_BSKH.shape[1]
            mask = attention_mask(
                segment_ids_BL,
                positions_BL,
                cache.index + jnp.arange(L),
                cache.segment_ids_BS,
                cache.positions_BS,
                jnp.arange(S),
                self.sliding_window,
            )
            out_BLNH = dot_product_attention(
                q_BLNH, k_BSKH.astype(q_BLNH.dtype), v_BSKH.astype(q_BLNH.dtype), mask, self.impl
            )
            new_cache = (k_BSKH, v_BSKH)
        out_BLNH = constrain(out_BLNH, ("batch", "length", "act_heads", None))
        return self.o(out_BLNH), new_cache
