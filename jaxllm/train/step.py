"""The losses and the train step: pure functions of (state, batch), jitted with explicit shardings.

Batches (see jaxllm.data.objectives.batch_spec): clm and mlm give [B, L] inputs, targets,
segment_ids, positions, loss_mask; span, bart and ul2 give encoder_* [B, Le] and decoder_* [B, Ld].
The loss follows the model: a Decoder predicts next tokens, an Encoder the masked ones, an
EncoderDecoder the decoder targets, and Electra adds replaced-token detection. Mixture-of-experts
decoders add their load-balancing and router z-losses (models/moe.py) and log expert loads.

Every loss is a sum over tokens divided by the *whole batch's* token count, computed before the
batch is split into micro-batches: gradient accumulation then sums exact contributions.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxllm.models import bind, lora
from jaxllm.models.electra import Electra
from jaxllm.models.moe import moe_objective
from jaxllm.models.transformer import Encoder, EncoderDecoder


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # nested dict of arrays
    opt_state: Any  # of the trainable params only (models/lora.py trainable)


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


def loss_mask(batch: dict[str, jax.Array]) -> jax.Array:
    return batch["decoder_loss_mask"] if "decoder_loss_mask" in batch else batch["loss_mask"]


def normalizers(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Token counts of the whole batch: predicted tokens, and real (non-padding) input positions."""
    segments = batch.get("segment_ids", batch.get("encoder_segment_ids"))
    return {
        "tokens": jnp.maximum(jnp.sum(loss_mask(batch).astype(jnp.float32)), 1.0),
        "positions": jnp.maximum(jnp.sum((segments > 0).astype(jnp.float32)), 1.0),
    }


def loss_fn(params: Any, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], norms: dict[str, jax.Array],
            z_loss: float, key: jax.Array):
    """(objective to minimise, metrics): both already divided by the batch's counts in `norms`."""
    model = bind(graphdef, params)
    mask = loss_mask(batch).astype(jnp.float32)
    if isinstance(model, Electra):
        return _electra_loss(model, batch, mask, norms, z_loss, key)
    if isinstance(model, EncoderDecoder):
        logits = model(batch["encoder_inputs"], batch["decoder_inputs"], batch["encoder_positions"],
                       batch["encoder_segment_ids"], batch["decoder_positions"], batch["decoder_segment_ids"])
        nll, zl = cross_entropy(logits, batch["decoder_targets"], mask, z_loss)
        return (nll + zl) / norms["tokens"], {"loss": nll / norms["tokens"]}
    if isinstance(model, Encoder):  # masked LM
        logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])
        nll, zl = cross_entropy(logits, batch["targets"], mask, z_loss)
        return (nll + zl) / norms["tokens"], {"loss": nll / norms["tokens"]}
    x, _, moe_aux = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    nll, zl = cross_entropy(model.logits(x), batch["targets"], mask, z_loss)
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    return (nll + zl) / norms["tokens"] + moe_loss, {"loss": nll / norms["tokens"], **moe_metrics}


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


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: Callable,
    grad_accum: int,
    z_loss: float,
    seed: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the whole batch's mean token loss.

    With grad_accum > 1 the batch is split into micro-batches scanned in sequence; their normalised
    gradients add up to the one-shot gradient. Random draws (ELECTRA's generator samples) come from
    (seed, step, micro-batch), so a resumed run draws the same.
    """
    norms = normalizers(batch)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    # With LoRA adapters only they are differentiated and updated; the frozen base is a constant.
    trainable, frozen = lora.split_trainable(state.params)

    def objective(trainable, *args):
        return lora.with_dropout(loss_fn)(lora.combine(trainable, frozen), *args)

    grad_fn = jax.grad(objective, has_aux=True)
    if grad_accum == 1:
        grads, metrics = grad_fn(trainable, graphdef, batch, norms, z_loss, key)
    else:
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
        shapes = jax.eval_shape(grad_fn, trainable, graphdef, jax.tree.map(lambda x: x[0], micro), norms,
                                z_loss, key)

        def accumulate(carry, xs):
            micro_batch, index = xs
            out = grad_fn(trainable, graphdef, micro_batch, norms, z_loss, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, carry, out), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params = lora.combine(optax.apply_updates(trainable, updates), frozen)
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), tokens=norms["tokens"])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """Summed token loss ("nll_sum") and token count of a batch (for perplexity over many batches)."""
    ones = {"tokens": jnp.float32(1.0), "positions": jnp.float32(1.0)}
    _, metrics = loss_fn(params, graphdef, batch, ones, 0.0, jax.random.key(0))
    tokens = jnp.sum(loss_mask(batch).astype(jnp.float32))
    return {"nll_sum": metrics.get("mlm_loss", metrics["loss"]), "tokens": tokens}


def jit_train_step(graphdef, tx, schedule, grad_accum, z_loss, seed, state_shardings, batch_shardings):
    step = functools.partial(
        train_step, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=grad_accum, z_loss=z_loss, seed=seed
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
