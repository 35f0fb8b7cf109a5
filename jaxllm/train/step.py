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

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from jaxllm import models, sharding
from jaxllm.config import Config
from jaxllm.models import bind, lora
from jaxllm.models.electra import Electra
from jaxllm.models.moe import moe_objective
from jaxllm.models.transformer import Encoder, EncoderDecoder
from jaxllm.train.optim import make_optimizer, make_schedule, opt_state_shardings


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps taken (batches consumed), skipped updates included
    params: Any  # nested dict of arrays
    opt_state: Any  # of the trainable params only (models/lora.py trainable)
    skipped: jax.Array  # int32 scalar: updates skipped because the loss or a gradient was NaN/Inf


@dataclasses.dataclass
class StateSpec:
    """Everything about a train state that is known before any array exists.

    `abstract`: a TrainState of ShapeDtypeStructs carrying their shardings (the target of a restore,
    or of an ahead-of-time compile); `shardings`: the same tree of NamedShardings."""

    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    schedule: Callable
    abstract: TrainState
    shardings: TrainState


def train_state_spec(cfg: Config, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> StateSpec:
    """Model, optimizer and the shapes and shardings of their state on `mesh`, allocating nothing.
    With LoRA the optimizer state covers the adapters only."""
    graphdef, abstract_params, param_shardings = models.sharded_spec(cfg.model, mesh, rules)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    abstract_opt = jax.eval_shape(tx.init, lora.trainable(abstract_params))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh),
        skipped=replicated,
    )
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    shapes = TrainState(step=scalar, params=abstract_params, opt_state=abstract_opt, skipped=scalar)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)
    return StateSpec(graphdef, tx, make_schedule(cfg.optim, cfg.train.steps), abstract, shardings)


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


def chunked_cross_entropy(x_BLD: jax.Array, head: Callable[[jax.Array], jax.Array], targets_BL: jax.Array,
                          mask_BL: jax.Array, z_loss: float, chunk: int):
    """`cross_entropy(head(x_BLD), ...)` computed `chunk` positions of the sequence at a time.

    Only a [B, chunk, V] slice of the logits exists at once, and it is recomputed in the backward
    pass (jax.checkpoint), so memory no longer grows with B x L x V. chunk <= 0 or >= L: one piece.
    """
    L = x_BLD.shape[1]
    if chunk <= 0 or chunk >= L:
        return cross_entropy(head(x_BLD), targets_BL, mask_BL, z_loss)
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
        nll, zl = cross_entropy(head(x_BCD), t_BC, m_BC, z_loss)
        return (carry[0] + nll, carry[1] + zl), None

    zero = jnp.zeros((), jnp.float32)
    (nll, zl), _ = jax.lax.scan(piece, (zero, zero), (split(x_BLD), split(targets_BL), split(mask_BL)))
    return nll, zl


def loss_fn(params: Any, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], norms: dict[str, jax.Array],
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
    loss_chunk: int = 0,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the whole batch's mean token loss.

    With grad_accum > 1 the batch is split into micro-batches scanned in sequence; their normalised
    gradients add up to the one-shot gradient. Random draws (ELECTRA's generator samples) come from
    (seed, step, micro-batch), so a resumed run draws the same.

    When the loss or the gradient norm is NaN/Inf the parameters and optimizer state stay as they were
    (`skipped` counts it, metrics["finite"] is False); the caller decides whether to go on.
    """
    norms = normalizers(batch)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    # With LoRA adapters only they are differentiated and updated; the frozen base is a constant.
    trainable, frozen = lora.split_trainable(state.params)

    def objective(trainable, batch, key):
        params = lora.combine(trainable, frozen)
        return lora.with_dropout(loss_fn)(params, graphdef, batch, norms, z_loss, key, loss_chunk)

    grad_fn = jax.grad(objective, has_aux=True)
    if grad_accum == 1:
        grads, metrics = grad_fn(trainable, batch, key)
    else:
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)
        shapes = jax.eval_shape(grad_fn, trainable, jax.tree.map(lambda x: x[0], micro), key)

        def accumulate(carry, xs):
            micro_batch, index = xs
            out = grad_fn(trainable, micro_batch, jax.random.fold_in(key, index))
            return jax.tree.map(jnp.add, carry, out), None

        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))

    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    # Decided on the device (a select, no host sync): a bad update never reaches the parameters.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    updated, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (optax.apply_updates(trainable, updates), opt_state), (trainable, state.opt_state),
    )
    params = lora.combine(updated, frozen)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), tokens=norms["tokens"],
                   skipped_updates=skipped, finite=finite)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef, loss_chunk: int = 0
              ) -> dict[str, jax.Array]:
    """Summed token loss ("nll_sum") and token count of a batch (for perplexity over many batches)."""
    ones = {"tokens": jnp.float32(1.0), "positions": jnp.float32(1.0)}
    _, metrics = loss_fn(params, graphdef, batch, ones, 0.0, jax.random.key(0), loss_chunk)
    tokens = jnp.sum(loss_mask(batch).astype(jnp.float32))
    return {"nll_sum": metrics.get("mlm_loss", metrics["loss"]), "tokens": tokens}


def init_train_state(spec: StateSpec, params: Any) -> TrainState:
    """Step 0 of `params`: a fresh optimizer state (of the trainable part) in its shardings."""
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.shardings.opt_state)(lora.trainable(params))
    # Separate buffers for the two counters: both are donated to the step.
    step, skipped = (jax.device_put(jnp.int32(0), spec.shardings.step) for _ in range(2))
    return TrainState(step=step, params=params, opt_state=opt_state, skipped=skipped)


def jit_train_step(cfg: Config, spec: StateSpec, batch_shardings: Any, seed: int | None = None):
    """The train step of `cfg` jitted with the state's shardings (donated) and the batch's; dropout and
    noise keys from `seed` (default `train.seed`)."""
    t = cfg.train
    step = functools.partial(
        train_step, graphdef=spec.graphdef, tx=spec.tx, schedule=spec.schedule, grad_accum=t.grad_accum,
        z_loss=t.z_loss, seed=t.seed if seed is None else seed, loss_chunk=t.loss_chunk,
    )
    return jax.jit(
        step,
        in_shardings=(spec.shardings, batch_shardings),
        out_shardings=(spec.shardings, None),
        donate_argnums=(0,),
    )
