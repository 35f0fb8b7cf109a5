"""Embedding noise in the train step, for every objective: NEFTune's random noise and adversarial
perturbations (FGM, PGD / FreeLB-style) of the token embeddings.

No loss knows about it: the step traces the objective's loss inside `layers.perturb_embeddings`, and each
model stack adds the perturbation to the token embeddings it is given (models/layers.py, blocks.py).
Evaluation and generation never enter that context, so they see clean embeddings; frozen models (a teacher,
a reference) never take it either. See docs/post-training.md for the options, formulas and cost.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxllm.config import AdversarialConfig, JaxllmError
from jaxllm.models.layers import EmbeddingPerturbation

NEFTUNE_SALT = 0x4E5F  # folded into the step's key for NEFTune's draws (LoRA dropout folds 0x10A)

# objective(trainable, batch, key, perturbation) -> (objective value, metrics): the step's loss traced
# inside `perturb_embeddings(perturbation)`.
Objective = Callable[[Any, dict, jax.Array, EmbeddingPerturbation | None], tuple[jax.Array, dict]]


def _perturbation(neftune_alpha: float, key: jax.Array, deltas: Sequence[jax.Array] | None = None,
                  shapes: list | None = None) -> EmbeddingPerturbation | None:
    """A fresh perturbation for one trace of the loss (it counts that trace's stack calls); None when off."""
    if neftune_alpha == 0 and deltas is None and shapes is None:
        return None
    neftune_key = jax.random.fold_in(key, NEFTUNE_SALT) if neftune_alpha > 0 else None
    return EmbeddingPerturbation(neftune_key, neftune_alpha, deltas, shapes)


def gradient_fn(objective: Objective, neftune_alpha: float, adversarial: AdversarialConfig | None):
    """(trainable, batch, key) -> (gradient of the step's objective in `trainable`, metrics).

    Without `adversarial`: one forward and backward pass of the objective (with NEFTune's noise when
    neftune_alpha > 0, drawn from the key: a resumed run draws the same). With it, the objective is
    clean + weight * mean over the ascent steps k = 1..K of the loss at delta_k, where delta_0 = 0 and
    delta_k = P(delta_{k-1} + step_size * g / ||g||), g the gradient in delta at delta_{k-1}, P the projection
    onto ||delta|| <= epsilon, norms over each row's [length, embedding]: K + 1 forward and backward passes
    (FGM: K = 1, step_size = epsilon). metrics gain "adv_loss", the mean of the ascent steps' "loss".
    """

    def perturbed_objective(trainable, batch, key, deltas, shapes=None):
        return objective(trainable, batch, key, _perturbation(neftune_alpha, key, deltas, shapes))

    if adversarial is None:
        return jax.grad(lambda t, b, k: perturbed_objective(t, b, k, None), has_aux=True)
    steps = 1 if adversarial.method == "fgm" else adversarial.steps
    step_size = adversarial.epsilon if adversarial.method == "fgm" else (
        adversarial.step_size or adversarial.epsilon / steps)
    grad_both = jax.grad(perturbed_objective, argnums=(0, 3), has_aux=True)

    def fn(trainable, batch, key):
        deltas = [jnp.zeros(shape, jnp.float32) for shape in embedding_shapes(perturbed_objective, trainable, batch, key)]
        (grads, g_deltas), metrics = grad_both(trainable, batch, key, deltas)  # the clean pass

        def ascend(carry, _):
            deltas, g_deltas, adv_grads, adv_loss = carry
            deltas = [uphill(d, g, step_size, adversarial.epsilon) for d, g in zip(deltas, g_deltas)]
            (g, g_deltas), m = grad_both(trainable, batch, key, deltas)
            return (deltas, g_deltas, jax.tree.map(jnp.add, adv_grads, g), adv_loss + m["loss"]), None

        zeros = jax.tree.map(jnp.zeros_like, grads)
        (_, _, adv_grads, adv_loss), _ = jax.lax.scan(
            ascend, (deltas, g_deltas, zeros, jnp.zeros((), jnp.float32)), None, length=steps)
        scale = adversarial.weight / steps
        grads = jax.tree.map(lambda a, b: a + scale * b.astype(a.dtype), grads, adv_grads)
        return grads, dict(metrics, adv_loss=adv_loss / steps)

    return fn


def embedding_shapes(perturbed_objective, trainable, batch, key) -> list[tuple[int, ...]]:
    """The shapes of the token embeddings each stack call of the objective's loss perturbs, in call order
    (one for a decoder or an encoder, encoder then decoder for an encoder-decoder, generator then
    discriminator for ELECTRA); traced, not run."""
    shapes: list = []
    jax.eval_shape(lambda t, b, k: perturbed_objective(t, b, k, None, shapes), trainable, batch, key)
    if not shapes:
        raise JaxllmError("train.adversarial perturbs the token embeddings of the trained model, but this "
                          "objective's loss runs none; set train.adversarial=null")
    return shapes


def uphill(delta_BLE: jax.Array, g_BLE: jax.Array, step_size: float, epsilon: float) -> jax.Array:
    """delta + step_size * g / ||g||, projected back onto ||delta|| <= epsilon; L2 norms over each row's
    [L, E] (a row whose gradient is 0, e.g. all padding, stays where it is)."""
    g_norm_B11 = jnp.sqrt(jnp.sum(jnp.square(g_BLE), axis=(1, 2), keepdims=True))
    delta_BLE = delta_BLE + step_size * g_BLE / jnp.maximum(g_norm_B11, 1e-20)
    norm_B11 = jnp.sqrt(jnp.sum(jnp.square(delta_BLE), axis=(1, 2), keepdims=True))
    return delta_BLE * jnp.minimum(1.0, epsilon / jnp.maximum(norm_B11, 1e-20))
