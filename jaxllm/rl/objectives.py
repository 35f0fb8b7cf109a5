"""The online objectives (`data.objective.name: grpo | rloo | ppo`, the `rl:` section; docs/post-training.md,
"Online RL: PPO, GRPO, RLOO"): their batch rows and losses. The batches themselves come from rollouts of the live
policy (jaxllm/rl/online.py, the objectives' `online` data), not from the data pipeline.

A row holds one completion, laid out as TRL lays it (prompts.rows): the prompt left-padded to a shape bucket,
then the completion's window (W positions: the longest completion's bucket), with the clm fields (`inputs`,
`targets`, `segment_ids`, `positions` from 0 at the prompt's first token, `loss_mask`: 1 on the completion's
targets, stop token included), [B, L] with L = prompt bucket + W - 1 <= data.seq_len; and, for the W window
positions (the last ones), float32 [B, W]: `old_logps` (the sampling policy's, before this rollout's updates; 0
when unused), `ref_logps` (the reference's; 0 without one), `advantages` (grpo, rloo: the sequence's, on every
position; ppo: GAE's, per token) and for ppo `values` (the value head's before the updates) and `returns`. Only
the window is projected to the vocabulary (TRL's logits_to_keep). With rl.shared_prefix (the default) the rows
are cut before the window: `prefix_*` fields [B, prompt bucket - 1] and the clm fields of the window alone
[B, W]; batches hold whole groups, and each group's prompt runs once (online.shared_prefix_hidden). Rollouts of
other widths compile their own step; `rollout_spec` gives the widest (what `jaxllm plan` compiles).

Losses, TRL's (jaxllm/rl/losses.py holds the formulas; `entropy` is logged from the update's own forward pass,
as TRL logs it): log-probs of the row's targets under logits /
rl.temperature (the sampling distribution, as TRL). With rl.epochs = rl.minibatches = 1 the old log-probs are
the policy's own, detached (ratio exactly 1: TRL's on-policy shortcut); otherwise the batch's `old_logps`.
- grpo: the clipped surrogate + beta * k3 KL to the reference, averaged by rl.loss_type (grpo, bnpo, dr_grpo,
  dapo), ratio per token or per sequence (rl.importance_sampling_level=sequence: GSPO; sequence_token: GSPO-token);
- rloo: TRL's RLOOTrainer: one ratio per sequence (summed token log-ratios), clipped, mean over sequences; its
  KL (k1, summed) is in the reward (online.py);
- ppo: TRL's classic PPOTrainer: clipped policy loss on whitened GAE advantages + vf_coef * clipped value loss.
Every loss and metric is divided by the whole batch's counts, so gradient accumulation sums exact shares.

PPO-ptx (InstructGPT; rl.ptx_coef > 0, any of the three): each batch also holds train.batch_size clm rows of
rl.ptx_sources (`ptx_inputs`, `ptx_targets`, `ptx_segment_ids`, `ptx_positions`, `ptx_loss_mask`, [B,
data.seq_len]); the objective adds ptx_coef * their token-mean cross-entropy (train/losses.py's clm loss, divided
by the whole batch's `ptx_tokens`), logged as `ptx_loss`; the `loss` metric stays the RL objective's own (TRL's).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import Config
from jaxllm.data.objectives import (
    BatchFormat,
    batch_format,
    register_format,
    token_rows_spec,
)
from jaxllm.models import bind
from jaxllm.models.moe import moe_objective
from jaxllm.rl import losses
from jaxllm.rl.online import OnlineData, beta, needs_reference, on_policy, window_logps
from jaxllm.rl.rewards import builtin_names, load_function
from jaxllm.train.losses import chunked_cross_entropy
from jaxllm.train.objective import Objective, register
from jaxllm.train.preference import _reference_source

ONLINE = ("grpo", "rloo", "ppo")


# ------------------------------------------------------------------------------------------ batch rows

RL_FIELDS = ("old_logps", "ref_logps", "advantages")
PPO_FIELDS = ("values", "returns")
PTX_FIELDS = tuple(f"ptx_{k}" for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask"))


def _rl_spec(cfg, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What the data config alone bounds (module docstring): [B, data.seq_len] token fields and RL fields (a
    window as wide); `rollout_spec` is exact."""
    spec = token_rows_spec(cfg, batch_size)
    fields = RL_FIELDS + (PPO_FIELDS if cfg.objective.name == "ppo" else ())
    return {**spec, **{k: ((batch_size, cfg.seq_len), np.dtype(np.float32)) for k in fields}}


def rollout_spec(cfg: Config, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The widest batch cfg's rollouts make (module docstring), the shapes `jaxllm plan` compiles: completion
    windows of rl.max_new_tokens; rows of data.seq_len, or with rl.shared_prefix windows after prompt prefixes of
    the data.seq_len - rl.max_new_tokens tokens left."""
    r, L, T = cfg.rl, cfg.data.seq_len, cfg.rl.max_new_tokens
    i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
    width = T if r.shared_prefix else L
    spec = {k: ((batch_size, width), f32 if k == "loss_mask" else i32)
            for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    if r.shared_prefix:
        spec.update({f"prefix_{k}": ((batch_size, L - T), i32) for k in ("inputs", "positions", "segment_ids")})
    fields = RL_FIELDS + (PPO_FIELDS if cfg.data.objective.name == "ppo" else ())
    spec.update({k: ((batch_size, T), f32) for k in fields})
    if r.ptx_coef > 0:  # PPO-ptx: clm rows of rl.ptx_sources
        spec.update({k: ((batch_size, L), f32 if k == "ptx_loss_mask" else i32) for k in PTX_FIELDS})
    return spec


def _no_rows(docs, cfg, tokenizer, batch_size, process_index):
    from jaxllm.config import JaxllmError

    raise JaxllmError(f"data.objective.name={cfg.objective.name} trains on rollouts of the policy (the trainer makes "
                      "them), not on a data pipeline's rows; train it with `jaxllm train`")


def _template_tokens(cfg, tokenizer):
    """The chat template's special tokens, as for sft (prompts in the messages format render with it)."""
    return batch_format("sft").tokens(cfg, tokenizer)


for _name in ONLINE:
    register_format(_name, BatchFormat(_no_rows, _rl_spec, tokens=_template_tokens))


# ------------------------------------------------------------------------------------------ forward passes


def _means(metrics: dict[str, jax.Array], counts: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """`NAME:sum` metrics divided by the whole batch's count of their kind (`counts`: NAME -> count)."""
    return {name: metrics[f"{name}:sum"] / count for name, count in counts.items() if f"{name}:sum" in metrics}


def _window_mask(batch):
    """The loss mask of the completion window (the last positions of the rows, as wide as the RL fields)."""
    return batch["loss_mask"][:, -batch["advantages"].shape[1]:]


def _ptx(model, batch, norms, cfg: Config):
    """PPO-ptx (module docstring): (ptx_coef * the clm loss of the batch's pretraining rows, with train.z_loss as
    the clm objective has it; {"ptx_loss": their token-mean cross-entropy}); (0, {}) without them."""
    if "ptx_loss_mask" not in batch:
        return 0.0, {}
    x_BLD, _, _ = model.hidden(batch["ptx_inputs"], batch["ptx_positions"], batch["ptx_segment_ids"])
    nll, zl = chunked_cross_entropy(x_BLD, model.logits, batch["ptx_targets"],
                                    batch["ptx_loss_mask"].astype(jnp.float32), cfg.train.z_loss, cfg.train.loss_chunk)
    return cfg.rl.ptx_coef * (nll + zl) / norms["ptx_tokens"], {"ptx_loss": nll / norms["ptx_tokens"]}


def _old(cfg, logps, batch):
    return None if on_policy(cfg) else batch["old_logps"]


def grpo_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """GRPO and its variants (module docstring)."""
    r = cfg.rl
    model = bind(graphdef, params)
    logps, entropy, moe_aux, _ = window_logps(model, batch, r.temperature, cfg.train.loss_chunk,
                                              batch["advantages"].shape[1], group=r.num_generations)
    b = beta(cfg)
    rows = cfg.train.batch_size  # whole-batch counts: gradient accumulation sums exact shares
    loss, m = losses.policy_loss(
        logps, _old(cfg, logps, batch), batch["advantages"], _window_mask(batch), epsilon_low=r.epsilon,
        epsilon_high=r.epsilon if r.epsilon_high is None else r.epsilon_high, level=r.importance_sampling_level,
        aggregation=r.loss_type, max_completion_length=r.max_new_tokens, ref_logps_BT=batch["ref_logps"], beta=b,
        num_sequences=rows, num_tokens=norms["tokens"], micro_batches=cfg.train.grad_accum)
    per = rows if r.importance_sampling_level == "sequence" else norms["tokens"]  # GSPO-token clips per token
    metrics = _means({**m, "entropy:sum": jnp.sum(entropy)},
                     {"clip_ratio/low_mean": per, "clip_ratio/high_mean": per, "clip_ratio/region_mean": per,
                      "kl": norms["tokens"], "entropy": norms["tokens"]})
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    ptx_loss, ptx_metrics = _ptx(model, batch, norms, cfg)
    return loss + moe_loss + ptx_loss, {"loss": loss, **metrics, **moe_metrics, **ptx_metrics}


def rloo_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """RLOO: TRL's RLOOTrainer loss (one clipped ratio per sequence of summed log-ratios; mean over sequences)."""
    r = cfg.rl
    model = bind(graphdef, params)
    logps, entropy, moe_aux, _ = window_logps(model, batch, r.temperature, cfg.train.loss_chunk,
                                              batch["advantages"].shape[1], group=r.num_generations)
    rows = cfg.train.batch_size
    loss, m = losses.policy_loss(
        logps, _old(cfg, logps, batch), batch["advantages"][:, 0], _window_mask(batch), epsilon_low=r.epsilon,
        epsilon_high=r.epsilon if r.epsilon_high is None else r.epsilon_high, level="sequence_sum",
        aggregation="grpo", num_sequences=rows)
    metrics = _means({**m, "entropy:sum": jnp.sum(entropy)},
                     {**{f"clip_ratio/{k}_mean": rows for k in ("low", "high", "region")}, "entropy": norms["tokens"]})
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    ptx_loss, ptx_metrics = _ptx(model, batch, norms, cfg)
    return loss + moe_loss + ptx_loss, {"loss": loss, **metrics, **moe_metrics, **ptx_metrics}


def ppo_loss(params, graphdef, batch, norms, key, frozen, cfg: Config):
    """PPO: clipped policy loss + vf_coef * clipped value loss (TRL's classic PPOTrainer.loss), token means over
    the whole batch's completion tokens."""
    r = cfg.rl
    model = bind(graphdef, params)
    logps, entropy, moe_aux, values = window_logps(model, batch, r.temperature, cfg.train.loss_chunk,
                                                   batch["advantages"].shape[1], True, r.num_generations)
    mask = _window_mask(batch)
    old = jax.lax.stop_gradient(logps) if on_policy(cfg) else batch["old_logps"]
    # Both losses are masked means over this micro-batch; weighted by its share of the batch's tokens they sum
    # to the whole batch's means.
    share = jnp.sum(mask) / norms["tokens"]
    pg_loss, pg_m = losses.ppo_policy_loss(logps, old, batch["advantages"], mask, cliprange=r.epsilon)
    vf_loss, vf_m = losses.value_loss(values, batch["values"], batch["returns"], mask, clip=r.cliprange_value)
    pg_loss, vf_loss = pg_loss * share, vf_loss * share
    loss = pg_loss + r.vf_coef * vf_loss
    tokens = norms["tokens"]
    metrics = _means({**pg_m, **vf_m, "entropy:sum": jnp.sum(entropy)},
                     {"clip_ratio/region_mean": tokens, "approxkl": tokens, "policykl": tokens, "vf_clipfrac": tokens,
                      "entropy": tokens})
    metrics["clip_ratio/region_mean"] = pg_m["clipfrac:sum"] / tokens
    moe_loss, moe_metrics = moe_objective(moe_aux, norms, model.cfg)
    ptx_loss, ptx_metrics = _ptx(model, batch, norms, cfg)
    return loss + moe_loss + ptx_loss, {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss, **metrics,
                                        **moe_metrics, **ptx_metrics}


# ------------------------------------------------------------------------------------------ startup


def _frozen_models(cfg: Config):
    """The reference (preference.py's rule: preference.reference, else train.init_from frozen, none with
    model.lora: adapters off), when the objective uses one."""
    return _reference_source(cfg) if needs_reference(cfg) else {}


def _prepare(cfg: Config, tokenizer) -> Config:
    """Checks that every reward of rl.rewards exists (before any model is built); ppo trains a value head beside
    the policy (model.value_head)."""
    for i, spec in enumerate(cfg.rl.rewards):
        if spec.function not in builtin_names():
            load_function(spec.function, f"rl.rewards.{i}")
    if cfg.data.objective.name != "ppo" or cfg.model.value_head:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, value_head=True))


for _name, _loss in (("grpo", grpo_loss), ("rloo", rloo_loss), ("ppo", ppo_loss)):
    register(Objective(_name, ("decoder",), _loss, frozen_models=_frozen_models, prepare=_prepare, online=OnlineData,
                       spec=rollout_spec))
