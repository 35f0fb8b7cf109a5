"""Preference optimisation on the one Trainer (`data.objective.name: dpo | kto | orpo | simpo`, the
`preference:` section; docs/post-training.md).

Batches are the preference rows of jaxllm/data/preference.py: each unit's two sequences (chosen and rejected;
kto: an example and its KL sequence) side by side in a row, one forward pass for both. Each sequence's
log-probability is the sum of its response tokens' log-probs (TRL's `logps`); `losses.pair_sums` gathers them
per unit. The losses themselves are jaxllm/train/preference_losses.py (TRL's formulas).

The reference (dpo, kto) is, in this order:
- the records' precomputed log-probs (`data.objective.precomputed_reference`: the `ref_logps` field);
- `preference.reference`: a frozen model (jaxllm run or checkpoint, or Hugging Face directory) beside the policy,
  sharded by the same rules;
- with model.lora: the policy itself with its adapters switched off (lora_b zeroed: exactly the base), so no
  second copy of the weights exists;
- else train.init_from's model, frozen (its vocabulary grown as the policy's was, so it is the starting model).

Metrics, TRL's names: `rewards/chosen`, `rewards/rejected` (beta * the policy's log-ratio to the reference;
ORPO/SimPO: beta * average log-prob), `rewards/accuracies`, `rewards/margins`, `logps/chosen`, `logps/rejected`,
means over the batch's pairs (kto: over its desirable / undesirable examples, and `kl`); at evaluation too.
Ours besides: `logps/accuracies`, the share of pairs whose chosen response the policy itself finds more likely
(summed log-probs; ORPO and SimPO: their average), comparable before and after training and across methods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import Config, JaxllmError
from jaxllm.data import preference as _formats  # noqa: F401 (the batch formats, registered with the objectives)
from jaxllm.models import bind
from jaxllm.models.lora import ADAPTER_KEYS
from jaxllm.models.moe import moe_objective
from jaxllm.train.frozen import FrozenSource
from jaxllm.train.losses import chosen_targets, pair_sums, token_logps
from jaxllm.train import preference_losses as pl
from jaxllm.train.objective import Objective, register

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "logps/accuracies")


def _logps(model, batch, chunk):
    """(token log-probs of the targets on the response tokens [B, L], MoE aux outputs) of `model`."""
    x_BLD, _, moe_aux = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"])
    return token_logps(x_BLD, model.logits, batch["targets"], batch["loss_mask"], chunk), moe_aux


def _segment_ends(segment_ids_BL: jax.Array) -> jax.Array:
    following = jnp.pad(segment_ids_BL, ((0, 0), (0, 1)))[:, 1:]
    return (segment_ids_BL != following) & (segment_ids_BL > 0)


def _without_adapters(params):
    """The parameters with every LoRA `lora_b` zeroed: the base model's function (adapters off)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.zeros_like(x) if getattr(path[-1], "key", None) == ADAPTER_KEYS[1] else x, params)


def reference_pairs(params, graphdef, batch, frozen, cfg: Config) -> tuple[jax.Array, jax.Array]:
    """The reference's summed response log-probs of each unit's two sequences ([B, P] each), no gradient."""
    seg = batch["segment_ids"]
    if "ref_logps" in batch:  # precomputed: each segment carries its value on every position; read it at the end
        return pair_sums(seg, jnp.where(_segment_ends(seg), batch["ref_logps"], 0.0))
    if "reference" in frozen:
        model = frozen["reference"].bind()
    else:  # model.lora: the policy with its adapters off
        model = bind(graphdef, jax.lax.stop_gradient(_without_adapters(params)))
    logp, _ = _logps(model, batch, cfg.train.loss_chunk)
    return jax.tree.map(jax.lax.stop_gradient, pair_sums(seg, logp))


def _pair_means(values: dict[str, jax.Array], valid: jax.Array, norms) -> dict[str, jax.Array]:
    """Means over the batch's pairs (the batch's examples are its sequences, two per pair), as metrics."""
    pairs = norms["examples"] / 2
    return {k: jnp.sum(jnp.where(valid, v, 0.0)) / pairs for k, v in values.items()}


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, valid, norms):
    return _pair_means({
        "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(jnp.float32),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps, "logps/rejected": rejected_logps,
        "logps/accuracies": (chosen_logps > rejected_logps).astype(jnp.float32),
    }, valid, norms)


def _policy(params, graphdef, batch, cfg, also=None):
    """(model, MoE aux, summed response log-probs of each unit's two sequences [B, P] x 2, their response token
    counts [B, P] x 2, and with `also` (a [B, L] mask) the token log-probs [B, L] on `also` as well)."""
    model = bind(graphdef, params)
    mask = batch["loss_mask"]
    logp, moe_aux = _logps(model, batch if also is None else {**batch, "loss_mask": jnp.maximum(mask, also)},
                           cfg.train.loss_chunk)
    seg = batch["segment_ids"]
    chosen, rejected = pair_sums(seg, logp if also is None else logp * mask)
    n_chosen, n_rejected = pair_sums(seg, mask)
    return model, moe_aux, chosen, rejected, n_chosen, n_rejected, logp


def dpo_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """DPO and its variants (preference.loss_type), against the reference (module docstring)."""
    p = cfg.preference
    model, moe_aux, chosen, rejected, n_c, n_r, _ = _policy(params, graphdef, batch, cfg)
    ref_c, ref_r = reference_pairs(params, graphdef, batch, frozen, cfg)
    valid = n_c > 0
    losses, r_c, r_r = pl.dpo_losses(chosen, rejected, ref_c, ref_r, n_c, n_r, beta=p.beta, loss_type=p.loss_type,
                                     label_smoothing=p.label_smoothing, valid_N=valid)
    metrics = _pair_metrics(r_c, r_r, chosen, rejected, valid, norms)
    loss = _pair_means({"loss": losses}, valid, norms)["loss"]
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    return loss + moe_loss, {"loss": loss, **metrics, **moe_metrics}


def _chosen_nll(chosen, norms):
    """Mean cross-entropy of the chosen responses' tokens (CPO's `nll_loss`)."""
    return -jnp.sum(chosen) / norms["chosen_tokens"]


def orpo_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """ORPO: the chosen sequences' cross-entropy minus beta * the mean log-sigmoid of the log odds ratio of
    the average log-probs; no reference. The cross-entropy is over the chosen sequences' prompt and response
    tokens, as TRL's ORPOTrainer (`concatenated_forward`: "computed over the full prompt and response")."""
    targets = chosen_targets(batch["segment_ids"])
    model, moe_aux, chosen, rejected, n_c, n_r, logp = _policy(params, graphdef, batch, cfg, also=targets)
    valid = n_c > 0
    ratio_losses, r_c, r_r, log_odds_ratio, log_odds = pl.orpo_losses(chosen, rejected, n_c, n_r,
                                                                      beta=cfg.preference.beta, valid_N=valid)
    nll = -jnp.sum(logp * targets) / norms["chosen_targets"]
    means = _pair_means({"or": ratio_losses, "log_odds_ratio": log_odds_ratio, "log_odds_chosen": log_odds}, valid,
                        norms)
    loss = nll - means["or"]
    metrics = _pair_metrics(r_c, r_r, chosen / jnp.maximum(n_c, 1), rejected / jnp.maximum(n_r, 1), valid, norms)
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    return loss + moe_loss, {"loss": loss, "nll_loss": nll, "log_odds_ratio": means["log_odds_ratio"],
                             "log_odds_chosen": means["log_odds_chosen"], **metrics, **moe_metrics}


def simpo_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """SimPO: the length-normalised log-probs' margin against a target margin; no reference (TRL's CPO
    trainer with loss_type=simpo; `cpo_alpha` adds the chosen responses' cross-entropy)."""
    p = cfg.preference
    model, moe_aux, chosen, rejected, n_c, n_r, _ = _policy(params, graphdef, batch, cfg)
    valid = n_c > 0
    losses, r_c, r_r = pl.simpo_losses(chosen, rejected, n_c, n_r, beta=p.beta, simpo_gamma=p.simpo_gamma,
                                       label_smoothing=p.label_smoothing, valid_N=valid)
    nll = _chosen_nll(jnp.where(valid, chosen, 0.0), norms)
    loss = _pair_means({"loss": losses}, valid, norms)["loss"] + p.cpo_alpha * nll
    metrics = _pair_metrics(r_c, r_r, chosen / jnp.maximum(n_c, 1), rejected / jnp.maximum(n_r, 1), valid, norms)
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    return loss + moe_loss, {"loss": loss, "nll_loss": nll, **metrics, **moe_metrics}


def kto_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """KTO: each example's log-ratio to the reference against the batch's KL estimate (from the KL sequences),
    weighted by desirability; the mean over the batch's examples."""
    p = cfg.preference
    model, moe_aux, logps, kl_logps, n_x, _, _ = _policy(params, graphdef, batch, cfg)
    ref, ref_kl = reference_pairs(params, graphdef, batch, frozen, cfg)
    valid = n_x > 0
    desirable = pair_sums(batch["segment_ids"], jnp.where(_segment_ends(batch["segment_ids"]),
                                                          batch["kto_label"], 0.0))[0] > 0
    kl = pl.kto_kl(kl_logps, ref_kl, valid)
    losses, rewards = pl.kto_losses(logps, ref, desirable, kl, beta=p.beta, desirable_weight=p.desirable_weight,
                                    undesirable_weight=p.undesirable_weight, valid_N=valid)
    loss = _pair_means({"loss": losses}, valid, norms)["loss"]

    def mean_over(which, x, count):
        return jnp.sum(jnp.where(valid & which, x, 0.0)) / count

    d, u = norms["desirable"], norms["undesirable"]
    metrics = {"rewards/chosen": mean_over(desirable, rewards, d), "rewards/rejected": mean_over(~desirable, rewards, u),
               "logps/chosen": mean_over(desirable, logps, d), "logps/rejected": mean_over(~desirable, logps, u),
               "kl": kl}
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    return loss + moe_loss, {"loss": loss, **metrics, **moe_metrics}


# ------------------------------------------------------------------------------------------ startup


def _reference_source(cfg: Config) -> dict[str, FrozenSource]:
    """The frozen reference dpo and kto load (none when precomputed or with LoRA: module docstring)."""
    p = cfg.preference
    if cfg.data.objective.precomputed_reference:
        return {}
    if p.reference:
        return {"reference": FrozenSource(p.reference, p.reference_dtype, match_vocab=False)}
    if cfg.model.lora is not None:
        return {}
    if not cfg.train.init_from:
        raise JaxllmError(
            f"data.objective.name={cfg.data.objective.name} needs a reference model: set train.init_from (the model "
            "to start from, frozen as the reference), preference.reference, or train with model.lora (the base "
            "with adapters off is the reference)")
    return {"reference": FrozenSource(cfg.train.init_from, p.reference_dtype, match_vocab=True)}


def prepare(cfg: Config, tokenizer) -> Config:
    """A reference given by path must share the policy's tokenizer (log-probs of the same ids)."""
    p = cfg.preference
    if p.reference and not cfg.data.objective.precomputed_reference:
        from jaxllm.train.distill import same_tokenizer, teacher_tokenizer

        theirs, model = teacher_tokenizer(p.reference)
        if model.arch != "decoder":
            raise JaxllmError(f"preference.reference={p.reference} is a model.arch={model.arch}; the reference of "
                              "a decoder policy is a decoder")
        if not same_tokenizer(theirs, tokenizer):
            raise JaxllmError(f"preference.reference={p.reference} uses tokenizer {theirs.name} but the policy "
                              f"{tokenizer.name}; the reference must score the same token ids")
    return cfg


_PAIR_EVAL = tuple((m, "examples") for m in PAIR_METRICS)
register(Objective("dpo", ("decoder",), dpo_loss, frozen_models=_reference_source, prepare=prepare,
                   eval_metrics=_PAIR_EVAL, loss_count="examples"))
register(Objective("orpo", ("decoder",), orpo_loss, eval_metrics=(*_PAIR_EVAL, ("nll_loss", "chosen_targets")),
                   loss_count="examples"))
register(Objective("simpo", ("decoder",), simpo_loss, eval_metrics=(*_PAIR_EVAL, ("nll_loss", "chosen_tokens")),
                   loss_count="examples"))
register(Objective("kto", ("decoder",), kto_loss, frozen_models=_reference_source, prepare=prepare,
                   eval_metrics=(("rewards/chosen", "desirable"), ("rewards/rejected", "undesirable"),
                                 ("logps/chosen", "desirable"), ("logps/rejected", "undesirable")),
                   loss_count="examples"))
