"""Reward models (`data.objective.name: reward`, `model.head: reward`): a decoder with a scalar head learns
which of two responses to a prompt is preferred (docs/post-training.md, Reward models).

Batches are preference rows (docs/post-training.md): segment 2k-1 of a row is prompt + chosen response,
segment 2k prompt + rejected, each ending with EOS. The reward of a sequence is the head's value at its
last token (`losses.segment_last`; Hugging Face's `*ForSequenceClassification` reads the last non-padding
token). The loss is TRL's RewardTrainer's Bradley-Terry loss, averaged over the batch's pairs:

    -logsigmoid(r_chosen - r_rejected - margin)  [+ c * (r_chosen + r_rejected)^2]

with `margin` a record's margin (a row field repeated over both sequences of the pair; 0 without) and
c = `data.objective.center_rewards_coefficient` (TRL's centring regulariser; none by default). Metrics are
TRL's, per pair: `accuracy` (r_chosen > r_rejected), `margin` (mean r_chosen - r_rejected), `mean_reward`
(over both sequences); TRL's `min_reward`/`max_reward` are left out, because the step sums metrics over
micro-batches and evaluation over batches, which a minimum or maximum does not survive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import Config
from jaxllm.models import bind
from jaxllm.models.moe import moe_objective
from jaxllm.train.losses import pair_sums, segment_last
from jaxllm.train.objective import Objective, register


def pair_rewards(rewards_BL: jax.Array, segment_ids_BL: jax.Array, loss_mask_BL: jax.Array):
    """(chosen_BP, rejected_BP, valid_BP): each pair's two sequence rewards, read at their last tokens; valid:
    both sequences are there (each has a response token)."""
    chosen, rejected = pair_sums(segment_ids_BL, segment_last(segment_ids_BL, rewards_BL))
    n_chosen, n_rejected = pair_sums(segment_ids_BL, loss_mask_BL)
    return chosen, rejected, (n_chosen > 0) & (n_rejected > 0)


def bradley_terry(chosen: jax.Array, rejected: jax.Array, valid: jax.Array, margin: jax.Array | None = None,
                  center_coefficient: float | None = None) -> dict[str, jax.Array]:
    """Sums over the valid pairs: "loss" (Bradley-Terry, plus centring), "accuracy", "margin", "mean_reward"
    (half the sum of both rewards, so that dividing by the pair count gives the mean over sequences)."""
    valid = valid.astype(jnp.float32)
    diff = chosen - rejected
    shifted = diff if margin is None else diff - margin
    loss = -jax.nn.log_sigmoid(shifted)
    if center_coefficient is not None:
        loss = loss + center_coefficient * jnp.square(chosen + rejected)
    return {"loss": jnp.sum(loss * valid), "accuracy": jnp.sum((diff > 0) * valid),
            "margin": jnp.sum(diff * valid), "mean_reward": jnp.sum(0.5 * (chosen + rejected) * valid)}


def reward_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """The objective (see objective.Loss): Bradley-Terry over the batch's pairs, divided by its pair count (half
    its count of sequences, `examples`)."""
    model = bind(graphdef, params)
    segment_ids = batch["segment_ids"]
    x_BLD, _, moe_aux = model.hidden(batch["inputs"], batch["positions"], segment_ids)
    chosen, rejected, valid = pair_rewards(model.rewards(x_BLD), segment_ids, batch["loss_mask"])
    margin = pair_sums(segment_ids, segment_last(segment_ids, batch["margin"]))[0] if "margin" in batch else None
    sums = bradley_terry(chosen, rejected, valid, margin, cfg.data.objective.center_rewards_coefficient)
    metrics = {name: value / (norms["examples"] / 2) for name, value in sums.items()}
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    return metrics["loss"] + moe_loss, {**metrics, **moe_metrics}


# Means over pairs at evaluation too: the sums divided by the count of sequences, two per pair (see above).
register(Objective("reward", ("decoder",), reward_loss, loss_count="examples",
                   eval_metrics=(("accuracy", "examples"), ("margin", "examples"), ("mean_reward", "examples"))))
