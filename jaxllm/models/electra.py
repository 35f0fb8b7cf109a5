"""ELECTRA pre-training (Clark et al., 2020): a small masked-LM generator fills the masked positions
with samples, and the discriminator learns to tell replaced tokens from original ones. Generator and
discriminator share the token, position and token-type embeddings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.transformer import Encoder


def generator_config(cfg: ModelConfig) -> ModelConfig:
    g = cfg.electra_generator
    d_model = g.d_model or max(cfg.d_model // 4, 8)
    return dataclasses.replace(
        cfg,
        d_model=d_model,
        num_layers=g.num_layers or cfg.num_layers,
        num_heads=g.num_heads or max(cfg.num_heads // 4, 1),
        num_kv_heads=None,
        head_dim=None,
        mlp_dim=g.mlp_dim or max(cfg.mlp_dim // 4, 8),
        # The shared embeddings have the discriminator's width E; the generator projects E -> its d_model.
        embed_dim=cfg.embedding_dim if cfg.embedding_dim != d_model else None,
        head="mlm",
        electra_generator=None,
    )


class Electra(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.discriminator = Encoder(dataclasses.replace(cfg, electra_generator=None), rngs)
        self.generator = Encoder(generator_config(cfg), rngs)
        self.discriminator_weight = cfg.electra_generator.discriminator_weight
        d, g = self.discriminator, self.generator
        g.embed = d.embed  # shared token table (also the generator's tied output projection)
        g.embeddings.positions = d.embeddings.positions
        g.embeddings.token_types = d.embeddings.token_types
        g.embeddings.norm = d.embeddings.norm

    def __call__(self, tokens_BL, positions_BL, segment_ids_BL, mask_BL, key: jax.Array, token_types_BL=None):
        """Generator logits [B, L, V], the corrupted tokens [B, L] and the discriminator logits [B, L].

        mask_BL marks the masked positions, where generator samples (no gradient) replace the input.
        """
        gen_logits_BLV = self.generator(tokens_BL, positions_BL, segment_ids_BL, token_types_BL)
        sampled_BL = jax.random.categorical(key, jax.lax.stop_gradient(gen_logits_BLV), axis=-1)
        corrupted_BL = jnp.where(mask_BL > 0, sampled_BL, tokens_BL).astype(tokens_BL.dtype)
        disc_logits_BL = self.discriminator(corrupted_BL, positions_BL, segment_ids_BL, token_types_BL)
        return gen_logits_BLV, corrupted_BL, disc_logits_BL
