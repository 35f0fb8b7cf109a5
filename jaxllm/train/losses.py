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


def batch_counts(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Counts of a batch (float32): predicted tokens, real (non-padding) input positions, and for token
    rows the examples (packed segments) with at least one predicted token."""
    segments = batch.get("segment_ids", batch.get("encoder_segment_ids"))
    counts = {
        "tokens": jnp.sum(loss_mask(batch).astype(jnp.float32)),
        "positions": jnp.sum((segments > 0).astype(jnp.float32)),
    }
    if "segment_ids" in batch:  # unused counts cost nothing: XLA drops what no loss reads
        counts["examples"] = jnp.sum(segment_totals(batch["segment_ids"], loss_mask(batch)) > 0).astype(jnp.float32)
        # preference rows (data/preference.py): the response tokens of each unit's first sequences (chosen)
        counts["chosen_tokens"] = jnp.sum(loss_mask(batch).astype(jnp.float32) * (batch["segment_ids"] % 2 == 1))
        counts["chosen_targets"] = jnp.sum(chosen_targets(batch["segment_ids"]))
    if "kto_label" in batch:  # kto units: an example's sequence and its KL sequence carry its label
        label = batch["kto_label"]
        for name, weight in (("desirable", label), ("undesirable", 1.0 - label)):
            trained = segment_totals(batch["segment_ids"], loss_mask(batch) * weight) > 0
            counts[name] = jnp.sum(trained).astype(jnp.float32) / 2
    if "ptx_loss_mask" in batch:  # online RL's pretraining rows (rl.ptx_coef, PPO-ptx): their predicted tokens
        counts["ptx_tokens"] = jnp.sum(batch["ptx_loss_mask"].astype(jnp.float32))
    return counts


def normalizers(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`batch_counts` of the whole batch, at least 1 (what every loss divides by)."""
    return {k: jnp.maximum(v, 1.0) for k, v in batch_counts(batch).items()}


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


def segment_last(segment_ids_BL: jax.Array, values_BL: jax.Array) -> jax.Array:
    """float32 [B, L]: `values` at the last position of each segment (ids > 0), 0 elsewhere: a reward model's
    reward of each packed sequence, which ends with its EOS."""
    ends = (segment_ids_BL != jnp.pad(segment_ids_BL, ((0, 0), (0, 1)))[:, 1:]) & (segment_ids_BL > 0)
    return jnp.where(ends, values_BL.astype(jnp.float32), 0.0)


def chosen_targets(segment_ids_BL: jax.Array) -> jax.Array:
    """float32 [B, L]: 1 at every next-token target of a preference row's first sequences (odd segments: chosen),
    prompt and response alike (each position of the segment but its last): ORPO's nll_loss, as TRL's."""
    following = jnp.pad(segment_ids_BL, ((0, 0), (0, 1)))[:, 1:]
    return ((segment_ids_BL % 2 == 1) & (following == segment_ids_BL)).astype(jnp.float32)


def segment_sums(segment_ids_BL: jax.Array, values_BL: jax.Array) -> jax.Array:
    """float32 [B, L + 1]: column s holds the sum of `values` over the positions of segment s of each row
    (column 0: the padding's). Rows stay independent (a vmapped scatter: batch sharding is kept)."""
    L = segment_ids_BL.shape[1]
    return jax.vmap(lambda ids, v: jax.ops.segment_sum(v, ids, num_segments=L + 1))(
        segment_ids_BL, values_BL.astype(jnp.float32))


def pair_sums(segment_ids_BL: jax.Array, values_BL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sums of `values` over the two segments of each unit of a preference row (data/preference.py: segment
    2k-1 an example's sequence, 2k its partner): (first [B, P], second [B, P]), P = L // 2 (the most a row holds)."""
    sums = segment_sums(segment_ids_BL, values_BL)
    P = segment_ids_BL.shape[1] // 2
    return sums[:, 1::2][:, :P], sums[:, 2::2][:, :P]


def token_logps(x_BLD: jax.Array, head: Callable[[jax.Array], jax.Array], targets_BL: jax.Array,
                mask_BL: jax.Array, chunk: int) -> jax.Array:
    """float32 [B, L]: log p(target) where mask is 1 (0 elsewhere), from hidden states and the output
    projection, `chunk` positions at a time (`chunked_sums`)."""
    def piece(x_BCD, t_BC, m_BC):
        log_p = jax.nn.log_softmax(head(x_BCD).astype(jnp.float32), axis=-1)
        return (), (jnp.take_along_axis(log_p, t_BC[..., None], axis=-1)[..., 0] * m_BC,)

    _, (logp,) = chunked_sums(piece, (x_BLD, targets_BL, mask_BL.astype(jnp.float32)), chunk, per_position=True)
    return logp


def chunked_cross_entropy(x_BLD: jax.Array, head: Callable[[jax.Array], jax.Array], targets_BL: jax.Array,
                          mask_BL: jax.Array, z_loss: float, chunk: int, correct: bool = False):
    """`cross_entropy(head(x_BLD), ...)` computed `chunk` positions of the sequence at a time.

    Only a [B, chunk, V] slice of the logits exists at once, and it is recomputed in the backward
    pass (jax.checkpoint), so memory no longer grows with B x L x V. chunk <= 0 or >= L: one piece.
    `correct=True` also returns `token_correct` of every position (bool [B, L]).
    """
    if not correct:
        return chunked_sums(lambda x_BCD, t_BC, m_BC: cross_entropy(head(x_BCD), t_BC, m_BC, z_loss),
                            (x_BLD, targets_BL, mask_BL), chunk)

    def piece(x_BCD, t_BC, m_BC):
        logits = head(x_BCD)
        return cross_entropy(logits, t_BC, m_BC, z_loss), (token_correct(logits, t_BC),)

    (nll, zl), (hits,) = chunked_sums(piece, (x_BLD, targets_BL, mask_BL), chunk, per_position=True)
    return nll, zl, hits


def chunked_sums(piece: Callable[..., Any], arrays_BL: tuple[jax.Array, ...], chunk: int,
                 per_position: bool = False):
    """The sums `piece(*arrays)` returns (a tuple of float32 scalars), computed `chunk` sequence positions at
    a time: each array [B, L, ...] is cut along L, a scan adds the pieces' sums, and each piece is recomputed
    in the backward pass (jax.checkpoint), so what `piece` builds ([B, chunk, V] logits) never exists for
    the whole sequence. Positions padded to a multiple of `chunk` are zeros: `piece` must give them no
    weight (a zero mask among `arrays_BL`). chunk <= 0 or >= L: one piece.
    `per_position=True`: `piece` returns (sums, a tuple of [B, chunk] arrays) and the result is (sums, those
    arrays joined back to [B, L]).
    """
    L = arrays_BL[0].shape[1]
    if chunk <= 0 or chunk >= L:
        return piece(*arrays_BL)
    pad = -L % chunk
    if pad:
        arrays_BL = tuple(jnp.pad(a, ((0, 0), (0, pad)) + ((0, 0),) * (a.ndim - 2)) for a in arrays_BL)
    n = (L + pad) // chunk

    def split(a):  # [B, n*chunk, ...] -> [n, B, chunk, ...]
        return jnp.moveaxis(a.reshape(a.shape[0], n, chunk, *a.shape[2:]), 1, 0)

    def sums_and_rows(*xs):
        return piece(*xs) if per_position else (piece(*xs), ())

    @jax.checkpoint
    def step(carry, xs):
        sums, rows = sums_and_rows(*xs)
        return tuple(c + s for c, s in zip(carry, sums)), rows

    shapes = jax.eval_shape(sums_and_rows, *(split(a)[0] for a in arrays_BL))[0]
    zeros = tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
    sums, rows = jax.lax.scan(step, zeros, tuple(split(a) for a in arrays_BL))
    if not per_position:
        return sums
    joined = tuple(jnp.moveaxis(r, 0, 1).reshape(r.shape[1], -1, *r.shape[3:])[:, :L] for r in rows)
    return sums, joined


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
