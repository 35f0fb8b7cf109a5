"""The loss and the train step: pure functions of (state, batch), jitted with explicit shardings.

A batch is a dict of [B, L] arrays: inputs, targets (int32), segment_ids, positions (int32) and
loss_mask (float32; 0 on padding and wherever the target is not the document's next token).
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
from jaxllm.models import bind
from jaxllm.train.optim import make_optimizer, make_schedule, opt_state_shardings


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Any  # nested dict of arrays
    opt_state: Any


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
    """Model, optimizer and the shapes and shardings of their state on `mesh`, allocating nothing."""
    graphdef, abstract_params, logical = models.model_spec(cfg.model)
    param_shardings = sharding.tree_shardings(abstract_params, logical, mesh, rules)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh),
    )
    shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params, opt_state=abstract_opt)
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


def loss_fn(params: Any, graphdef: nnx.GraphDef, batch: dict[str, jax.Array], z_loss: float):
    """Sum of token losses (to be divided by the token count by the caller) and metrics sums."""
    model = bind(graphdef, params)
    logits_BLV, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"])
    mask = batch["loss_mask"].astype(jnp.float32)
    nll, zl = cross_entropy(logits_BLV, batch["targets"], mask, z_loss)
    return nll + zl, {"nll_sum": nll, "tokens": jnp.sum(mask)}


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: Callable,
    grad_accum: int,
    z_loss: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the mean token loss of the whole batch.

    With grad_accum > 1 the batch is split into micro-batches scanned in sequence; gradients are summed
    and divided by the batch's total token count, so the update equals the one-shot update.
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)

    if grad_accum == 1:
        grads, aux = grad_fn(state.params, graphdef, batch, z_loss)
    else:
        micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

        def accumulate(carry, micro_batch):
            grads, aux = grad_fn(state.params, graphdef, micro_batch, z_loss)
            return jax.tree.map(jnp.add, carry, (grads, aux)), None

        scalar = jnp.zeros((), jnp.float32)
        zeros = (jax.tree.map(jnp.zeros_like, state.params), {"nll_sum": scalar, "tokens": scalar})
        (grads, aux), _ = jax.lax.scan(accumulate, zeros, micro)

    tokens = jnp.maximum(aux["tokens"], 1.0)
    grads = jax.tree.map(lambda g: g / tokens, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": aux["nll_sum"] / tokens,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "tokens": aux["tokens"],
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """Summed token loss and token count of a batch (for perplexity over many batches)."""
    _, aux = loss_fn(params, graphdef, batch, 0.0)
    return aux


def jit_train_step(graphdef, tx, schedule, grad_accum, z_loss, state_shardings, batch_shardings):
    step = functools.partial(
        train_step, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=grad_accum, z_loss=z_loss
    )
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
