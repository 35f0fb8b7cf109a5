"""The losses of direct preference methods (DPO and its variants, KTO, ORPO, SimPO), on per-pair or
per-example sums of response log-probabilities; no model here (jaxllm.train.preference gets the sums from
a batch and calls these).

Every function follows TRL 1.16 (file and function named in its docstring), with TRL's option names and
defaults, so a TRL config reads the same here and the values and gradients match TRL's to float32 rounding
(tests/train/test_preference_losses.py). Arrays are float32 [N] (N pairs or examples); `valid_N` (optional,
bool) marks real entries: padding entries give loss, rewards and gradients 0, whatever their inputs.
Rewards (TRL's `rewards/chosen`, `rewards/rejected`) carry no gradient, as TRL detaches them.

Log-probabilities are SUMS over a response's tokens (`*_logps`) with the response's token count
(`*_tokens`); the length-normalised methods (IPO, sigmoid_norm, ORPO, SimPO) divide inside.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from jaxllm.config import ConfigError

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
                  "apo_zero", "apo_down", "discopop", "sigmoid_norm")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def check_dpo_options(loss_type: Union[str, Sequence[str]], loss_weights: Optional[Sequence[float]] = None,
                      label_smoothing: float = 0.0,
                      prefix: str = "preference") -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validates DPO options (as TRL's DPOConfig/DPOTrainer do) and returns (loss_types, loss_weights).

    Raises ConfigError naming `prefix`.loss_type / loss_weights / label_smoothing and the fix.
    """
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ConfigError(f"{prefix}.loss_type is empty; give one of {', '.join(DPO_LOSS_TYPES)} (or a list of them)")
    for name in types:
        if name not in DPO_LOSS_TYPES:
            raise ConfigError(f"{prefix}.loss_type={name} is not a DPO loss; use one of {', '.join(DPO_LOSS_TYPES)}")
    weights = tuple(float(w) for w in loss_weights) if loss_weights is not None else (1.0,) * len(types)
    if len(weights) != len(types):
        raise ConfigError(f"{prefix}.loss_weights has {len(weights)} weights for {len(types)} loss types "
                          f"({', '.join(types)}); give one weight per loss type")
    if "robust" in types and not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"{prefix}.label_smoothing (the probability a preference label is flipped) must be in "
                          f"[0, 0.5) for loss_type=robust, got {label_smoothing}")
    if "exo_pair" in types and not 0.0 < label_smoothing < 1.0:
        raise ConfigError(f"{prefix}.label_smoothing (EXO's epsilon) must be in (0, 1) for loss_type=exo_pair, "
                          f"got {label_smoothing}; the EXO paper uses 1e-3")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"{prefix}.label_smoothing must be in [0, 1), got {label_smoothing}")
    return types, weights


def _masked(valid_N, *arrays_N, fill=0.0):
    """float32 copies of `arrays_N` with `fill` where `valid_N` is False (a safe input: no inf, no NaN gradient)."""
    out = tuple(jnp.asarray(a, jnp.float32) for a in arrays_N)
    if valid_N is None:
        return out
    return tuple(jnp.where(valid_N, a, fill) for a in out)


def _zero_invalid(valid_N, *arrays_N):
    return arrays_N if valid_N is None else tuple(jnp.where(valid_N, a, 0.0) for a in arrays_N)


def _per_token(logps_N, tokens_N):
    return logps_N / jnp.maximum(tokens_N, 1.0)  # TRL: completion_mask.sum(dim=1).clamp(min=1.0)


def dpo_losses(chosen_logps_N, rejected_logps_N, ref_chosen_logps_N, ref_rejected_logps_N, chosen_tokens_N,
               rejected_tokens_N, *, beta: float, loss_type: Union[str, Sequence[str]] = "sigmoid",
               loss_weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0,
               discopop_tau: float = 0.05, valid_N=None):
    """DPO and its variants (TRL 1.16 trainer/dpo_trainer.py, `DPOTrainer._compute_loss`, reverse-KL DPO).

    With log-ratios c = chosen_logps - ref_chosen_logps, r = rejected_logps - ref_rejected_logps, d = c - r:
        sigmoid      -log σ(βd)                       (DPO; with label_smoothing ε > 0 the conservative cDPO
                     -(1-ε) log σ(βd) - ε log σ(-βd)   of TRL < 1.0: TRL 1.16's sigmoid ignores ε)
        hinge        max(0, 1 - βd)                    (SLiC)
        ipo          (c/n_c - r/n_r - 1/(2β))²         (IPO normalised by completion tokens n, as TRL 1.16)
        robust       (-(1-ε) log σ(βd) + ε log σ(-βd)) / (1 - 2ε)       (rDPO, ε in [0, 0.5))
        exo_pair     σ(βd)(log σ(βd) - log(1-ε)) + σ(-βd)(log σ(-βd) - log ε)
        nca_pair     -log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)
        bco_pair     -log σ(βc) - log σ(-βr)
        sppo_hard    (c - 1/(2β))² + (r + 1/(2β))²
        apo_zero     1 - σ(βc) + σ(βr);   apo_down: σ(βc) + 1 - σ(βd)
        discopop     m = σ(βd/τ):  (1-m)(-log σ(βd)) + m exp(-βd)
        sigmoid_norm -log σ(β(c/n_c - r/n_r))
    A list of loss types is summed with `loss_weights` (default 1 each), as TRL's `loss_type=[...]`; the
    training loss is the mean over pairs. Rewards: β c and β r (no gradient).
    Returns (losses_N, chosen_rewards_N, rejected_rewards_N).
    """
    types, weights = check_dpo_options(loss_type, loss_weights, label_smoothing)
    pc, pr, rc, rr = _masked(valid_N, chosen_logps_N, rejected_logps_N, ref_chosen_logps_N, ref_rejected_logps_N)
    nc, nr = _masked(valid_N, chosen_tokens_N, rejected_tokens_N, fill=1.0)
    c, r = pc - rc, pr - rr
    d = c - r
    eps = label_smoothing
    logsig = jax.nn.log_sigmoid
    losses = jnp.zeros_like(d)
    for name, weight in zip(types, weights):
        if name == "sigmoid":
            loss = -logsig(beta * d) if eps == 0.0 else -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
        elif name == "hinge":
            loss = jax.nn.relu(1 - beta * d)
        elif name == "ipo":
            loss = (_per_token(c, nc) - _per_token(r, nr) - 1 / (2 * beta)) ** 2
        elif name == "robust":
            loss = (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
        elif name == "exo_pair":
            log_qw, log_ql = logsig(beta * d), logsig(-beta * d)
            loss = jnp.exp(log_qw) * (log_qw - jnp.log1p(-eps)) + jnp.exp(log_ql) * (log_ql - jnp.log(eps))
        elif name == "nca_pair":
            loss = -logsig(beta * c) - 0.5 * logsig(-beta * c) - 0.5 * logsig(-beta * r)
        elif name == "bco_pair":
            loss = -logsig(beta * c) - logsig(-beta * r)
        elif name == "sppo_hard":
            loss = (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
        elif name == "apo_zero":
            loss = 1 - jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(beta * r)
        elif name == "apo_down":
            loss = jax.nn.sigmoid(beta * c) + 1 - jax.nn.sigmoid(beta * d)
        elif name == "discopop":
            mix = jax.nn.sigmoid(beta * d / discopop_tau)
            loss = -logsig(beta * d) * (1 - mix) + jnp.exp(-beta * d) * mix
        else:  # sigmoid_norm (check_dpo_options admits nothing else)
            loss = -logsig(beta * (_per_token(c, nc) - _per_token(r, nr)))
        losses = losses + weight * loss
    rewards_c, rewards_r = jax.lax.stop_gradient(beta * c), jax.lax.stop_gradient(beta * r)
    return _zero_invalid(valid_N, losses, rewards_c, rewards_r)


def simpo_losses(chosen_logps_N, rejected_logps_N, chosen_tokens_N, rejected_tokens_N, *, beta: float = 0.1,
                 simpo_gamma: float = 0.5, label_smoothing: float = 0.0, alpha: float = 0.0, valid_N=None):
    """SimPO (TRL 1.16 experimental/cpo/cpo_trainer.py, `CPOTrainer.cpo_loss` with loss_type="simpo";
    TRL's SimPO is CPOConfig(loss_type="simpo", cpo_alpha=0.0)). No reference model.

    With per-token means a_c = chosen_logps / n_c, a_r = rejected_logps / n_r (TRL's average_log_prob) and
    h = a_c - a_r - γ/β (γ = simpo_gamma, the target reward margin):
        loss = -(1-ε) log σ(βh) - ε log σ(-βh)          (ε = label_smoothing)
    AlphaPO (alpha ≠ 0) replaces each a by (1 - p^-α)/α with p = exp(a). Rewards: β a_c, β a_r (no gradient).
    Defaults are CPOConfig's (beta 0.1, simpo_gamma 0.5); the SimPO paper uses beta 2.0 to 2.5.
    Returns (losses_N, chosen_rewards_N, rejected_rewards_N).
    """
    pc, pr = _masked(valid_N, chosen_logps_N, rejected_logps_N)
    nc, nr = _masked(valid_N, chosen_tokens_N, rejected_tokens_N, fill=1.0)
    a_c, a_r = pc / nc, pr / nr
    if alpha != 0.0:
        a_c, a_r = (1 - jnp.exp(-alpha * a_c)) / alpha, (1 - jnp.exp(-alpha * a_r)) / alpha
    h = a_c - a_r - simpo_gamma / beta
    losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(-beta * h)
    rewards_c, rewards_r = jax.lax.stop_gradient(beta * a_c), jax.lax.stop_gradient(beta * a_r)
    return _zero_invalid(valid_N, losses, rewards_c, rewards_r)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable (TRL's `log1mexp`, branching at -ln 2); both branches see safe inputs
    so neither puts a NaN into the gradient."""
    t = -0.6931471805599453
    small = x < t
    x_small = jnp.where(small, x, t - 1.0)
    x_large = jnp.where(small, t, x)
    return jnp.where(small, jnp.log1p(-jnp.exp(x_small)), jnp.log(-jnp.expm1(x_large)))


def orpo_losses(chosen_logps_N, rejected_logps_N, chosen_tokens_N, rejected_tokens_N, *, beta: float = 0.1,
                valid_N=None):
    """ORPO's odds-ratio term (TRL 1.16 experimental/orpo/orpo_trainer.py, `ORPOTrainer.odds_ratio_loss`, with
    its sign). No reference model.

    With per-token means a_c, a_r (as SimPO; TRL's average_log_prob=True), odds(a) = e^a / (1 - e^a):
        log_odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r))
        losses   = β log σ(log_odds)                  (<= 0; TRL's name and sign)
    ORPO's objective SUBTRACTS their mean: nll_loss - mean(losses), nll_loss the chosen sequences' mean token
    cross-entropy (TRL 1.16 takes it over the prompt's and the response's tokens, `concatenated_forward`).
    TRL's metrics `log_odds_ratio` and `log_odds_chosen` are the means of log σ(log_odds) and log_odds.
    Rewards: β a_c, β a_r (no gradient). A mean of exactly 0 (every token certain) has infinite odds, in TRL too.
    Returns (losses_N, chosen_rewards_N, rejected_rewards_N, log_odds_ratio_N, log_odds_chosen_N).
    """
    pc, pr = _masked(valid_N, chosen_logps_N, rejected_logps_N, fill=-1.0)
    nc, nr = _masked(valid_N, chosen_tokens_N, rejected_tokens_N, fill=1.0)
    a_c, a_r = pc / nc, pr / nr
    log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    rewards_c, rewards_r = jax.lax.stop_gradient(beta * a_c), jax.lax.stop_gradient(beta * a_r)
    return _zero_invalid(valid_N, beta * ratio, rewards_c, rewards_r, ratio, log_odds)


def kto_kl(policy_kl_logps_N, ref_kl_logps_N, valid_N=None):
    """KTO's batch KL estimate z0 (TRL 1.16 trainer/kto_trainer.py, `KTOTrainer._compute_loss`):
    the mean over the batch's mismatched (prompt, other completion) sequences of policy minus reference
    log-prob, clamped at >= 0, without gradient: `(KL_logps - ref_KL_logps).mean().detach().clamp(min=0)`.
    Returns a float32 scalar (0 when no entry is valid)."""
    p, r = _masked(valid_N, policy_kl_logps_N, ref_kl_logps_N)
    diff = p - r
    if valid_N is None:
        mean = jnp.mean(diff)
    else:
        mean = jnp.sum(diff) / jnp.maximum(jnp.sum(valid_N.astype(jnp.float32)), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_losses(policy_logps_N, ref_logps_N, desirable_N, kl, *, beta: float = 0.1, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0, loss_type: str = "kto", valid_N=None):
    """KTO (TRL 1.16 trainer/kto_trainer.py, `KTOTrainer._compute_loss`), on unpaired examples.

    With log-ratio x = policy_logps - ref_logps and the batch KL estimate z0 = `kl` (see `kto_kl`):
        kto:               desirable  w_d (1 - σ(β(x - z0)));   undesirable  w_u (1 - σ(β(z0 - x)))
        apo_zero_unpaired: desirable  w_d (1 - σ(βx));          undesirable  w_u σ(βx)
    (w_d = desirable_weight, w_u = undesirable_weight). TRL's loss is the mean over all examples of the
    weighted losses (`losses.nanmean()`, the weights are not normalised). Rewards: βx (no gradient); TRL's
    `rewards/chosen` averages them over the desirable examples, `rewards/rejected` over the undesirable.
    Returns (losses_N, rewards_N).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ConfigError(f"preference.loss_type={loss_type} is not a KTO loss; use one of {', '.join(KTO_LOSS_TYPES)}")
    p, r = _masked(valid_N, policy_logps_N, ref_logps_N)
    desirable = jnp.asarray(desirable_N) > 0
    x = p - r
    if loss_type == "kto":
        good, bad = 1 - jax.nn.sigmoid(beta * (x - kl)), 1 - jax.nn.sigmoid(beta * (kl - x))
    else:
        good, bad = 1 - jax.nn.sigmoid(beta * x), jax.nn.sigmoid(beta * x)
    losses = jnp.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return _zero_invalid(valid_N, losses, jax.lax.stop_gradient(beta * x))
