"""The train step: a pure function of (state, batch, frozen models), jitted with explicit shardings.

The loss comes from the config's objective (train/objective.py); the pretraining losses are in
train/losses.py. Every loss is a sum over tokens divided by the *whole batch's* token count, computed
before the batch is split into micro-batches: gradient accumulation then sums exact contributions.
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
from jaxllm.config import AdversarialConfig, Config
from jaxllm.models import lora
from jaxllm.models.layers import dropout_key, perturb_embeddings
from jaxllm.rl import objectives as _online  # noqa: F401  (register the grpo, rloo and ppo objectives)
from jaxllm.train import distill, preference, reward  # noqa: F401  (register the distill, preference and reward objectives)
from jaxllm.train.losses import batch_counts, normalizers
from jaxllm.train.noise import gradient_fn
from jaxllm.train.objective import objective_for
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


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    frozen: dict[str, Any],
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: Callable,
    grad_accum: int,
    loss: Callable,
    seed: int = 0,
    neftune_noise_alpha: float = 0.0,
    adversarial: AdversarialConfig | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on the whole batch's mean loss of `loss` (an objective's loss, see
    train/objective.py: `loss(params, graphdef, batch, norms, key, frozen)` with its config bound).
    `frozen`: the objective's frozen models (`FrozenModel`s by name), read, never updated.

    With grad_accum > 1 the batch is split into micro-batches scanned in sequence; their normalised
    gradients add up to the one-shot gradient. Random draws (ELECTRA's generator samples, LoRA dropout,
    NEFTune's noise) come from (seed, step, micro-batch), so a resumed run draws the same.

    `neftune_noise_alpha` > 0 adds NEFTune's noise to the token embeddings, `adversarial` an adversarial
    perturbation (FGM / PGD, metrics["adv_loss"]): train/noise.py, for any objective.

    When the loss or the gradient norm is NaN/Inf the parameters and optimizer state stay as they were
    (`skipped` counts it, metrics["finite"] is False); the caller decides whether to go on.
    """
    norms = normalizers(batch)
    key = jax.random.fold_in(jax.random.key(seed), state.step)
    # With LoRA adapters only they are differentiated and updated; the base is a constant.
    trainable, base = lora.split_trainable(state.params)

    def objective(trainable, batch, key, perturbation):
        # LoRA dropout (a no-op without adapters); embedding noise (a no-op when perturbation is None).
        with dropout_key(jax.random.fold_in(key, 0x10A)), perturb_embeddings(perturbation):
            return loss(lora.combine(trainable, base), graphdef, batch, norms, key, frozen)

    grad_fn = gradient_fn(objective, neftune_noise_alpha, adversarial)
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
    params = lora.combine(updated, base)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state.step), tokens=norms["tokens"],
                   skipped_updates=skipped, finite=finite)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, skipped=skipped), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], frozen: dict[str, Any], *, graphdef: nnx.GraphDef,
              loss: Callable, metrics: tuple[tuple[str, str], ...] = (), loss_count: str = "tokens"
              ) -> dict[str, jax.Array]:
    """Sums over a batch, for means over many batches: the objective's `loss` metric (computed with the batch's
    own normalizers, as a train step does) times the count it is a mean over ("nll_sum", and "loss_count":
    that count, `Objective.loss_count`: tokens, or e.g. a preference objective's examples); the count of
    predicted tokens; and for each (metric, count) of `metrics` (the objective's `eval_metrics`) the metric
    times its count, "sum/<metric>", and the count, "count/<count>". A metric that is a mean over its count
    is then exact over any number of batches; one that mixes counts (ORPO's loss: a token mean and a pair mean)
    is each batch's value weighted by its count. ELECTRA's held-out loss is its generator's masked-LM loss,
    distillation's the student's cross-entropy: comparable with mlm and clm runs."""
    counts = batch_counts(batch)
    _, out = loss(params, graphdef, batch, normalizers(batch), jax.random.key(0), frozen)
    held_out = out.get("mlm_loss", out.get("ce_loss", out["loss"]))
    sums = {"nll_sum": held_out * counts[loss_count], "tokens": counts["tokens"], "loss_count": counts[loss_count]}
    for name, count in metrics:
        sums[f"sum/{name}"] = out[name] * counts[count]
        sums[f"count/{count}"] = counts[count]
    return sums


def init_train_state(spec: StateSpec, params: Any) -> TrainState:
    """Step 0 of `params`: a fresh optimizer state (of the trainable part) in its shardings."""
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.shardings.opt_state)(lora.trainable(params))
    # Separate buffers for the two counters: both are donated to the step.
    step, skipped = (jax.device_put(jnp.int32(0), spec.shardings.step) for _ in range(2))
    return TrainState(step=step, params=params, opt_state=opt_state, skipped=skipped)


def bound_loss(cfg: Config) -> Callable:
    """The loss of `cfg`'s objective (train/objective.py) with the config bound: (params, graphdef, batch,
    norms, key, frozen) -> (objective, metrics)."""
    return functools.partial(_call_with_config, objective_for(cfg).loss, cfg=cfg)


def _call_with_config(loss, params, graphdef, batch, norms, key, frozen, *, cfg):
    return loss(params, graphdef, batch, norms, key, frozen, cfg)


def jit_train_step(cfg: Config, spec: StateSpec, batch_shardings: Any, frozen_shardings: Any = None,
                   seed: int | None = None):
    """The train step of `cfg` jitted with the state's shardings (donated), the batch's and the frozen
    models' (`frozen.frozen_shardings`; none by default); dropout and noise keys from `seed` (default
    `train.seed`). Call it as step(state, batch, frozen) with frozen = {} when the objective has none."""
    step = functools.partial(
        train_step, graphdef=spec.graphdef, tx=spec.tx, schedule=spec.schedule, grad_accum=cfg.train.grad_accum,
        loss=bound_loss(cfg), seed=cfg.train.seed if seed is None else seed,
        neftune_noise_alpha=cfg.train.neftune_noise_alpha, adversarial=cfg.train.adversarial,
    )
    return jax.jit(
        step,
        in_shardings=(spec.shardings, batch_shardings, frozen_shardings or {}),
        out_shardings=(spec.shardings, None),
        donate_argnums=(0,),
    )
