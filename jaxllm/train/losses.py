"""The pretraining losses, and the token counts every loss is divided by.

Batches (see jaxllm.data.objectives.batch_spec): clm and mlm give [B, L] inputs, targets,
segment_ids, positions, loss_mask; span, bart and ul2 give encoder_* [B, Le] and decoder_* [B, Ld].
The loss follows the model: a Decoder predicts next tokens, an Encoder the masked ones, an
EncoderDecoder the decoder targets, and Electra adds replaced-token detection. Mixture-of-experts
decoders add their load-balancing and router z-losses (models/moe.py) and log expert loads.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxllm.models import bind
from jaxllm.models.electra import Electra
from jaxllm.models.moe import moe_objective
from jaxllm.models.transformer import Encoder, EncoderDecoder


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array, z_loss: float = 0.0):
    """Summed token cross-entropy (float32) over masked positions, and the summed z-loss term.

    Returns (sum of -log p(target), sum of z_loss * logZ^2), both weighted by mask_BL.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll = jnp.sum((log_z_BL - target_logit_BL) * mask_BL)
    zl = z_loss * jnp.sum(jnp.square(log_z_BL) * mask_BL)
    return nll, zl


def token_correct(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    """bool [B, L]: the most likely token is the target (what greedy decoding would emit there)."""
    return jnp.argmax(logits_BLV, axis=-1) == targets_BL


def loss_mask(batch: dict[str, jax.Array]) -> jax.Array:
    return batch["decoder_loss_mask"] if "decoder_loss_mask" in batch else batch["loss_mask"]


def normalizers(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Token counts of the whole batch: predicted tokens, and real (non-padding) input positions."""
    segments = batch.get("segment_ids", batch.get("encoder_segment_ids"))
    norms = {
        "tokens": jnp.maximum(jnp.sum(loss_mask(batch).astype(jnp.float32)), 1.0),
        "positions": jnp.maximum(jnp.sum((segments > 0).astype(jnp.float32)), 1.0),
    }
    if "segment_ids" in batch:  # token rows: examples with at least one predicted token
        norms["examples"] = jnp.maximum(jnp.sum(segment_totals(batch["segment_ids"], loss_mask(batch)) > 0), 1.0)
    return norms


def segment_totals(segment_ids_BL: jax.Array, values_BL: jax.Array) -> jax.Array:
    """float32 [B, L]: at the last position of each segment (ids > 0, contiguous runs in a row), the sum of
    `values` over that segment; 0 elsewhere. Rows hold segments 1, 2, ... side by side (packing)."""
    values = values_BL.astype(jnp.float32)
    total = jnp.cumsum(values, axis=1)
    before = total - values  # the running sum up to (not including) each position
    starts = segment_ids_BL != jnp.pad(segment_ids_BL, ((0, 0), (1, 0)))[:, :-1]
    base = jax.lax.cummax(jnp.where(starts, before, 0.0), axis=1)  # running sums are non-decreasing
    ends = (segment_ids_BL != jnp.pad(segment_ids_BL, ((0, 0), (0, 1)))[:, 1:]) & (segment_ids_BL > 0)
    return jnp.where(ends, total - base, 0.0)


def chunked_cross_entropy(x_BLD: jax.Array, head: Callable[[jax.Array], jax.Array], targets_BL: jax.Array,
                          mask_BL: jax.Array, z_loss: float, chunk: int, correct: bool = False):
    """`cross_entropy(head(x_BLD), ...)` computed `chunk` positions of the sequence at a time.

    Only a [B, chunk, V] slice of the logits exists at once, and it is recomputed in the backward
    pass (jax.checkpoint), so memory no longer grows with B x L x V. chunk <= 0 or >= L: one piece.
    `correct=True` also returns `token_correct` of every position (bool [B, L]).
    """
    L = x_BLD.shape[1]
    if chunk <= 0 or chunk >= L:
        logits = head(x_BLD)
        out = cross_entropy(logits, targets_BL, mask_BL, z_loss)
        return (*out, token_correct(logits, targets_BL)) if correct else out
    pad = -L % chunk
    if pad:  # padded positions carry mask 0
        x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
        targets_BL, mask_BL = jnp.pad(targets_BL, ((0, 0), (0, pad))), jnp.pad(mask_BL, ((0, 0), (0, pad)))
    n = x_BLD.shape[1] // chunk

    def split(a):  # [B, n*chunk, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(a.reshape(a.shape[0], n, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def piece(carry, xs):
        x_BCD, t_BC, m_BC = xs
        logits = head(x_BCD)
        nll, zl = cross_entropy(logits, t_BC, m_BC, z_loss)
        return (carry[0] + nll, carry[1] + zl), (token_correct(logits, t_BC) if correct else None)

    zero = jnp.zeros((), jnp.float32)
    (nll, zl), hits = jax.lax.scan(piece, (zero, zero), (split(x_BLD), split(targets_BL), split(mask_BL)))
    if not correct:
        return nll, zl
    return nll, zl, jnp.moveaxis(hits, 0, 1).reshape(x_BLD.shape[0], -1)[:, :L]


def pretraining_loss(params: Any, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], norms: dict[str, jax.Array],
            z_loss: float, key: jax.Array, loss_chunk: int = 0):
    """(objective to minimise, metrics): both already divided by the batch's counts in `norms`."""
    model = bind(graphdef, params)
    mask = loss_mask(batch).astype(jnp.float32)
    if isinstance(model, Electra):
        return _electra_loss(model, batch, mask, norms, z_loss, key)
    if isinstance(model, EncoderDecoder):
        memory = model.encode(batch["encoder_inputs"], batch["encoder_positions"], batch["encoder_segment_ids"])
        x_BLD, _, moe_aux = model.decode_hidden(memory, batch["decoder_inputs"], batch["decoder_positions"],
                                                batch["decoder_segment_ids"])
        targets = batch["decoder_targets"]
    elif isinstance(model, Encoder):  # masked LM
        x_BLD, moe_aux = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"]), {}
        targets = batch["targets"]
    else:
        x_BLD, _, moe_aux = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
        targets = batch["targets"]
    nll, zl = chunked_cross_entropy(x_BLD, model.logits, targets, mask, z_loss, loss_chunk)
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    return (nll + zl) / norms["tokens"] + moe_loss, {"loss": nll / norms["tokens"], **moe_metrics}


def sft_loss(params: Any, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], norms: dict[str, jax.Array],
             z_loss: float, loss_chunk: int = 0):
    """Supervised fine-tuning: next-token cross-entropy on the loss-masked (assistant / completion) tokens of a
    decoder, divided by their count; metrics as TRL's SFTTrainer logs them (`mean_token_accuracy`: the
    share of those tokens that are the model's most likely token) and `exact_match`: the share of examples
    whose every trained token is the most likely one, i.e. whose response greedy decoding reproduces."""
    model = bind(graphdef, params)
    mask = batch["loss_mask"].astype(jnp.float32)
    x_BLD, _, moe_aux = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    nll, zl, correct = chunked_cross_entropy(x_BLD, model.logits, batch["targets"], mask, z_loss, loss_chunk,
                                             correct=True)
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    wrong = segment_totals(batch["segment_ids"], mask * (1.0 - correct))
    trained = segment_totals(batch["segment_ids"], mask)
    exact = jnp.sum((trained > 0) & (wrong == 0))
    metrics = {"loss": nll / norms["tokens"], "mean_token_accuracy": jnp.sum(correct * mask) / norms["tokens"],
               "exact_match": exact / norms["examples"], **moe_metrics}
    return (nll + zl) / norms["tokens"] + moe_loss, metrics


def _electra_loss(model, batch, mask, norms, z_loss, key):
    gen_logits, corrupted, disc_logits = model(batch["inputs"], batch["positions"], batch["segment_ids"], mask, key)
    nll, zl = cross_entropy(gen_logits, batch["targets"], mask, z_loss)
    real = (batch["segment_ids"] > 0).astype(jnp.float32)
    replaced = (corrupted != batch["targets"]).astype(jnp.float32)
    bce = optax.sigmoid_binary_cross_entropy(disc_logits.astype(jnp.float32), replaced)
    disc = jnp.sum(bce * real) / norms["positions"]
    correct = jnp.sum(((disc_logits > 0) == (replaced > 0)) * real) / norms["positions"]
    mlm = nll / norms["tokens"]
    weight = model.discriminator_weight
    metrics = {"loss": mlm + weight * disc, "mlm_loss": mlm, "disc_loss": disc, "disc_accuracy": correct,
               "replaced_fraction": jnp.sum(replaced * real) / norms["positions"],
               "masked_fraction": jnp.sum(mask * real) / norms["positions"]}
    return mlm + zl / norms["tokens"] + weight * disc, metrics
