"""Preference losses on per-pair sequence log-probs (provisional: sigmoid DPO and the metrics' inputs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dpo_losses(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_tokens, rejected_tokens,
               *, beta, loss_type="sigmoid", label_smoothing=0.0):
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios
    losses = (-jax.nn.log_sigmoid(beta * delta) * (1 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * delta) * label_smoothing)
    return losses, beta * jax.lax.stop_gradient(chosen_logratios), beta * jax.lax.stop_gradient(rejected_logratios)


def log1mexp(x):
    return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_losses(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, *, beta):
    c, r = chosen_logps / jnp.maximum(chosen_tokens, 1), rejected_logps / jnp.maximum(rejected_tokens, 1)
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    ratio = jax.nn.log_sigmoid(log_odds)
    return beta * ratio, beta * jax.lax.stop_gradient(c), beta * jax.lax.stop_gradient(r), ratio, log_odds


def simpo_losses(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, *, beta, gamma, label_smoothing=0.0):
    c, r = chosen_logps / jnp.maximum(chosen_tokens, 1), rejected_logps / jnp.maximum(rejected_tokens, 1)
    logits = (c - r) - gamma / beta
    losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - label_smoothing)
              - jax.nn.log_sigmoid(-beta * logits) * label_smoothing)
    return losses, beta * jax.lax.stop_gradient(c), beta * jax.lax.stop_gradient(r)


def kto_losses(policy_logps, ref_logps, desirable, kl, *, beta, desirable_weight, undesirable_weight):
    logratios = policy_logps - ref_logps
    losses = jnp.where(desirable, desirable_weight * (1 - jax.nn.sigmoid(beta * (logratios - kl))),
                       undesirable_weight * (1 - jax.nn.sigmoid(beta * (kl - logratios))))
    return losses, beta * jax.lax.stop_gradient(logratios)


def kto_kl(policy_kl_logps, ref_kl_logps, valid):
    n = jnp.maximum(jnp.sum(valid), 1)
    return jnp.maximum(jax.lax.stop_gradient(jnp.sum(jnp.where(valid, policy_kl_logps - ref_kl_logps, 0)) / n), 0)
