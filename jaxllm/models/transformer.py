"""The three model shapes built from one `ModelConfig`:

- `Decoder`: causal LM (LLaMA, Mistral, Qwen2, GPT-2, BLOOM), or with `head=reward` a reward model: a scalar
  per position (Hugging Face's `*ForSequenceClassification` with num_labels=1).
- `Encoder`: bidirectional, with a masked-LM or replaced-token-detection head (BERT, RoBERTa, ALBERT, ELECTRA).
- `EncoderDecoder`: encoder + causal decoder with cross-attention (T5, BART).

All logits are float32. Shape suffixes: B batch, L/S lengths, D model, E embedding, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models.blocks import Memory, Stack, StackCache, init_stack_cache
from jaxllm.models.layers import ACTIVATIONS, DTYPES, Dense, Embed, Norm, make_param
from jaxllm.sharding import constrain

DecodeCache = StackCache


def _defaults(tokens_BL, positions_BL, segment_ids_BL):
    """positions default to 0..L-1 and segment ids to all ones (one unpadded sequence per row)."""
    B, L = tokens_BL.shape
    if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    if segment_ids_BL is None:
        segment_ids_BL = jnp.ones((B, L), jnp.int32)
    return positions_BL, segment_ids_BL


class LMHead(nnx.Module):
    """Hidden [B, L, in_dim] -> logits [B, L, V]: the tied embedding table or its own kernel, plus an
    optional bias (BERT's decoder bias, BART's final_logits_bias)."""

    def __init__(self, cfg: ModelConfig, in_dim: int, rngs: nnx.Rngs):
        self.scale = cfg.d_model**-0.5 if cfg.scale_decoder_output else None
        self.dtype = DTYPES[cfg.dtype]
        self.kernel = (
            None
            if cfg.tie_embeddings
            else make_param(rngs, nnx.initializers.normal(cfg.init_std), (in_dim, cfg.vocab_size),
                            ("embed", "vocab"), DTYPES[cfg.param_dtype])
        )
        self.bias = (
            make_param(rngs, nnx.initializers.zeros, (cfg.vocab_size,), ("vocab",), DTYPES[cfg.param_dtype])
            if cfg.logits_bias
            else None
        )

    def __call__(self, x_BLE: jax.Array, embed: Embed) -> jax.Array:
        if self.scale is not None:
            x_BLE = x_BLE * self.scale
        if self.kernel is None:
            logits_BLV = embed.attend(x_BLE)
        else:
            logits_BLV = jnp.einsum("ble,ev->blv", x_BLE.astype(self.dtype), self.kernel[...].astype(self.dtype))
        logits_BLV = logits_BLV.astype(jnp.float32)
        if self.bias is not None:
            logits_BLV = logits_BLV + self.bias[...].astype(jnp.float32)
        return constrain(logits_BLV, ("batch", "length", "act_vocab"))


class Decoder(Stack):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs, cfg.num_layers, causal=True)
        self.embed = Embed(cfg, rngs)
        self.lm_head = LMHead(cfg, cfg.d_model, rngs) if cfg.head != "reward" else None
        # A reward model's head: D -> 1 without bias (Hugging Face's `score`), in place of the LM head.
        self.score = Dense((cfg.d_model,), (1,), ("embed", None), cfg, rngs) if cfg.head == "reward" else None
        # PPO's value head (model.value_head): D -> 1 with a bias beside the LM head, on the same hidden state.
        self.value_head = (Dense((cfg.d_model,), (1,), ("embed", None), cfg, rngs, use_bias=True)
                           if cfg.value_head else None)

    def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, cache: StackCache | None = None):
        """Logits [B, L, V] (a reward model: rewards [B, L]) and the updated cache when one is given."""
        x_BLD, cache, _ = self.hidden(tokens_BL, positions_BL, segment_ids_BL, cache)
        return (self.logits(x_BLD) if self.score is None else self.rewards(x_BLD)), cache

    def rewards(self, x_BLD: jax.Array) -> jax.Array:
        """A reward model's scalar at every position, float32 [B, L]; a sequence's reward is the value at its
        last token (losses.segment_last)."""
        return constrain(self.score(x_BLD)[..., 0].astype(jnp.float32), ("batch", "length"))

    def values(self, x_BLD: jax.Array) -> jax.Array:
        """PPO's value estimate at every position, float32 [B, L], from the hidden states the logits come from
        (`x, _, _ = model.hidden(...)`; `model.logits(x)` and `model.values(x)`: one forward pass)."""
        return constrain(self.value_head(x_BLD)[..., 0].astype(jnp.float32), ("batch", "length"))

    def hidden(self, tokens_BL, positions_BL=None, segment_ids_BL=None, cache: StackCache | None = None):
        """Final hidden states [B, L, D] (before the output projection), the updated cache, and the
        mixture-of-experts layers' aux sums for the losses ({} without them; see models/moe.py)."""
        positions_BL, segment_ids_BL = _defaults(tokens_BL, positions_BL, segment_ids_BL)
        return self.run(self.embed(tokens_BL), positions_BL, segment_ids_BL, cache=cache)

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        return self.lm_head(x_BLD, self.embed)


class MLMHead(nnx.Module):
    """BERT's masked-LM head: dense D -> E, activation, norm, then the (tied) output projection."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e = cfg.embedding_dim
        self.act = ACTIVATIONS[cfg.mlp]
        self.dense = Dense((cfg.d_model,), (e,), ("embed", "embed_factor"), cfg, rngs, use_bias=True)
        self.norm = Norm(e, cfg, rngs)
        self.out = LMHead(cfg, e, rngs)

    def __call__(self, x_BLD: jax.Array, embed: Embed) -> jax.Array:
        return self.out(self.norm(self.act(self.dense(x_BLD))), embed)


class DiscriminatorHead(nnx.Module):
    """ELECTRA's replaced-token detector: dense D -> D, activation, dense D -> 1: a logit per token."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        self.act = ACTIVATIONS[cfg.mlp]
        self.dense = Dense((d,), (d,), ("embed", "mlp"), cfg, rngs, use_bias=True)
        self.out = Dense((d,), (1,), ("mlp", None), cfg, rngs, use_bias=True)

    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        return self.out(self.act(self.dense(x_BLD)))[..., 0].astype(jnp.float32)


class Encoder(Stack):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs, cfg.num_layers, causal=False)
        self.embed = Embed(cfg, rngs)
        self.mlm_head = MLMHead(cfg, rngs) if cfg.head == "mlm" else None
        self.disc_head = DiscriminatorHead(cfg, rngs) if cfg.head == "discriminator" else None

    def __call__(self, tokens_BL, positions_BL=None, segment_ids_BL=None, token_types_BL=None):
        """MLM head: logits [B, L, V]; discriminator head: one logit per token [B, L] ("replaced");
        no head: the hidden states [B, L, D]."""
        x_BLD = self.hidden(tokens_BL, positions_BL, segment_ids_BL, token_types_BL)
        if self.mlm_head is not None:
            return self.logits(x_BLD)
        if self.disc_head is not None:
            return self.disc_head(x_BLD)
        return x_BLD

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        """The masked-LM head on hidden states (the loss applies it chunk by chunk)."""
        return self.mlm_head(x_BLD, self.embed)

    def hidden(self, tokens_BL, positions_BL=None, segment_ids_BL=None, token_types_BL=None):
        positions_BL, segment_ids_BL = _defaults(tokens_BL, positions_BL, segment_ids_BL)
        return self.run(self.embed(tokens_BL), positions_BL, segment_ids_BL, token_types_BL)[0]


class EncoderDecoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg, rngs)  # shared by encoder, decoder and (when tied) the output
        self.encoder = Stack(cfg, rngs, cfg.num_layers, causal=False)
        self.decoder = Stack(cfg, rngs, cfg.decoder_layers, causal=True, cross_attention=True)
        self.lm_head = LMHead(cfg, cfg.d_model, rngs)

    def __call__(self, enc_tokens_BS, dec_tokens_BL, enc_positions_BS=None, enc_segment_ids_BS=None,
                 dec_positions_BL=None, dec_segment_ids_BL=None):
        """Decoder logits [B, L, V] for decoder inputs given the encoder inputs (teacher forcing)."""
        memory = self.encode(enc_tokens_BS, enc_positions_BS, enc_segment_ids_BS)
        return self.decode(memory, dec_tokens_BL, dec_positions_BL, dec_segment_ids_BL)[0]

    def encode(self, tokens_BS, positions_BS=None, segment_ids_BS=None) -> Memory:
        positions_BS, segment_ids_BS = _defaults(tokens_BS, positions_BS, segment_ids_BS)
        x_BSD = self.encoder.run(self.embed(tokens_BS), positions_BS, segment_ids_BS)[0]
        return Memory(x_BSD, segment_ids_BS)

    def decode(self, memory: Memory, tokens_BL, positions_BL=None, segment_ids_BL=None,
               cache: StackCache | None = None):
        """Logits [B, L, V] of the decoder and its updated self-attention cache."""
        x_BLD, cache, _ = self.decode_hidden(memory, tokens_BL, positions_BL, segment_ids_BL, cache)
        return self.logits(x_BLD), cache

    def decode_hidden(self, memory: Memory, tokens_BL, positions_BL=None, segment_ids_BL=None,
                      cache: StackCache | None = None):
        """As Decoder.hidden: the decoder's final hidden states, updated cache and MoE aux sums."""
        positions_BL, segment_ids_BL = _defaults(tokens_BL, positions_BL, segment_ids_BL)
        return self.decoder.run(self.embed(tokens_BL), positions_BL, segment_ids_BL, cache=cache, memory=memory)

    def logits(self, x_BLD: jax.Array) -> jax.Array:
        return self.lm_head(x_BLD, self.embed)


MODEL_CLASSES = {"decoder": Decoder, "encoder": Encoder, "encoder_decoder": EncoderDecoder}


def init_cache(cfg: ModelConfig, batch: int, length: int) -> StackCache:
    """An empty KV cache for the (decoder) self-attention layers of a decoder or encoder-decoder."""
    layers = cfg.decoder_layers if cfg.arch == "encoder_decoder" else cfg.num_layers
    return init_stack_cache(cfg, layers, batch, length)
