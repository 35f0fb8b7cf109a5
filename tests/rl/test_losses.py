"""The online RL losses against TRL on the same numbers (values, metrics and gradients w.r.t. the log-probs,
float32, rtol 1e-5), and invariants that hold whatever TRL does.

TRL 1.16's GRPO and RLOO losses are inline in `_compute_loss`: the tests run that method with a stub `self`
(the trainer's config fields) whose `_get_per_token_logps_and_entropies` returns the given log-probs, so every
number comes from TRL's code; `nanstd` and `entropy_from_logits` are called directly. Their advantages are
inside `_generate_and_score_completions` (it needs models and reward functions): its lines are transcribed
below. TRL 1.16 no longer ships PPO: the classic PPOTrainer's lines (TRL <= 0.11, `trl/core.py` and
`trl/trainer/ppo_trainer.py` `PPOTrainer.loss` / `compute_rewards`, `trl/trainer/utils.py`
`AdaptiveKLController`) are transcribed too.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.rl import losses as L

torch = pytest.importorskip("torch")
grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
rloo_trainer = pytest.importorskip("trl.trainer.rloo_trainer")
trl_utils = pytest.importorskip("trl.trainer.utils")

RTOL, ATOL = 1e-5, 1e-6
B, T, NGEN = 6, 7, 3
RNG = np.random.default_rng(0)
LENGTHS = np.array([7, 3, 1, 5, 2, 6])  # ragged completions
MASK = (np.arange(T)[None, :] < LENGTHS[:, None]).astype(np.float32)
LOGPS = (-RNG.uniform(0.1, 4.0, (B, T))).astype(np.float32)
OLD = (LOGPS + RNG.normal(0.0, 0.3, (B, T))).astype(np.float32)  # ratios both inside and outside 1 +- eps
REF = (LOGPS + RNG.normal(0.0, 0.5, (B, T))).astype(np.float32)
ADV = RNG.normal(0.0, 1.0, B).astype(np.float32)


def close(ours, theirs, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(ours, np.float64), np.asarray(theirs, np.float64), rtol=rtol, atol=atol)


def _accelerator():
    return SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x, gather=lambda x: x,
                           gather_for_metrics=lambda x: x)


def _trl_grpo(loss_type, level="token", eps_low=0.2, eps_high=0.2, beta=0.0, rows=slice(None), accum=1,
              num_items=None, max_len=T, bias_kl=False):
    """TRL 1.16 GRPOTrainer._compute_loss on rows of the module's arrays: (loss, d loss / d logps, metrics)."""
    logps = torch.tensor(LOGPS[rows], requires_grad=True)
    mask = torch.tensor(MASK[rows]).long()
    stub = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accum, max_completion_length=max_len, accelerator=_accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=bias_kl, delta=None, steps_per_generation=accum),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    n_rows = mask.shape[0]
    inputs = {"prompt_ids": torch.zeros(n_rows, 2, dtype=torch.long), "prompt_mask": torch.ones(n_rows, 2).long(),
              "completion_ids": torch.zeros(n_rows, T, dtype=torch.long), "completion_mask": mask,
              "advantages": torch.tensor(ADV[rows]), "old_per_token_logps": torch.tensor(OLD[rows]),
              "ref_per_token_logps": torch.tensor(REF[rows]),
              "num_items_in_batch": torch.tensor(float(MASK.sum() if num_items is None else num_items))}
    loss = grpo_trainer.GRPOTrainer._compute_loss(stub, None, inputs)
    loss.backward()
    return loss.item(), logps.grad.numpy(), {k: v[-1] for k, v in stub._metrics["train"].items()}


def _ours(rows=slice(None), **kw):
    def f(logps):
        return L.policy_loss(logps, jnp.asarray(OLD[rows]), jnp.asarray(ADV[rows]), jnp.asarray(MASK[rows]),
                             ref_logps_BT=jnp.asarray(REF[rows]), **kw)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(LOGPS[rows]))
    return float(loss), np.asarray(grad), metrics


@pytest.mark.parametrize("aggregation,level", list(itertools.product(L.AGGREGATIONS, ("token", "sequence"))))
def test_policy_loss_matches_trl_grpo(aggregation, level):
    # symmetric clip; clip-higher with the k3 KL term (importance-weighted, TRL's use_bias_correction_kl, for dapo)
    for eps_high, beta, bias_kl in ((0.2, 0.0, False), (0.28, 0.04, aggregation == "dapo")):
        loss_t, grad_t, m_t = _trl_grpo(aggregation, level, 0.2, eps_high, beta, bias_kl=bias_kl)
        loss, grad, metrics = _ours(epsilon_low=0.2, epsilon_high=eps_high, level=level, aggregation=aggregation,
                                    max_completion_length=T, beta=beta, kl_bias_correction=bias_kl)
        close(loss, loss_t)
        close(grad, grad_t)
        means = L.metric_means(metrics)
        for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
            close(means[name], m_t[name])
        close(means["policy_loss"], loss_t)


def test_clip_ratios_are_exercised():
    """The module's numbers clip on both sides (else the parity above would not test the clipping)."""
    means = L.metric_means(_ours(level="token", aggregation="grpo")[2])
    assert 0 < float(means["clip_ratio/low_mean"]) and 0 < float(means["clip_ratio/high_mean"])


@pytest.mark.parametrize("aggregation", L.AGGREGATIONS)
def test_micro_batches_reproduce_trl_accumulation(aggregation):
    """Two micro-batches with the whole batch's counts give TRL's accumulated loss and gradient (TRL divides
    grpo/bnpo/dr_grpo by the accumulation steps and dapo by the accumulated batch's tokens)."""
    halves = (slice(0, 3), slice(3, 6))
    kw = dict(level="token", aggregation=aggregation, max_completion_length=T, num_sequences=B,
              num_tokens=float(MASK.sum()), micro_batches=2)
    ours = [_ours(rows=h, **kw) for h in halves]
    theirs = [_trl_grpo(aggregation, rows=h, accum=2) for h in halves]
    close(sum(o[0] for o in ours), sum(t[0] for t in theirs))
    close(np.concatenate([o[1] for o in ours]), np.concatenate([t[1] for t in theirs]))
    if aggregation in ("grpo", "dr_grpo", "dapo"):  # equal micro-batches: the same as the whole batch at once
        close(sum(o[0] for o in ours), _ours(level="token", aggregation=aggregation, max_completion_length=T)[0])


def test_clipped_tokens_get_exactly_zero_gradient():
    """Tokens whose ratio is past the clip on the side their advantage's sign clips have zero gradient; the
    others (inside the range, or past it on the other side) do not."""
    loss, grad, _ = _ours(level="token", aggregation="dapo", epsilon_low=0.2, epsilon_high=0.2)
    ratio, adv = np.exp(LOGPS - OLD), ADV[:, None]
    clipped = ((ratio > 1.2) & (adv > 0)) | ((ratio < 0.8) & (adv < 0))
    assert (clipped & (MASK > 0)).any() and (~clipped & (MASK > 0)).any()
    assert np.all(grad[clipped] == 0.0)
    assert np.all(grad[~clipped & (MASK > 0)] != 0.0)
    assert np.all(grad[MASK == 0] == 0.0)


@pytest.mark.parametrize("aggregation", L.AGGREGATIONS)
def test_gspo_token_is_gspo_with_equal_advantages_and_weights_each_tokens_own_advantage(aggregation):
    """GSPO-token (Zheng et al. 2025, eq. 14; not in TRL): with one advantage per sequence the loss, gradient and
    clip metrics are GSPO's (TRL's sequence level, checked against TRL above); with per-token advantages each
    unclipped token's gradient is its own advantage times the sequence's weight (grpo aggregation)."""
    kw = dict(epsilon_low=0.2, epsilon_high=0.28, aggregation=aggregation, max_completion_length=T, beta=0.0)
    loss_s, grad_s, metrics_s = _ours(level="sequence", **kw)
    loss_t, grad_t, metrics_t = _ours(level="sequence_token", **kw)
    close(loss_t, loss_s)
    close(grad_t, grad_s)
    assert L.metric_means(metrics_t)["clip_ratio/region_mean"] == pytest.approx(
        float((np.sum(np.broadcast_to(np.asarray(_seq_clipped(0.2, 0.28))[:, None], MASK.shape) * MASK)) / MASK.sum()))
    per_token = RNG.normal(0.0, 1.0, (B, T)).astype(np.float32)

    def f(logps):
        return L.policy_loss(logps, jnp.asarray(OLD), jnp.asarray(per_token), jnp.asarray(MASK),
                             level="sequence_token", aggregation="grpo", epsilon_low=10.0, epsilon_high=10.0)[0]

    grad = np.asarray(jax.grad(f)(jnp.asarray(LOGPS)))  # a clip range wide enough that nothing is clipped
    weight = np.exp(((LOGPS - OLD) * MASK).sum(1) / MASK.sum(1))
    close(grad, -per_token * weight[:, None] * MASK / MASK.sum(1, keepdims=True) / B)


def _seq_clipped(eps_low, eps_high):
    """Rows whose GSPO weight lies outside the clip range on the side its advantage pushes."""
    weight = np.exp(((LOGPS - OLD) * MASK).sum(1) / MASK.sum(1))
    return ((weight < 1 - eps_low) & (ADV < 0)) | ((weight > 1 + eps_high) & (ADV > 0))


def test_rloo_sequence_sum_matches_trl_rloo():
    """level="sequence_sum" with aggregation grpo is TRL RLOOTrainer._compute_loss (ratio of summed log-probs)."""
    logps = torch.tensor(LOGPS, requires_grad=True)
    stub = SimpleNamespace(epsilon_low=0.2, epsilon_high=0.28, model=SimpleNamespace(training=True),
                           aux_loss_enabled=False, accelerator=_accelerator(), _metrics={"train": defaultdict(list)},
                           _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    old_seq = (OLD * MASK).sum(1)
    inputs = {"prompt_ids": torch.zeros(B, 2).long(), "prompt_mask": torch.ones(B, 2).long(),
              "completion_ids": torch.zeros(B, T).long(), "completion_mask": torch.tensor(MASK).long(),
              "old_logps": torch.tensor(old_seq), "advantages": torch.tensor(ADV)}
    loss_t = rloo_trainer.RLOOTrainer._compute_loss(stub, None, inputs)
    loss_t.backward()
    loss, grad, metrics = _ours(level="sequence_sum", aggregation="grpo", epsilon_low=0.2, epsilon_high=0.28)
    close(loss, loss_t.item())
    close(grad, logps.grad.numpy())
    means = L.metric_means(metrics)
    for name in ("low", "high", "region"):
        close(means[f"clip_ratio/{name}_mean"], stub._metrics["train"][f"clip_ratio/{name}_mean"][-1])


def test_kl_estimators():
    lp, ref = torch.tensor(LOGPS), torch.tensor(REF)
    close(L.kl_penalty(LOGPS, REF, "k3"), torch.exp(ref - lp) - (ref - lp) - 1)  # TRL GRPO's per_token_kl
    close(L.kl_penalty(LOGPS, REF, "k1"), lp - ref)  # TRL RLOO's / classic PPO's `logprob - ref_logprob`
    close(L.kl_penalty(LOGPS, REF, "k2"), 0.5 * (lp - ref) ** 2)
    assert float(jnp.min(L.kl_penalty(LOGPS, REF, "k3"))) >= 0.0
    with pytest.raises(ValueError, match="k4"):
        L.kl_penalty(LOGPS, REF, "k4")


# TRL 1.16 GRPOTrainer._generate_and_score_completions, sum_then_normalize branch (rewards -> advantages).
def _trl_group_advantages(rewards, num_generations, scale_rewards):
    rewards = torch.tensor(rewards)
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_utils.nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = trl_utils.nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


# TRL 1.16 RLOOTrainer._generate_and_score_completions (rewards -> leave-one-out advantages).
def _trl_rloo_advantages(rewards, num_generations, normalize_advantages):
    rewards = torch.tensor(rewards)
    grouped_rewards = rewards.view(-1, num_generations)
    scorable_counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (scorable_counts - 1)
    advantages = rewards - baselines.view(-1)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (trl_utils.nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


REWARDS = np.array([1.0, 0.0, 0.5, 2.0, 2.0, 2.0, np.nan, 1.0, 3.0, np.nan, np.nan, 4.0, 0.2, 0.9, 0.4],
                   np.float32)  # a zero-std group, unscorable rows, a group with one scorable row


@pytest.mark.parametrize("scale", L.SCALES)
def test_group_advantages_match_trl(scale):
    ours = L.group_advantages(jnp.asarray(REWARDS), NGEN, scale)
    close(ours, _trl_group_advantages(REWARDS, NGEN, scale))
    assert float(jnp.max(jnp.abs(ours[3:6]))) == 0.0  # equal rewards: no signal
    if scale == "group":
        close(ours[:3], (REWARDS[:3] - REWARDS[:3].mean()) / (REWARDS[:3].std(ddof=1) + 1e-4))


@pytest.mark.parametrize("normalize", (False, True))
def test_rloo_advantages_match_trl(normalize):
    ours = L.rloo_advantages(jnp.asarray(REWARDS), NGEN, normalize)
    close(ours, _trl_rloo_advantages(REWARDS, NGEN, normalize))
    if not normalize:
        close(ours[0], 1.0 - (0.0 + 0.5) / 2)


# The classic TRL PPOTrainer (TRL <= 0.11): trl/core.py masked_mean / masked_var / masked_whiten /
# clip_by_value / entropy_from_logits and trl/trainer/ppo_trainer.py PPOTrainer.loss and compute_rewards.
def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def _masked_var(values, mask):
    mean = _masked_mean(values, mask)
    variance = _masked_mean((values - mean) ** 2, mask)
    mask_sum = mask.sum()
    return variance * (mask_sum / (mask_sum - 1))


def _masked_whiten(values, mask, shift_mean=True):
    mean, var = _masked_mean(values, mask), _masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def _trl_ppo_loss(old_logprobs, values, rewards, vpreds, logprobs, mask, gamma, lam, cliprange, cliprange_value):
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    raw_advantages = advantages
    advantages = _masked_whiten(advantages, mask).detach()
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpredclipped - returns) ** 2
    vf_loss = 0.5 * _masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    vf_clipfrac = _masked_mean(torch.gt(vf_losses2, vf_losses1).double(), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = _masked_mean(torch.max(pg_losses, pg_losses2), mask)
    pg_clipfrac = _masked_mean(torch.gt(pg_losses2, pg_losses).double(), mask)
    approxkl = 0.5 * _masked_mean((logprobs - old_logprobs) ** 2, mask)
    policykl = _masked_mean(old_logprobs - logprobs, mask)
    return dict(raw_advantages=raw_advantages, advantages=advantages, returns=returns, vf_loss=vf_loss,
                vf_clipfrac=vf_clipfrac, pg_loss=pg_loss, clipfrac=pg_clipfrac, approxkl=approxkl, policykl=policykl)


def _trl_compute_rewards(scores, logprobs, ref_logprobs, masks, kl_coef):
    rewards, non_score_rewards = [], []
    for score, logprob, ref_logprob, mask in zip(scores, logprobs, ref_logprobs, masks):
        kl = logprob - ref_logprob
        non_score_reward = -kl_coef * kl
        non_score_rewards.append(non_score_reward)
        reward = non_score_reward.clone()
        last_non_masked_index = mask.nonzero()[-1]
        reward[last_non_masked_index] += score
        rewards.append(reward)
    return torch.stack(rewards), torch.stack(non_score_rewards)


def test_ppo_matches_classic_trl():
    scores = RNG.normal(0.0, 1.0, B).astype(np.float32)
    old_values = RNG.normal(0.0, 1.0, (B, T)).astype(np.float32)
    vpreds = (old_values + RNG.normal(0.0, 0.4, (B, T))).astype(np.float32)
    gamma, lam, clip, vclip, kl_coef = 0.99, 0.9, 0.2, 0.2, 0.05
    rewards, non_score = L.ppo_rewards(jnp.asarray(scores), LOGPS, REF, MASK, kl_coef)
    rewards_t, non_score_t = _trl_compute_rewards(torch.tensor(scores), torch.tensor(LOGPS), torch.tensor(REF),
                                                  torch.tensor(MASK), kl_coef)
    close(rewards, rewards_t)
    close(non_score, non_score_t)

    lp_t, vp_t = torch.tensor(LOGPS, requires_grad=True), torch.tensor(vpreds, requires_grad=True)
    ref = _trl_ppo_loss(torch.tensor(OLD), torch.tensor(old_values), rewards_t, vp_t, lp_t, torch.tensor(MASK),
                        gamma, lam, clip, vclip)
    (ref["pg_loss"] + ref["vf_loss"]).backward()

    adv, returns = L.gae(rewards, old_values, MASK, gamma, lam)
    close(adv, ref["raw_advantages"].detach(), atol=1e-5)
    close(returns, ref["returns"].detach(), atol=1e-5)
    whitened = L.whiten(adv, MASK)
    close(whitened, ref["advantages"], atol=1e-5)

    def total(logps, values):
        pg, pm = L.ppo_policy_loss(logps, OLD, whitened, MASK, clip)
        vf, vm = L.value_loss(values, old_values, returns, MASK, vclip)
        return pg + vf, (pg, vf, {**pm, **vm})

    (_, (pg, vf, metrics)), (g_lp, g_v) = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(
        jnp.asarray(LOGPS), jnp.asarray(vpreds))
    close(pg, ref["pg_loss"].item(), atol=1e-5)
    close(vf, ref["vf_loss"].item(), atol=1e-5)
    close(g_lp, lp_t.grad, atol=1e-5)
    close(g_v, vp_t.grad, atol=1e-5)
    means = L.metric_means(metrics)
    for name in ("clipfrac", "approxkl", "policykl", "vf_clipfrac"):
        close(means[name], ref[name].item())
    assert 0 < float(means["clipfrac"]) < 1 and 0 < float(means["vf_clipfrac"]) < 1


def test_whiten_without_shift_and_scores_on_last_token():
    x = RNG.normal(2.0, 3.0, (B, T)).astype(np.float32)
    close(L.whiten(x, MASK, shift_mean=False), _masked_whiten(torch.tensor(x), torch.tensor(MASK), False))
    rewards, non_score = L.ppo_rewards(jnp.ones(B), LOGPS, LOGPS, MASK, 0.1)
    assert np.array_equal(np.asarray(rewards), np.eye(T, dtype=np.float32)[LENGTHS - 1])


def test_gae_is_discounted_sum_of_rewards_without_values():
    """With zero values and lam = 1, the advantage is the discounted reward-to-go: a check independent of TRL."""
    r = RNG.normal(0.0, 1.0, (B, T)).astype(np.float32) * MASK
    adv, returns = L.gae(r, np.zeros_like(r), MASK, 0.9, 1.0)
    expect = np.array([[sum(0.9 ** (k - t) * r[b, k] for k in range(t, T)) for t in range(T)] for b in range(B)])
    close(adv, expect, atol=1e-5)
    close(returns, expect, atol=1e-5)


def test_entropy_matches_trl_and_is_stable():
    logits = RNG.normal(0.0, 3.0, (B, T, 11)).astype(np.float32)
    close(L.token_entropy(logits), trl_utils.entropy_from_logits(torch.tensor(logits)))
    big = jnp.asarray(logits) * 1e4  # near one-hot: finite, about 0
    assert bool(jnp.all(jnp.isfinite(L.token_entropy(big)))) and float(jnp.max(L.token_entropy(big))) < 1e-3
    means = L.metric_means(L.entropy(logits, MASK))
    close(means["entropy"], (trl_utils.entropy_from_logits(torch.tensor(logits)) * torch.tensor(MASK)).sum() / MASK.sum())


class _TRLAdaptiveKLController:  # TRL <= 0.11 trl/trainer/utils.py
    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        target = self.target
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


def test_adaptive_kl_matches_trl():
    ours, theirs = L.AdaptiveKL(0.2, 6.0, 10000), _TRLAdaptiveKLController(0.2, 6.0, 10000)
    for kl in (1.0, 5.9, 6.0, 8.0, 30.0, 0.0):
        ours.update(kl, 256)
        theirs.update(kl, 256)
        close(ours.value, theirs.value, rtol=1e-12)
    assert ours.value != 0.2


def test_bad_choices_are_named():
    with pytest.raises(ValueError, match="dr_grpo needs max_completion_length"):
        L.policy_loss(LOGPS, OLD, ADV, MASK, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="choose one of grpo"):
        L.policy_loss(LOGPS, OLD, ADV, MASK, aggregation="gspo")
    with pytest.raises(ValueError, match="choose one of token"):
        L.policy_loss(LOGPS, OLD, ADV, MASK, level="tokens")
    with pytest.raises(ValueError, match="choose one of group"):
        L.group_advantages(REWARDS, NGEN, "global")
