"""Position information: rotary embeddings (with Llama-3 / linear scaling) and learned absolute positions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ModelConfig, RopeScaling
from jaxllm.models.layers import DTYPES, make_param


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [H/2] of the rotary embedding, as in Hugging Face's LLaMA."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x_BLNH: jax.Array, positions_BL: jax.Array, inv_freq) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle position * inv_freq[i] (the "rotate half" layout)."""
    angles_BLh = positions_BL[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
    cos = jnp.cos(angles_BLh)[:, :, None, :]
    sin = jnp.sin(angles_BLh)[:, :, None, :]
    x = x_BLNH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLNH.dtype)


class LearnedPositions(nnx.Module):
    """Absolute position embeddings [max_seq_len, D] added to the token embeddings (GPT-2)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.dtype = DTYPES[cfg.dtype]
        self.embedding = make_param(
            rngs,
            nnx.initializers.normal(cfg.init_std),
            (cfg.max_seq_len, cfg.embedding_dim),
            ("length", "embed"),
            DTYPES[cfg.param_dtype],
        )

    def __call__(self, positions_BL: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], positions_BL, axis=0).astype(self.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (BLOOM's `build_alibi_tensor`): a geometric sequence 2^(-8i/n) for the largest
    power of two n <= num_heads, then every other slope of the sequence for 2n."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
    slopes = base ** np.arange(1, closest + 1)
    if closest != num_heads:
        extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        slopes = np.concatenate([slopes, extra_base ** np.arange(1, 2 * remaining + 1, 2)])
    return slopes.astype(np.float32)


def alibi_bias(slopes, q_pos_BL: jax.Array, kv_pos_BS: jax.Array) -> jax.Array:
    """bias_BNLS = slope_n * (key_pos - query_pos): a linear penalty on distance, per head."""
    distance_BLS = (kv_pos_BS[:, None, :] - q_pos_BL[:, :, None]).astype(jnp.float32)
    return jnp.asarray(slopes, jnp.float32)[None, :, None, None] * distance_BLS[:, None]


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """T5's bucketing of (key_pos - query_pos): exact buckets for small distances, logarithmic ones up to
    max_distance; bidirectional splits the buckets between keys before and after the query."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nnx.Module):
    """T5's learned bias per (bucket of relative position, head), shared by all layers of a stack."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool, rngs: nnx.Rngs):
        self.bidirectional = bidirectional
        self.num_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.embedding = make_param(
            rngs,
            nnx.initializers.normal(cfg.init_std),
            (cfg.relative_buckets, cfg.num_heads),
            ("relative_buckets", "heads"),
            DTYPES[cfg.param_dtype],
        )

    def __call__(self, q_pos_BL: jax.Array, kv_pos_BS: jax.Array) -> jax.Array:
        relative_BLS = kv_pos_BS[:, None, :] - q_pos_BL[:, :, None]
        bucket_BLS = relative_position_bucket(relative_BLS, self.bidirectional, self.num_buckets, self.max_distance)
        bias_BLSN = jnp.take(self.embedding[...].astype(jnp.float32), bucket_BLS, axis=0)
        return jnp.transpose(bias_BLSN, (0, 3, 1, 2))
