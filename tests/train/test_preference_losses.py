"""The preference losses against TRL 1.16's own code on the same numbers (values, metrics and gradients
w.r.t. the log-probs, float32, rtol 1e-5), and invariants that hold whatever TRL does.

TRL computes DPO and KTO inline in `_compute_loss`: the tests run that method with a stub `self` (the
trainer's config fields) and a stub model whose forward returns the given per-token log-probs, with the
reference log-probs precomputed (TRL's `precompute_ref_log_probs` path), so every number comes from TRL's
code. ORPO and SimPO (CPO) have loss methods, called unbound with a stub `self`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import MethodType, SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError
from jaxllm.train import preference_losses as P

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-5, 1e-6
N = 4
RNG = np.random.default_rng(0)
CHOSEN = (-RNG.uniform(2.0, 30.0, N)).astype(np.float32)
REJECTED = (-RNG.uniform(2.0, 30.0, N)).astype(np.float32)
REF_CHOSEN = (CHOSEN + RNG.normal(0.0, 3.0, N)).astype(np.float32)
REF_REJECTED = (REJECTED + RNG.normal(0.0, 3.0, N)).astype(np.float32)
N_CHOSEN = np.array([3, 7, 1, 12], np.float32)
N_REJECTED = np.array([5, 2, 9, 12], np.float32)


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)


def _trainer_stub(**fields):
    base = dict(model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
                precompute_ref_logps=True, _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    return SimpleNamespace(**{**base, **fields})


def _rows(logps, tokens):
    """A stub model's [S, T-1] per-token log-probs summing to `logps` per row, and the rows' completion
    masks [S, T] with `tokens` completion tokens at the end of each row (what TRL's collator makes)."""
    width = int(tokens.max()) + 2
    per_token = torch.cat([torch.zeros(len(tokens), width - 2), logps[:, None]], dim=1)
    mask = torch.zeros(len(tokens), width, dtype=torch.long)
    for i, n in enumerate(tokens.astype(int)):
        mask[i, width - n:] = 1
    return per_token, mask


def _outputs(per_token):
    zeros = torch.zeros_like(per_token)
    return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo(loss_types, loss_weights=None, beta=0.1, label_smoothing=0.0, idx=slice(None)):
    """TRL's DPO loss, metrics and gradients w.r.t. the policy's chosen and rejected log-probs."""
    from trl.trainer.dpo_trainer import DPOTrainer

    policy = torch.tensor(np.concatenate([CHOSEN[idx], REJECTED[idx]]), requires_grad=True)
    per_token, completion_mask = _rows(policy, np.concatenate([N_CHOSEN[idx], N_REJECTED[idx]]))
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": torch.tensor(REF_CHOSEN[idx]),
              "ref_rejected_logps": torch.tensor(REF_REJECTED[idx])}
    stub = _trainer_stub(ld_alpha=None, f_divergence_type="reverse_kl", loss_types=list(loss_types),
                         loss_weights=list(loss_weights or [1.0] * len(loss_types)), beta=beta,
                         label_smoothing=label_smoothing, use_weighting=False, args=SimpleNamespace(discopop_tau=0.05))
    loss = DPOTrainer._compute_loss(stub, lambda **kwargs: _outputs(per_token), inputs, False)
    loss.backward()
    grad = policy.grad.numpy()
    metrics = {k: v[0] for k, v in stub._metrics["train"].items()}
    return float(loss), grad[: len(grad) // 2], grad[len(grad) // 2:], metrics


def ours_dpo(idx=slice(None), **kwargs):
    def mean_loss(c, r):
        losses, rc, rr = P.dpo_losses(c, r, REF_CHOSEN[idx], REF_REJECTED[idx], N_CHOSEN[idx], N_REJECTED[idx],
                                      **kwargs)
        return jnp.mean(losses), (rc, rr)

    (loss, (rc, rr)), (gc, gr) = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(CHOSEN[idx]), jnp.asarray(REJECTED[idx]))
    metrics = {"rewards/chosen": jnp.mean(rc), "rewards/rejected": jnp.mean(rr), "rewards/margins": jnp.mean(rc - rr),
               "rewards/accuracies": jnp.mean((rc > rr).astype(jnp.float32)), "logps/chosen": np.mean(CHOSEN[idx]),
               "logps/rejected": np.mean(REJECTED[idx])}
    return float(loss), np.asarray(gc), np.asarray(gr), {k: float(v) for k, v in metrics.items()}


def _close(ours, theirs):
    loss, gc, gr, metrics = ours
    t_loss, t_gc, t_gr, t_metrics = theirs
    np.testing.assert_allclose(loss, t_loss, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gc, t_gc, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gr, t_gr, rtol=RTOL, atol=ATOL)
    for name, value in metrics.items():
        np.testing.assert_allclose(value, t_metrics[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert np.any(np.abs(gc) > 1e-4) and np.any(np.abs(gr) > 1e-4)  # a gradient that is there to compare


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [
    ("sigmoid", 0.1, 0.0), ("hinge", 0.1, 0.0), ("ipo", 0.1, 0.0), ("robust", 0.1, 0.2), ("exo_pair", 0.1, 1e-3),
    ("nca_pair", 0.1, 0.0), ("bco_pair", 0.1, 0.0), ("sppo_hard", 0.1, 0.0), ("apo_zero", 0.1, 0.0),
    ("apo_down", 0.1, 0.0), ("discopop", 0.1, 0.0), ("sigmoid_norm", 0.5, 0.0), ("ipo", 0.5, 0.0),
])
def test_dpo_losses_equal_trls(loss_type, beta, label_smoothing):
    _close(ours_dpo(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing),
           trl_dpo([loss_type], beta=beta, label_smoothing=label_smoothing))


def test_a_weighted_list_of_dpo_losses_equals_trls():
    _close(ours_dpo(beta=0.1, loss_type=["sigmoid", "ipo", "hinge"], loss_weights=[0.8, 0.2, 0.5]),
           trl_dpo(["sigmoid", "ipo", "hinge"], [0.8, 0.2, 0.5], beta=0.1))


def test_conservative_dpo_equals_trls_label_smoothed_term():
    """cDPO (sigmoid with label_smoothing > 0): TRL 1.16's sigmoid ignores label_smoothing, its `aot` applies
    exactly cDPO's term to the sorted log-ratios, and sorting one pair changes nothing."""
    for i in range(N):
        idx = slice(i, i + 1)
        _close(ours_dpo(idx, beta=0.1, loss_type="sigmoid", label_smoothing=0.25),
               trl_dpo(["aot"], beta=0.1, label_smoothing=0.25, idx=idx))
    plain, smoothed = ours_dpo(beta=0.1), ours_dpo(beta=0.1, label_smoothing=0.25)
    assert abs(plain[0] - smoothed[0]) > 1e-3


def _ours_unpaired(fn, **kwargs):
    """(mean loss, grads, rewards, extras) of a no-reference pair loss (simpo / orpo) on the shared numbers."""
    def mean_loss(c, r):
        out = fn(c, r, N_CHOSEN, N_REJECTED, **kwargs)
        return jnp.mean(out[0]), out[1:]

    (loss, aux), grads = jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
        jnp.asarray(CHOSEN), jnp.asarray(REJECTED))
    return float(loss), [np.asarray(g) for g in grads], [np.asarray(a) for a in aux]


def _torch_means():
    chosen, rejected = torch.tensor(CHOSEN, requires_grad=True), torch.tensor(REJECTED, requires_grad=True)
    return chosen, rejected, chosen / torch.tensor(N_CHOSEN), rejected / torch.tensor(N_REJECTED)


@pytest.mark.parametrize("beta,gamma,label_smoothing,alpha", [(2.0, 0.5, 0.0, 0.0), (2.5, 1.4, 0.1, 0.0),
                                                              (2.0, 0.5, 0.0, 0.25)])
def test_simpo_equals_trls_cpo_loss(beta, gamma, label_smoothing, alpha):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    chosen, rejected, mean_c, mean_r = _torch_means()
    stub = _trainer_stub(beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing, alpha=alpha, loss_type="simpo")
    losses, t_rc, t_rr = CPOTrainer.cpo_loss(stub, mean_c, mean_r)
    losses.mean().backward()
    loss, (gc, gr), (rc, rr) = _ours_unpaired(P.simpo_losses, beta=beta, simpo_gamma=gamma,
                                              label_smoothing=label_smoothing, alpha=alpha)
    np.testing.assert_allclose(loss, float(losses.mean()), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gc, chosen.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gr, rejected.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rc, t_rc.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rr, t_rr.numpy(), rtol=RTOL, atol=ATOL)


def _negated(out):
    return (-out[0], *out[1:])


@pytest.mark.parametrize("beta,scale", [(0.1, 1.0), (0.5, 1e-3)])  # scale 1e-3: means near 0, log1mexp's other branch
def test_orpo_equals_trls_odds_ratio_loss(beta, scale):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    global CHOSEN, REJECTED
    saved = CHOSEN, REJECTED
    CHOSEN, REJECTED = (CHOSEN * scale).astype(np.float32), (REJECTED * scale).astype(np.float32)
    try:
        chosen, rejected, mean_c, mean_r = _torch_means()
        t_losses, t_rc, t_rr, t_ratio, t_log_odds = ORPOTrainer.odds_ratio_loss(_trainer_stub(beta=beta), mean_c,
                                                                                mean_r)
        (-t_losses.mean()).backward()  # TRL's loss is nll - losses.mean(): the gradient of what is minimised
        loss, (gc, gr), (rc, rr, ratio, log_odds) = _ours_unpaired(lambda *a, **k: _negated(P.orpo_losses(*a, **k)),
                                                                   beta=beta)
    finally:
        CHOSEN, REJECTED = saved
    np.testing.assert_allclose(loss, -float(t_losses.mean()), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gc, chosen.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gr, rejected.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose([rc, rr], [t_rc.numpy(), t_rr.numpy()], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose([ratio.mean(), log_odds.mean()], [float(t_ratio), float(t_log_odds)], rtol=RTOL,
                               atol=ATOL)


KTO_LABELS = np.array([True, False, True, True, False])
KTO_KL_POLICY = np.array([-11.0, -4.0, -20.0, -7.5, -9.0], np.float32)
KTO_KL_REF = np.array([-12.0, -5.5, -19.0, -8.0, -9.25], np.float32)


@pytest.mark.parametrize("loss_type,kl_shift", [("kto", 0.0), ("kto", -3.0), ("apo_zero_unpaired", 0.0)])
def test_kto_equals_trls(loss_type, kl_shift):
    """kl_shift -3 makes the batch's KL estimate negative, so TRL's clamp at 0 is what is compared."""
    from trl.trainer.kto_trainer import KTOTrainer

    kl_policy = KTO_KL_POLICY + kl_shift
    policy_np = np.concatenate([CHOSEN, REJECTED])[:5]
    ref_np = np.concatenate([REF_CHOSEN, REF_REJECTED])[:5]
    policy = torch.tensor(policy_np, requires_grad=True)
    tokens = np.array([3, 7, 1, 12, 4], np.float32)
    per_token, completion_mask = _rows(policy, tokens)
    kl_per_token, kl_mask = _rows(torch.tensor(kl_policy), tokens[::-1].copy())
    kl_ids = torch.ones_like(kl_mask)
    batch = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
             "completion_mask": completion_mask, "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_mask),
             "KL_completion_mask": kl_mask, "label": torch.tensor(KTO_LABELS), "ref_logps": torch.tensor(ref_np),
             "ref_KL_logps": torch.tensor(KTO_KL_REF)}
    stub = _trainer_stub(loss_type=loss_type, beta=0.3, desirable_weight=1.33, undesirable_weight=0.7,
                         calculate_KL=True)
    stub._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, stub)

    def model(input_ids, **kwargs):
        return _outputs(kl_per_token if input_ids is kl_ids else per_token)

    t_loss = KTOTrainer._compute_loss(stub, model, batch, False)
    t_loss.backward()
    t_metrics = {k: v[0] for k, v in stub._metrics["train"].items()}

    kl = P.kto_kl(jnp.asarray(kl_policy), jnp.asarray(KTO_KL_REF))
    assert (float(kl) == 0.0) == (kl_shift < 0)

    def mean_loss(p):
        losses, rewards = P.kto_losses(p, ref_np, KTO_LABELS, kl, beta=0.3, desirable_weight=1.33,
                                       undesirable_weight=0.7, loss_type=loss_type)
        return jnp.mean(losses), rewards

    (loss, rewards), grad = jax.value_and_grad(mean_loss, has_aux=True)(jnp.asarray(policy_np))
    np.testing.assert_allclose(float(loss), float(t_loss), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(grad), policy.grad.numpy(), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(float(kl), t_metrics["kl"], rtol=RTOL, atol=ATOL)
    rewards = np.asarray(rewards)
    np.testing.assert_allclose(rewards[KTO_LABELS].mean(), t_metrics["rewards/chosen"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rewards[~KTO_LABELS].mean(), t_metrics["rewards/rejected"], rtol=RTOL, atol=ATOL)
    assert np.all(np.abs(np.asarray(grad)) > 1e-5)


# ------------------------------------------------------------------------------------------------ invariants


def test_dpo_with_the_policy_as_reference_is_exactly_ln2():
    losses, rc, rr = P.dpo_losses(CHOSEN, REJECTED, CHOSEN, REJECTED, N_CHOSEN, N_REJECTED, beta=0.1)
    assert np.all(np.asarray(losses) == np.float32(math.log(2)))
    assert np.all(np.asarray(rc) == 0) and np.all(np.asarray(rr) == 0)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "sigmoid_norm", "simpo", "orpo"])
def test_gradients_push_chosen_up_and_rejected_down(loss_type):
    def loss(c, r):
        if loss_type == "simpo":
            return P.simpo_losses(c, r, N_CHOSEN, N_REJECTED, beta=2.0)[0].sum()
        if loss_type == "orpo":
            return -P.orpo_losses(c, r, N_CHOSEN, N_REJECTED)[0].sum()  # ORPO subtracts its odds-ratio term
        return P.dpo_losses(c, r, REF_CHOSEN, REF_REJECTED, N_CHOSEN, N_REJECTED, beta=0.01, loss_type=loss_type,
                            label_smoothing=0.1 if loss_type == "robust" else 0.0)[0].sum()

    gc, gr = jax.grad(loss, argnums=(0, 1))(jnp.asarray(CHOSEN), jnp.asarray(REJECTED))
    assert np.all(np.asarray(gc) < 0) and np.all(np.asarray(gr) > 0)


def test_kto_pushes_desirable_up_and_undesirable_down():
    grad = jax.grad(lambda p: P.kto_losses(p, REF_CHOSEN, np.array([1, 0, 1, 0]), 0.5)[0].sum())(jnp.asarray(CHOSEN))
    assert np.all(np.asarray(grad)[[0, 2]] < 0) and np.all(np.asarray(grad)[[1, 3]] > 0)


def test_robust_without_label_smoothing_is_sigmoid_and_with_it_is_not():
    args = (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, N_CHOSEN, N_REJECTED)
    sigmoid = np.asarray(P.dpo_losses(*args, beta=0.1)[0])
    np.testing.assert_allclose(np.asarray(P.dpo_losses(*args, beta=0.1, loss_type="robust")[0]), sigmoid, rtol=1e-7)
    assert not np.allclose(np.asarray(P.dpo_losses(*args, beta=0.1, loss_type="robust", label_smoothing=0.2)[0]),
                           sigmoid)


def test_ipo_is_normalised_by_completion_length():
    """Doubling a response (logps and tokens) leaves IPO unchanged; sigmoid, summing, sees it."""
    def both(scale):
        args = (CHOSEN * scale, REJECTED, REF_CHOSEN * scale, REF_REJECTED, N_CHOSEN * scale, N_REJECTED)
        return (np.asarray(P.dpo_losses(*args, beta=0.1, loss_type="ipo")[0]),
                np.asarray(P.dpo_losses(*args, beta=0.1)[0]))

    (ipo1, sig1), (ipo2, sig2) = both(1), both(2)
    np.testing.assert_allclose(ipo1, ipo2, rtol=1e-6)
    assert not np.allclose(sig1, sig2)


def test_padding_entries_give_zero_loss_and_zero_finite_gradient():
    """Padding pairs carry zeros (ORPO's odds of a 0 mean log-prob are infinite) or garbage: they add nothing."""
    valid = np.array([True, True, False, False])
    chosen = np.where(valid, CHOSEN, 0.0).astype(np.float32)
    rejected = np.where(valid, REJECTED, np.inf).astype(np.float32)
    tokens = np.where(valid, N_CHOSEN, 0.0).astype(np.float32)
    fns = {
        "dpo": lambda c, r: P.dpo_losses(c, r, REF_CHOSEN, REF_REJECTED, tokens, tokens, beta=0.1, loss_type="ipo",
                                         valid_N=valid),
        "simpo": lambda c, r: P.simpo_losses(c, r, tokens, tokens, beta=2.0, valid_N=valid),
        "orpo": lambda c, r: P.orpo_losses(c, r, tokens, tokens, valid_N=valid),
        "kto": lambda c, r: P.kto_losses(c, r, valid, 0.1, valid_N=valid),
    }
    for name, fn in fns.items():
        outs = fn(chosen, rejected)
        gc, gr = jax.grad(lambda c, r: fn(c, r)[0].sum(), argnums=(0, 1))(chosen, rejected)
        for a in (*outs, gc, gr):
            a = np.asarray(a)
            assert np.all(np.isfinite(a)) and np.all(a[~valid] == 0), name
        assert np.all(np.asarray(outs[0])[valid] != 0), name


def test_kto_kl_is_a_clamped_mean_over_valid_entries_without_gradient():
    valid = np.array([True, True, True, False, False])
    policy = jnp.asarray(KTO_KL_POLICY)
    expected = float(np.mean((KTO_KL_POLICY - KTO_KL_REF)[valid]))
    assert expected > 0
    np.testing.assert_allclose(float(P.kto_kl(policy, KTO_KL_REF, valid)), expected, rtol=1e-6)
    assert float(P.kto_kl(policy - 10.0, KTO_KL_REF, valid)) == 0.0
    assert np.all(np.asarray(jax.grad(lambda p: P.kto_kl(p, KTO_KL_REF, valid))(policy)) == 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(loss_type="dpo"), "preference.loss_type=dpo is not a DPO loss"),
    (dict(loss_type="robust", label_smoothing=0.5), "must be in [0, 0.5) for loss_type=robust"),
    (dict(loss_type="exo_pair"), "EXO's epsilon"),
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "2 loss types"),
    (dict(loss_type="sigmoid", label_smoothing=1.0), "label_smoothing must be in [0, 1)"),
])
def test_bad_dpo_options_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=None) as info:
        P.check_dpo_options(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
