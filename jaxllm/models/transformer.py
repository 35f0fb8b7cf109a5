"""The decoder-only transformer (LLaMA, Mistral, Qwen2, GPT-2 are configurations of it)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.attention import Attention, CacheView
from jaxllm.models.layers import DTYPES, MLP, Dense, Embed, Norm
from jaxllm.models.positions import LearnedPositions
from jaxllm.sharding import constrain

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class DecodeCache(NamedTuple):
    """KV cache of all layers. k, v: [layers, B, S, K, H]; segment_ids, positions: [B, S] of each slot
    (segment 0 = empty or padding); index: the next slot to write."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, length: int) -> DecodeCache:
    shape = (cfg.num_layers, batch, length, cfg.kv_heads, cfg.dim_per_head)
    dtype = DTYPES[cfg.dtype]
    return DecodeCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        segment_ids=jnp.zeros((batch, length), jnp.int32),
        positions=jnp.zeros((batch, length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.d_model, cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BLD, positions_BL, segment_ids_BL, cache: CacheView | None = None):
        h_BLD, new_cache = self.attn(self.attn_norm(x_BLD), positions_BL, segment_ids_BL, cache)
        x_BLD = constrain(x_BLD + h_BLD, ("batch", "length", "act_embed"))
        x_BLD = constrain(x_BLD + self.mlp(self.mlp_norm(x_BLD)), ("batch", "length", "act_embed"))
        return x_BLD, new_cache


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)
        self.pos_embed = LearnedPositions(cfg, rngs) if cfg.positions == "learned" else None
        if cfg.scan_layers:
            # One stacked Block whose parameters have a leading "layers" axis, applied with lax.scan.
            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(rngs):
                return Block(cfg, rngs)

            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = Norm(cfg.d_model, cfg, rngs)
        self.lm_head = (
            None if cfg.tie_embeddings else Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg, rngs)
        )

    def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, cache: DecodeCache | None = None):
        """Logits [B, L, V] in float32, and the updated cache when one is given."""
        x_BLD, cache = self.hidden(tokens_BL, positions_BL, segment_ids_BL, cache)
        return self.logits(x_BLD), cache

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        if self.lm_head is None:
            logits_BLV = self.embed.attend(x_BLD)
        else:
            logits_BLV = self.lm_head(x_BLD)
        return constrain(logits_BLV.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def hidden(self, tokens_BL, positions_BL=None, segment_ids_BL=None, cache: DecodeCache | None = None):
        """Final-norm hidden states [B, L, D] (before the output projection) and the updated cache.

        positions_BL default to 0..L-1 and segment_ids_BL to all ones (one unpadded sequence per row).
        With a cache, the L tokens are written at cache.index and attend to everything cached before.
        """
        B, L = tokens_BL.shape
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)
        x_BLD = self.embed(tokens_BL)
        if self.pos_embed is not None:
            x_BLD = x_BLD + self.pos_embed(positions_BL)
        x_BLD = constrain(x_BLD, ("batch", "length", "act_embed"))
        if cache is not None:
            start = (0, cache.index)
            cache = cache._replace(
                segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids_BL.astype(jnp.int32), start),
                positions=jax.lax.dynamic_update_slice(cache.positions, positions_BL.astype(jnp.int32), start),
            )
        x_BLD, new_kv = self._run_layers(x_BLD, positions_BL, segment_ids_BL, cache)
        if cache is not None:
            cache = cache._replace(k=new_kv[0], v=new_kv[1], index=cache.index + L)
        return self.final_norm(x_BLD), cache

    def _run_layers(self, x_BLD, positions_BL, segment_ids_BL, cache: DecodeCache | None):
        cfg = self.cfg

        def apply_block(block_state, x_BLD, layer_kv):
            block = nnx.merge(graphdef, block_state)
            view = None if layer_kv is None else CacheView(*layer_kv, cache.index, cache.segment_ids, cache.positions)
            return block(x_BLD, positions_BL, segment_ids_BL, view)

        if cfg.remat != "none" and cache is None:
            apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)
            kv = None if cache is None else (cache.k, cache.v)

            def body(x_BLD, xs):
                block_state, layer_kv = xs
                return apply_block(block_state, x_BLD, layer_kv)

            return jax.lax.scan(body, x_BLD, (stacked, kv))

        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            graphdef, block_state = nnx.split(block)
            layer_kv = None if cache is None else (cache.k[i], cache.v[i])
            x_BLD, out_kv = apply_block(block_state, x_BLD, layer_kv)
            if out_kv is not None:
                new_k.append(out_kv[0])
                new_v.append(out_kv[1])
        return x_BLD, (None if cache is None else (jnp.stack(new_k), jnp.stack(new_v)))
