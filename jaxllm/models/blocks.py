"""Embedding layers, transformer blocks, and `Stack`: the embeddings -> layers -> final norm pipeline
shared by decoders, encoders and both halves of encoder-decoders.

Blocks return (x, new cache, aux): aux holds the sums a mixture-of-experts layer reports for the losses
(models/moe.py) and is empty for dense layers, so the dense path carries nothing extra."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.attention import FUSED_KERNELS, Attention, LayerCache, Masking, attention_mask, resolve_impl
from jaxllm.models.layers import (DTYPES, MLP, Dense, Norm, dropout_active, fold_dropout_key, make_param,
                                  perturbed)
from jaxllm.models.moe import MoE, add_aux, is_moe_layer
from jaxllm.models.positions import LearnedPositions, RelativePositionBias, alibi_bias, alibi_slopes
from jaxllm.sharding import active_platform, constrain

REMAT_POLICIES = {
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class StackCache(NamedTuple):
    """KV cache of a stack. k, v: [layers, B, S, K, H]; segment_ids, positions: [B, S] of each slot
    (segment 0 = empty or padding); index: the next slot to write. A decoder with cross-attention also
    keeps the encoder memory's keys/values cross_k, cross_v [layers, B, S_enc, K, H]: None in an empty
    cache, filled by the first (prefill) call, then read by every decoding step instead of projecting
    the memory again."""

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    index: jax.Array
    cross_k: jax.Array | None = None
    cross_v: jax.Array | None = None


class Memory(NamedTuple):
    """Encoder output that a decoder stack cross-attends to."""

    x_BSD: jax.Array
    segment_ids_BS: jax.Array


class Embeddings(nnx.Module):
    """Everything added to token vectors before the layers: learned positions, token types, the
    sqrt(d) scale, a norm, and the factorised-embedding projection E -> D (ALBERT, ELECTRA)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, pdtype = cfg.embedding_dim, DTYPES[cfg.param_dtype]
        self.scale = cfg.d_model**0.5 if cfg.embed_scale else None
        self.positions = LearnedPositions(cfg, rngs) if cfg.positions == "learned" else None
        self.token_types = (
            make_param(rngs, nnx.initializers.normal(cfg.init_std), (cfg.type_vocab_size, e), ("vocab", "embed"), pdtype)
            if cfg.type_vocab_size
            else None
        )
        self.norm = Norm(e, cfg, rngs) if cfg.embed_norm else None
        self.project = Dense((e,), (cfg.d_model,), ("embed_factor", "embed"), cfg, rngs, use_bias=True) if cfg.embed_dim else None

    def __call__(self, x_BLE, positions_BL, token_types_BL=None) -> jax.Array:
        if self.scale is not None:
            x_BLE = x_BLE * self.scale
        if self.positions is not None:
            x_BLE = x_BLE + self.positions(positions_BL)
        if self.token_types is not None:
            types_BL = jnp.zeros_like(positions_BL) if token_types_BL is None else token_types_BL
            x_BLE = x_BLE + jnp.take(self.token_types[...], types_BL, axis=0).astype(x_BLE.dtype)
        if self.norm is not None:
            x_BLE = self.norm(x_BLE)
        if self.project is not None:
            x_BLE = self.project(x_BLE)
        return x_BLE


class Block(nnx.Module):
    """Self-attention, optional cross-attention, MLP; each as pre-norm `x + f(norm(x))` or post-norm
    `norm(x + f(x))`."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, cross_attention: bool = False, moe: bool = False):
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = Norm(cfg.d_model, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.cross_norm = Norm(cfg.d_model, cfg, rngs) if cross_attention else None
        self.cross = Attention(cfg, rngs, cross=True) if cross_attention else None
        self.mlp_norm = Norm(cfg.d_model, cfg, rngs)
        self.mlp = MoE(cfg, rngs) if moe else MLP(cfg, rngs)

    def _input(self, norm, x_BLD):
        """What a sublayer f reads: norm(x) (pre-norm) or x (post-norm)."""
        return norm(x_BLD) if self.pre_norm else x_BLD

    def _residual(self, norm, x_BLD, out_BLD):
        """x + f(norm(x)) (pre-norm) or norm(x + f(x)) (post-norm), given f's output."""
        out = x_BLD + out_BLD if self.pre_norm else norm(x_BLD + out_BLD)
        return constrain(out, ("batch", "length", "act_embed"))

    def __call__(self, x_BLD, positions_BL, masking, bias_BNLS, cache=None, memory=None, memory_masking=None,
                 valid_BL=None):
        """(x, this layer's new (k, v) or None, aux). valid_BL marks real tokens (for MoE routing).

        With a cache, a cross-attending block reads the memory's keys/values from it when they are
        there (cache.cross_k_BSKH) and returns (k, v, cross k, cross v)."""
        out_BLD, new_cache = self.attn(self._input(self.attn_norm, x_BLD), positions_BL, masking, bias_BNLS, cache)
        x_BLD = self._residual(self.attn_norm, x_BLD, out_BLD)
        if self.cross is not None:
            cached = None if cache is None or cache.cross_k_BSKH is None else (cache.cross_k_BSKH, cache.cross_v_BSKH)
            out_BLD, cross_kv = self.cross(self._input(self.cross_norm, x_BLD), positions_BL, memory_masking,
                                           memory_BSD=None if cached is not None else memory, memory_kv=cached)
            x_BLD = self._residual(self.cross_norm, x_BLD, out_BLD)
            if cache is not None:
                new_cache = (*new_cache, *cross_kv)
        h_BLD = self._input(self.mlp_norm, x_BLD)
        out_BLD, aux = self.mlp(h_BLD, valid_BL) if isinstance(self.mlp, MoE) else (self.mlp(h_BLD), {})
        return self._residual(self.mlp_norm, x_BLD, out_BLD), new_cache, aux


def run_in_order(blocks, x_BLD, kv, apply):
    """x through `blocks` one after another: the loop of an unrolled stack and of a `LayerGroup`.

    apply(i, block, x_BLD, layer_kv) -> (x_BLD, the layer's new (k, v, ...) or None, aux), where layer_kv
    is the i-th layer's slice of kv = (k, v[, cross k, cross v]) [len(blocks), B, S, K, H], or None without
    a cache. Returns x_BLD, the layers' new kv stacked (None without a cache) and the aux sums."""
    outs, aux = [], {}
    for i, block in enumerate(blocks):
        x_BLD, out_kv, block_aux = apply(i, block, x_BLD, None if kv is None else tuple(a[i] for a in kv))
        outs.append(out_kv)
        aux = add_aux(aux, block_aux)
    new_kv = None if kv is None else tuple(jnp.stack(parts) for parts in zip(*outs))
    return x_BLD, new_kv, aux


class LayerGroup(nnx.Module):
    """`moe.every` consecutive layers, dense ones then a mixture: the unit that scanned stacks repeat
    when only every k-th layer is a mixture, so the scan stays uniform."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.size = cfg.moe.every
        for j in range(self.size - 1):
            setattr(self, f"dense{j}", Block(cfg, rngs))
        self.moe = Block(cfg, rngs, moe=True)

    def __call__(self, x_BLD, positions_BL, masking, bias_BNLS, cache=None, memory=None, memory_masking=None,
                 valid_BL=None):
        """As Block.__call__, with a cache of `size` layers (k, v: [size, B, S, K, H])."""
        blocks = [getattr(self, f"dense{j}") for j in range(self.size - 1)] + [self.moe]

        def apply(j, block, x_BLD, layer_kv):
            layer_cache = None if layer_kv is None else LayerCache(layer_kv[0], layer_kv[1], cache.index)
            return block(x_BLD, positions_BL, masking, bias_BNLS, layer_cache, memory, memory_masking, valid_BL)

        return run_in_order(blocks, x_BLD, None if cache is None else (cache.k_BSKH, cache.v_BSKH), apply)


class Stack(nnx.Module):
    """Embeddings (beyond the token table), a stack of blocks, the final norm (pre-norm models) and the
    position biases (ALiBi, T5 relative) the blocks share."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, num_layers: int, causal: bool, cross_attention: bool = False):
        self.cfg = cfg
        self.num_layers, self.causal = num_layers, causal
        self.embeddings = Embeddings(cfg, rngs)
        # The repeated unit: a block, or a group of `moe.every` blocks whose last is a mixture.
        self.group = cfg.moe.every if cfg.moe is not None else 1

        def unit(rngs):
            if self.group > 1:
                return LayerGroup(cfg, rngs)
            return Block(cfg, rngs, cross_attention, moe=cfg.moe is not None)

        if cfg.share_layers:
            self.layers = unit(rngs)  # ALBERT: one block applied num_layers times
        elif cfg.scan_layers:
            # One stacked unit whose parameters have a leading "layers" axis, applied with lax.scan.
            @nnx.split_rngs(splits=num_layers // self.group)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_stack(rngs):
                return unit(rngs)

            self.layers = make_stack(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs, cross_attention, moe=is_moe_layer(cfg, i))
                                    for i in range(num_layers)])
        self.final_norm = Norm(cfg.d_model, cfg, rngs) if cfg.norm_position == "pre" else None
        self.embedding_noise = True  # takes a train step's embedding perturbation (layers.perturb_embeddings)
        self.relative_bias = RelativePositionBias(cfg, not causal, rngs) if cfg.positions == "relative" else None
        self.alibi = tuple(alibi_slopes(cfg.num_heads).tolist()) if cfg.positions == "alibi" else None

    def run(self, x_BLE, positions_BL, segment_ids_BL, token_types_BL=None, cache: StackCache | None = None,
            memory: Memory | None = None):
        """(hidden states [B, L, D] after the stack, the updated cache or None, aux sums of the MoE
        layers: {} without them).

        With a cache, the L tokens are written at cache.index and attend to every slot cached before.
        """
        L = x_BLE.shape[1]
        if cache is None and self.embedding_noise:  # training's NEFTune / adversarial noise; never in generation
            x_BLE = perturbed(x_BLE, segment_ids_BL)
        x_BLD = constrain(self.embeddings(x_BLE, positions_BL, token_types_BL), ("batch", "length", "act_embed"))
        q_index_L = jnp.arange(L)
        kv_segments_BS, kv_positions_BS, kv_index_S = segment_ids_BL, positions_BL, q_index_L
        if cache is not None:
            start = (0, cache.index)
            cache = cache._replace(
                segment_ids=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids_BL.astype(jnp.int32), start),
                positions=jax.lax.dynamic_update_slice(cache.positions, positions_BL.astype(jnp.int32), start),
            )
            q_index_L = cache.index + q_index_L
            kv_segments_BS, kv_positions_BS = cache.segment_ids, cache.positions
            kv_index_S = jnp.arange(cache.segment_ids.shape[1])
        bias_BNLS = None
        if self.relative_bias is not None:
            bias_BNLS = self.relative_bias(positions_BL, kv_positions_BS)
        elif self.alibi is not None:
            bias_BNLS = alibi_bias(self.alibi, positions_BL, kv_positions_BS)
        impl = resolve_impl(self.cfg.attention_impl, DTYPES[self.cfg.dtype], bias_BNLS is not None,
                            cache is not None, L)
        dense = None
        if impl not in FUSED_KERNELS:  # the fused kernels take the segment ids instead
            dense = attention_mask(segment_ids_BL, positions_BL, q_index_L, kv_segments_BS, kv_positions_BS,
                                   kv_index_S, self.causal, self.cfg.sliding_window)
        masking = Masking(dense, segment_ids_BL, kv_segments_BS, self.causal, self.cfg.sliding_window, impl)
        memory_masking = None
        if memory is not None:
            cross_BLS = (segment_ids_BL[:, :, None] == memory.segment_ids_BS[:, None, :]) & (
                memory.segment_ids_BS[:, None, :] != 0
            )
            memory_masking = Masking(cross_BLS, segment_ids_BL, memory.segment_ids_BS, False, None, "xla")

        valid_BL = segment_ids_BL > 0

        def apply_block(graphdef, block_state, x_BLD, layer_kv, index):
            block = nnx.merge(graphdef, block_state)
            layer_cache = None if layer_kv is None else LayerCache(layer_kv[0], layer_kv[1], cache.index, *layer_kv[2:])
            with fold_dropout_key(index):  # LoRA dropout masks differ per layer (a no-op otherwise)
                return block(x_BLD, positions_BL, masking, bias_BNLS, layer_cache,
                             None if memory is None else memory.x_BSD, memory_masking, valid_BL)

        units = self.num_layers // self.group
        # XLA's CPU backend runs a scanned stack as a while loop that slices the stacked weights and
        # buffers each layer's residuals; unrolling the scan keeps the parameter layout (checkpoints,
        # conversion) and runs as fast as unscanned layers (docs/performance.md).
        unroll = units if active_platform() == "cpu" else 1
        if self.cfg.remat != "none" and cache is None:
            apply_block = jax.checkpoint(apply_block, policy=REMAT_POLICIES[self.cfg.remat],
                                         prevent_cse=not self.cfg.scan_layers or unroll > 1)
        kv = None
        if cache is not None:
            kv = (cache.k, cache.v) + (() if cache.cross_k is None else (cache.cross_k, cache.cross_v))
        indices = jnp.arange(units) if dropout_active() else None
        if self.cfg.share_layers or self.cfg.scan_layers:
            graphdef, state = nnx.split(self.layers)
            if kv is not None and self.group > 1:  # one cache entry per scanned group of layers
                kv = jax.tree.map(lambda a: a.reshape(-1, self.group, *a.shape[1:]), kv)
            if self.cfg.share_layers:  # the same weights every step; the cache still has one slot per layer
                def body(x_BLD, xs):
                    layer_kv, index = xs
                    x_BLD, out_kv, aux = apply_block(graphdef, state, x_BLD, layer_kv, index)
                    return x_BLD, (out_kv, aux)

                x_BLD, (new_kv, aux) = jax.lax.scan(body, x_BLD, (kv, indices), length=self.num_layers,
                                                    unroll=self.num_layers if unroll > 1 else 1)
            else:
                def body(x_BLD, xs):
                    layer_state, layer_kv, index = xs
                    x_BLD, out_kv, aux = apply_block(graphdef, layer_state, x_BLD, layer_kv, index)
                    return x_BLD, (out_kv, aux)

                x_BLD, (new_kv, aux) = jax.lax.scan(body, x_BLD, (state, kv, indices), unroll=unroll)
            aux = jax.tree.map(lambda a: jnp.sum(a, axis=0), aux)
            if new_kv is not None and self.group > 1:
                new_kv = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), new_kv)
        else:
            def apply_layer(i, block, x_BLD, layer_kv):
                return apply_block(*nnx.split(block), x_BLD, layer_kv, None if indices is None else i)

            x_BLD, new_kv, aux = run_in_order(self.layers, x_BLD, kv, apply_layer)
        if cache is not None:
            cache = cache._replace(k=new_kv[0], v=new_kv[1], index=cache.index + L)
            if len(new_kv) == 4:  # the memory's keys/values, computed by the first call
                cache = cache._replace(cross_k=new_kv[2].astype(cache.k.dtype), cross_v=new_kv[3].astype(cache.k.dtype))
        if self.final_norm is not None:
            x_BLD = self.final_norm(x_BLD)
        return x_BLD, cache, aux


def without_embedding_noise(module: nnx.Module) -> nnx.Module:
    """`module` with every stack taking its token embeddings as they are, also inside a train step that
    perturbs them (frozen models: a teacher or reference sees the clean input)."""
    for _, sub in nnx.iter_modules(module):
        if isinstance(sub, Stack):
            sub.embedding_noise = False
    return module


def init_stack_cache(cfg: ModelConfig, num_layers: int, batch: int, length: int) -> StackCache:
    shape = (num_layers, batch, length, cfg.kv_heads, cfg.dim_per_head)
    dtype = DTYPES[cfg.dtype]
    return StackCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        segment_ids=jnp.zeros((batch, length), jnp.int32),
        positions=jnp.zeros((batch, length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )
