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
            (cfg.max_seq_len, cfg.d_model),
            ("length", "embed"),
            DTYPES[cfg.param_dtype],
        )

    def __call__(self, positions_BL: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], positions_BL, axis=0).astype(self.dtype)
