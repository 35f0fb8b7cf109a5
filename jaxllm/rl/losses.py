"""Online RL losses: pure jnp functions of per-token log-probs, masks, advantages and a few scalars.

Shapes: B sequences (completions), T completion tokens, N = prompts * n rewards with the n samples of one
prompt consecutive. Masks are float32 (1 on completion tokens). Nothing here sees a model.

References (file and function each one follows, in its docstring):
- TRL 1.16 `trl/trainer/grpo_trainer.py` `GRPOTrainer._compute_loss` (policy_loss, kl_penalty k3) and
  `_generate_and_score_completions` (group_advantages); `trl/trainer/rloo_trainer.py` (rloo_advantages,
  `level="sequence_sum"`); `trl/trainer/utils.py` `nanstd`, `entropy_from_logits`.
- TRL's classic PPO (TRL <= 0.11: `trl/trainer/ppo_trainer.py` `PPOTrainer.loss` / `compute_rewards`,
  `trl/core.py` `masked_whiten` / `masked_var` / `entropy_from_logits`, `trl/trainer/utils.py`
  `AdaptiveKLController`): gae, whiten, value_loss, ppo_policy_loss, ppo_rewards, AdaptiveKL. TRL 1.16
  no longer ships PPO; tests/rl/test_losses.py transcribes those lines.

Metrics come back as `NAME:sum` and `NAME:count` pairs so the trainer can add them over micro-batches
and divide once (`metric_means`); the loss comes back already divided by its normaliser, which defaults
to this batch's count and can be given the whole (accumulated) batch's count instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

LEVELS = ("token", "sequence", "sequence_token", "sequence_sum")
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
ESTIMATORS = ("k1", "k2", "k3")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4      # TRL's `std_rewards + 1e-4` (GRPO advantages, RLOO's normalize_advantages)
WHITEN_EPS = 1e-8   # trl/core.py masked_whiten's `rsqrt(var + 1e-8)`


def _pair(name: str, total, count) -> dict[str, jax.Array]:
    return {f"{name}:sum": jnp.asarray(total, jnp.float32), f"{name}:count": jnp.asarray(count, jnp.float32)}


def metric_means(metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """{NAME: sum / max(count, 1)} for each `NAME:sum` / `NAME:count` pair (after summing micro-batches)."""
    return {k[:-4]: v / jnp.maximum(metrics[k[:-4] + ":count"], 1.0) for k, v in metrics.items() if k.endswith(":sum")}


def kl_penalty(logps_BT: jax.Array, ref_logps_BT: jax.Array, estimator: str = "k3") -> jax.Array:
    """Per-token KL(policy || reference) estimate [B, T] from log-probs of sampled tokens (Schulman's k1/k2/k3).

    k1 = logp - ref (TRL RLOO's and classic PPO's `logprob - ref_logprob`; can be negative), k2 = (logp - ref)^2 / 2,
    k3 = exp(ref - logp) - (ref - logp) - 1 (TRL GRPOTrainer._compute_loss's per_token_kl; always >= 0).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    delta = ref_logps_BT - logps_BT
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * jnp.square(delta)
    return jnp.exp(delta) - delta - 1.0


def policy_loss(logps_BT, old_logps_BT, advantages_B_or_BT, mask_BT, *, epsilon_low: float = 0.2,
                epsilon_high: float = 0.2, level: str = "token", aggregation: str = "grpo",
                max_completion_length: int | None = None, ref_logps_BT=None, beta: float = 0.0,
                kl_bias_correction: bool = False, delta: float | None = None, num_sequences=None,
                num_tokens=None, micro_batches: int = 1):
    """The clipped surrogate of TRL 1.16 `GRPOTrainer._compute_loss` (loss_type grpo/bnpo/dr_grpo/dapo).

    ratio = exp(level's log-weight): `token` logps - old per token (PPO/GRPO); `sequence` the masked mean of the
    per-token log-ratio, one weight per sequence (GSPO, TRL importance_sampling_level="sequence"); `sequence_token`
    GSPO-token (Zheng et al. 2025, eq. 14; Tunix's gspo-token, not in TRL): every token weighted by sg[the
    sequence's weight] * p / sg[p], the same values as `sequence` with each token's own gradient, so per-token
    advantages act per token (equal advantages: GSPO's loss and gradient); `sequence_sum`
    the summed log-ratio per sequence (TRL RLOOTrainer._compute_loss; use aggregation "grpo"). old_logps None =
    the on-policy case (stop_gradient(logps)). per-token loss = -min(ratio * A, clip(ratio, 1 - eps_low,
    1 + eps_high) * A) (`delta`: TRL's two-sided cap on the unclipped ratio), + beta * k3 KL to ref_logps
    (times the ratio with kl_bias_correction: TRL's use_bias_correction_kl). Aggregation, TRL's loss_type:
      grpo     sum_b [sum_t l * m / max(sum_t m, 1)] / num_sequences
      bnpo     sum l * m / max(sum m, 1) / micro_batches        (the micro-batch's token mean)
      dr_grpo  sum l * m / (num_sequences * max_completion_length)
      dapo     sum l * m / max(num_tokens, 1)                   (TRL: active tokens of the accumulated batch)
    num_sequences / num_tokens default to this batch's B and sum(mask): pass the accumulated batch's counts
    (and micro_batches for bnpo) to reproduce TRL's gradient accumulation. Returns (loss, metrics) with metrics
    `clip_ratio/{low,high,region}_mean` and `kl` (when beta != 0) as `:sum`/`:count` pairs (counted over
    masked tokens, or over sequences at sequence level: TRL's global_masked_mean) and `policy_loss` (the loss).
    """
    if level not in LEVELS:
        raise ValueError(f"importance sampling level {level!r}: choose one of {', '.join(LEVELS)}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss aggregation {aggregation!r}: choose one of {', '.join(AGGREGATIONS)}")
    if aggregation == "dr_grpo" and not max_completion_length:
        raise ValueError("aggregation dr_grpo needs max_completion_length (the rollout's max_new_tokens)")
    mask = mask_BT.astype(jnp.float32)
    if old_logps_BT is None:
        old_logps_BT = jax.lax.stop_gradient(logps_BT)
    adv = advantages_B_or_BT[:, None] if advantages_B_or_BT.ndim == 1 else advantages_B_or_BT
    log_ratio = logps_BT - old_logps_BT
    if level == "token":
        log_w = log_ratio
    elif level in ("sequence", "sequence_token"):
        log_w = (jnp.sum(log_ratio * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0))[:, None]
        if level == "sequence_token":  # GSPO-token: the sequence's weight, each token's own gradient
            log_w = jax.lax.stop_gradient(log_w) + logps_BT - jax.lax.stop_gradient(logps_BT)
    else:
        log_w = jnp.sum(log_ratio * mask, -1)[:, None]
    coef_1 = jnp.exp(log_w)
    coef_2 = jnp.clip(coef_1, 1.0 - epsilon_low, 1.0 + epsilon_high)
    capped = coef_1 if delta is None else jnp.minimum(coef_1, delta)
    per_token = -jnp.minimum(capped * adv, coef_2 * adv)
    metrics = {}
    if beta != 0.0:
        kl = kl_penalty(logps_BT, ref_logps_BT, "k3")
        if kl_bias_correction:
            kl = kl * coef_1
        per_token = per_token + beta * kl
        metrics.update(_pair("kl", jnp.sum(kl * mask), jnp.sum(mask)))
    per_token = jnp.broadcast_to(per_token, mask.shape) * mask
    batch = mask.shape[0]
    n_seq = batch if num_sequences is None else num_sequences
    if aggregation == "grpo":
        loss = jnp.sum(jnp.sum(per_token, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)) / n_seq
    elif aggregation == "bnpo":
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(mask), 1.0) / micro_batches
    elif aggregation == "dr_grpo":
        loss = jnp.sum(per_token) / (n_seq * max_completion_length)
    else:
        loss = jnp.sum(per_token) / jnp.maximum(jnp.sum(mask) if num_tokens is None else num_tokens, 1.0)
    low = ((coef_1 < 1.0 - epsilon_low) & (adv < 0)).astype(jnp.float32)
    high = ((coef_1 > 1.0 + epsilon_high) & (adv > 0)).astype(jnp.float32)
    region = jnp.maximum(low, high)
    if level in ("token", "sequence_token"):  # GSPO-token's weights are per token (equal within a sequence)
        weight, count = mask, jnp.sum(mask)
    else:  # one ratio per sequence: TRL counts every row, [B, 1]
        weight, count = jnp.ones((batch, 1), jnp.float32), float(batch)
    for name, flag in (("low", low), ("high", high), ("region", region)):
        metrics.update(_pair(f"clip_ratio/{name}_mean", jnp.sum(jnp.broadcast_to(flag, weight.shape) * weight), count))
    metrics.update(_pair("policy_loss", jax.lax.stop_gradient(loss), 1.0))
    return loss, metrics


def _nanmean(x, axis=None, keepdims=False):
    return jnp.nanmean(x, axis=axis, keepdims=keepdims)


def _nanstd(x, axis=None, keepdims=False):
    """TRL `trl/trainer/utils.py` nanstd: NaN-ignoring std with Bessel's correction; NaN below two values."""
    mean = jnp.nanmean(x, axis=axis, keepdims=True)
    var = jnp.nanmean(jnp.square(x - mean), axis=axis, keepdims=True)
    count = jnp.sum(~jnp.isnan(x), axis=axis, keepdims=True).astype(x.dtype)
    var = var * jnp.where(count > 1, count / jnp.maximum(count - 1, 1.0), jnp.nan)
    std = jnp.sqrt(var)
    return std if keepdims else jnp.squeeze(std, axis=axis)


def group_advantages(rewards_N, n: int, scale: str = "group"):
    """GRPO advantages [N]: reward minus the mean of its prompt's n samples, divided by (std + 1e-4) of the group
    (`group`), of the whole batch (`batch`, mean still per group), or not divided (`none`: Dr. GRPO). NaN rewards
    (unscorable completions) are left out of the means and stds and get advantage 0. TRL 1.16
    GRPOTrainer._generate_and_score_completions, multi_objective_aggregation="sum_then_normalize"."""
    if scale not in SCALES:
        raise ValueError(f"reward scaling {scale!r}: choose one of {', '.join(SCALES)}")
    rewards = jnp.asarray(rewards_N, jnp.float32)
    grouped = rewards.reshape(-1, n)
    mean = jnp.repeat(_nanmean(grouped, axis=1), n)
    if scale == "batch":
        std = jnp.broadcast_to(_nanstd(rewards) if rewards.size > 1 else 0.0, rewards.shape)
    else:
        std = jnp.repeat(_nanstd(grouped, axis=1), n) if n > 1 else jnp.zeros_like(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + STD_EPS)
    return jnp.nan_to_num(adv, nan=0.0)


def rloo_advantages(rewards_N, n: int, normalize: bool = False):
    """RLOO advantages [N]: reward minus the mean of the other scorable samples of its prompt (leave-one-out),
    optionally whitened over the batch ((a - mean) / (std + 1e-4), TRL's normalize_advantages); NaN rewards are
    left out and get 0. TRL 1.16 RLOOTrainer._generate_and_score_completions. (TRL's RLOO puts its KL in the
    reward before this: rewards - beta * sum_t k1, see kl_penalty.)"""
    rewards = jnp.asarray(rewards_N, jnp.float32)
    if n < 2:
        adv = jnp.zeros_like(rewards)
    else:
        grouped = rewards.reshape(-1, n)
        counts = jnp.sum(~jnp.isnan(grouped), axis=1, keepdims=True).astype(jnp.float32)
        total = jnp.nansum(grouped, axis=1, keepdims=True)
        adv = rewards - ((total - grouped) / (counts - 1.0)).reshape(-1)
    if normalize:
        adv = (adv - jnp.nanmean(adv)) / (_nanstd(adv) + STD_EPS)
    return jnp.nan_to_num(adv, nan=0.0)


def masked_mean(x, mask, axis=None):
    """trl/core.py masked_mean: sum(x * mask) / sum(mask)."""
    return jnp.sum(x * mask, axis=axis) / jnp.sum(mask, axis=axis)


def masked_var(x, mask, unbiased: bool = True):
    """trl/core.py masked_var: the masked variance, with Bessel's correction over the mask's count."""
    var = masked_mean(jnp.square(x - masked_mean(x, mask)), mask)
    if unbiased:
        total = jnp.sum(mask)
        var = var * total / (total - 1.0)
    return var


def whiten(x, mask, shift_mean: bool = True):
    """trl/core.py masked_whiten: (x - masked mean) * rsqrt(unbiased masked var + 1e-8); the mean added back
    when shift_mean is False. Whitened values on padding are not zeroed (TRL's behaviour)."""
    mean = masked_mean(x, mask)
    out = (x - mean) * jax.lax.rsqrt(masked_var(x, mask) + WHITEN_EPS)
    return out if shift_mean else out + mean


def gae(rewards_BT, values_BT, mask_BT, gamma: float = 1.0, lam: float = 0.95):
    """Generalised advantage estimation: a reverse scan over T of delta_t = r_t + gamma * V_{t+1} - V_t,
    A_t = delta_t + gamma * lam * A_{t+1} (V_T = 0), with rewards and values zeroed on padding first; returns
    (advantages, returns = advantages + values), neither whitened. Classic TRL PPOTrainer.loss (<= 0.11)."""
    mask = mask_BT.astype(jnp.float32)
    values = values_BT * mask
    rewards = rewards_BT * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(last, delta_B):
        last = delta_B + gamma * lam * last
        return last, last

    _, adv_TB = jax.lax.scan(step, jnp.zeros(deltas.shape[0], deltas.dtype), deltas.T, reverse=True)
    adv = adv_TB.T
    return adv, adv + values


def value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip: float = 0.2):
    """Clipped value loss: 0.5 * masked mean of max((V - R)^2, (clip(V, V_old +- clip) - R)^2), and
    `vf_clipfrac` (the clipped error is the larger). Classic TRL PPOTrainer.loss's vf_loss. Returns (loss,
    metrics as :sum/:count pairs)."""
    mask = mask_BT.astype(jnp.float32)
    clipped = jnp.clip(values_BT, old_values_BT - clip, old_values_BT + clip)
    losses1 = jnp.square(values_BT - returns_BT)
    losses2 = jnp.square(clipped - returns_BT)
    loss = 0.5 * masked_mean(jnp.maximum(losses1, losses2), mask)
    return loss, _pair("vf_clipfrac", jnp.sum((losses2 > losses1) * mask), jnp.sum(mask))


def ppo_policy_loss(logps_BT, old_logps_BT, advantages_BT, mask_BT, cliprange: float = 0.2):
    """PPO's clipped policy loss: masked mean of max(-A * ratio, -A * clip(ratio, 1 +- cliprange)), with
    `clipfrac`, `approxkl` (0.5 * (logp - old)^2) and `policykl` (old - logp) as :sum/:count pairs. Classic TRL
    PPOTrainer.loss's pg_loss (advantages already whitened: whiten(gae(...)[0], mask))."""
    mask = mask_BT.astype(jnp.float32)
    log_ratio = logps_BT - old_logps_BT
    ratio = jnp.exp(log_ratio)
    losses1 = -advantages_BT * ratio
    losses2 = -advantages_BT * jnp.clip(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(jnp.maximum(losses1, losses2), mask)
    count = jnp.sum(mask)
    metrics = _pair("clipfrac", jnp.sum((losses2 > losses1) * mask), count)
    metrics.update(_pair("approxkl", 0.5 * jnp.sum(jnp.square(log_ratio) * mask), count))
    metrics.update(_pair("policykl", -jnp.sum(log_ratio * mask), count))
    return loss, metrics


def ppo_rewards(scores_B, logps_BT, ref_logps_BT, mask_BT, kl_coef):
    """PPO's per-token rewards: -kl_coef * (logp - ref) on every token, plus the sequence's score on its last
    masked token. Returns (rewards [B, T], non_score_rewards [B, T]). Classic TRL PPOTrainer.compute_rewards."""
    mask = mask_BT.astype(jnp.float32)
    non_score = -kl_coef * kl_penalty(logps_BT, ref_logps_BT, "k1")
    positions = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, positions, -1), axis=1)
    at_last = (positions[None, :] == last[:, None]).astype(non_score.dtype)
    return non_score + at_last * scores_B[:, None], non_score


def token_entropy(logits_BTV):
    """Per-token entropy [B, T] of softmax(logits), float32: logsumexp(l) - sum(softmax(l) * l) (stable: no
    log of a probability; trl/core.py entropy_from_logits)."""
    logits = logits_BTV.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


def entropy(logits_BTV, mask_BT):
    """Masked mean token entropy (TRL's logged `entropy`) as a :sum/:count pair."""
    mask = mask_BT.astype(jnp.float32)
    return _pair("entropy", jnp.sum(token_entropy(logits_BTV) * mask), jnp.sum(mask))


@dataclasses.dataclass
class AdaptiveKL:
    """The adaptive KL coefficient of Ziegler et al. 2019 (TRL <= 0.11 `trl/trainer/utils.py`
    AdaptiveKLController): value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon. Host-side state."""

    init_kl_coef: float
    target: float
    horizon: float

    def __post_init__(self):
        self.value = float(self.init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
