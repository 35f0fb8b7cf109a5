"""Mixture-of-experts MLP (docs/moe.md): a top-k router, E expert MLPs stacked on a leading expert
axis, an optional shared expert, and two ways to bring tokens to their experts.

- capacity: each expert takes at most C tokens of a sequence (C = capacity_factor * L * K / E); tokens
  over capacity skip the experts (counted as dropped). One-hot dispatch/combine einsums; the expert-major
  tensor [E, B, C, D] is pinned to the `expert` logical axis, so the compiler does the all-to-all.
- dropless: every routed copy of a token is sorted by expert and multiplied with `jax.lax.ragged_dot`
  (a grouped matmul). Under a mesh it runs in `shard_map`: each device sorts its own tokens; with an
  expert axis, tokens are gathered over it, each device applies its local experts, and a reduce-scatter
  brings the results back.

The layer also returns sums for the step's losses and logs (`aux`): the load-balancing term, router
z-loss, tokens routed per expert and dropped copies; `moe_objective` turns them into the loss terms.

Shape suffixes: B batch, L length, D model, F expert hidden, E experts (X local experts of a device),
K experts per token, C capacity, M routed copies in expert order.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import sharding
from jaxllm.config import ConfigError, ModelConfig, MoEConfig
from jaxllm.models.layers import DTYPES, GATED, MLP, Dense, make_param, mlp_hidden
from jaxllm.quant import kernel_array
from jaxllm.sharding import constrain


def num_moe_layers(cfg: ModelConfig) -> int:
    return cfg.num_layers // cfg.moe.every if cfg.moe is not None else 0


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """Layer `layer` (0-based) is a mixture when (layer + 1) % every == 0 (Qwen2-MoE's rule)."""
    return cfg.moe is not None and (layer + 1) % cfg.moe.every == 0


def route(logits_BLE: jax.Array, k: int, order: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(weights_BLK, experts_BLK, probs_BLE) of float32 router logits."""
    probs_BLE = jax.nn.softmax(logits_BLE, axis=-1)
    if order == "softmax_topk":
        weights_BLK, experts_BLK = jax.lax.top_k(probs_BLE, k)
    else:  # softmax over the chosen logits: the top-k probabilities renormalised to sum 1
        top_BLK, experts_BLK = jax.lax.top_k(logits_BLE, k)
        weights_BLK = jax.nn.softmax(top_BLK, axis=-1)
    return weights_BLK, experts_BLK, probs_BLE


def router_stats(logits_BLE, probs_BLE, experts_BLK, valid_BL) -> dict[str, jax.Array]:
    """Sums over real tokens (segment > 0), so micro-batches add up exactly:

    balance: sum over rows of (tokens in row) * E * sum_e f_e p_e (Switch Transformer's loss, per
    sequence), f_e the row's share of routed copies sent to e, p_e its mean router probability;
    z: sum of logsumexp(logits)^2; load_E: routed copies per expert."""
    E, K = logits_BLE.shape[-1], experts_BLK.shape[-1]
    valid = valid_BL.astype(jnp.float32)
    chosen_BLE = jnp.sum(jax.nn.one_hot(experts_BLK, E, dtype=jnp.float32), axis=2) * valid[..., None]
    n_B = jnp.sum(valid, axis=1)
    f_BE = jnp.sum(chosen_BLE, axis=1) / jnp.maximum(K * n_B, 1.0)[:, None]
    p_BE = jnp.sum(probs_BLE * valid[..., None], axis=1) / jnp.maximum(n_B, 1.0)[:, None]
    log_z_BL = jax.nn.logsumexp(logits_BLE, axis=-1)
    return {
        "balance": jnp.sum(n_B * E * jnp.sum(f_BE * p_BE, axis=-1)),
        "z": jnp.sum(jnp.square(log_z_BL) * valid),
        "load": jnp.sum(chosen_BLE, axis=(0, 1)),
    }


class Experts(nnx.Module):
    """E MLPs with stacked kernels: gate/up [E, D, F], down [E, F, D] (gate only for gated MLPs)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        m = cfg.moe
        e, d, f = m.num_experts, cfg.d_model, m.expert_mlp_dim or cfg.mlp_dim
        self.kind, self.dtype = cfg.mlp, DTYPES[cfg.dtype]
        init, pdtype = nnx.initializers.normal(cfg.init_std), DTYPES[cfg.param_dtype]
        self.gate = make_param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), pdtype) if cfg.mlp in GATED else None
        self.up = make_param(rngs, init, (e, d, f), ("expert", "embed", "mlp"), pdtype)
        self.down = make_param(rngs, init, (e, f, d), ("expert", "mlp", "embed"), pdtype)

    def kernels(self) -> dict[str, jax.Array]:
        """The kernels in the compute dtype (dequantised when the quantisation policy stored them)."""
        return {name: kernel_array(getattr(self, name), self.dtype)
                for name in ("gate", "up", "down") if getattr(self, name) is not None}


def capacity_dispatch(x_BLD, weights_BLK, experts_BLK, valid_BL, kernels, kind: str, capacity: int):
    """Experts' output [B, L, D] and the number of dropped copies. Per sequence, expert slots are filled
    by every token's first choice before any second choice (Switch/GShard priority), in token order."""
    B, L, K = experts_BLK.shape
    E = kernels["up"].shape[0]
    onehot_BLKE = jax.nn.one_hot(experts_BLK, E, dtype=jnp.int32) * valid_BL[:, :, None, None].astype(jnp.int32)
    by_rank_BME = onehot_BLKE.transpose(0, 2, 1, 3).reshape(B, K * L, E)
    slot_BME = jnp.cumsum(by_rank_BME, axis=1) - 1
    slot_BLK = jnp.sum(slot_BME * by_rank_BME, axis=-1).reshape(B, K, L).transpose(0, 2, 1)
    keep_BLK = valid_BL[..., None] & (slot_BLK < capacity)  # a valid token's copy has exactly one expert
    dropped = jnp.sum(valid_BL[..., None] & ~keep_BLK)
    expert_BLKE = (onehot_BLKE * keep_BLK[..., None]).astype(x_BLD.dtype)
    slot_BLKC = jax.nn.one_hot(slot_BLK, capacity, dtype=x_BLD.dtype)
    dispatch_BLEC = jnp.einsum("blke,blkc->blec", expert_BLKE, slot_BLKC)
    combine_BLEC = jnp.einsum("blke,blkc->blec", expert_BLKE * weights_BLK[..., None].astype(x_BLD.dtype), slot_BLKC)
    # Gathered into expert slots where the tokens live, then made expert-major: with experts sharded,
    # that second constraint is an all-to-all over the expert axis (and its mirror image below).
    x_BECD = constrain(jnp.einsum("blec,bld->becd", dispatch_BLEC, x_BLD), ("batch", None, None, "act_embed"))
    x_EBCD = constrain(x_BECD.transpose(1, 0, 2, 3), ("expert", "batch", None, "act_embed"))
    up_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, kernels["up"])
    gate_EBCF = jnp.einsum("ebcd,edf->ebcf", x_EBCD, kernels["gate"]) if "gate" in kernels else None
    h_EBCF = constrain(mlp_hidden(kind, gate_EBCF, up_EBCF), ("expert", "batch", None, "act_mlp"))
    y_EBCD = constrain(jnp.einsum("ebcf,efd->ebcd", h_EBCF, kernels["down"]), ("expert", "batch", None, "act_embed"))
    y_BECD = constrain(y_EBCD.transpose(1, 0, 2, 3), ("batch", None, None, "act_embed"))
    return jnp.einsum("blec,becd->bld", combine_BLEC, y_BECD), dropped


def _grouped_experts(x_TD, weights_TK, local_TK, routed_TK, kernels, kind: str):
    """sum_k weight * expert_k(x) [T, D] for the routed copies (local_TK: expert index among the X
    experts of `kernels`); copies that are not routed here sort last, into no group."""
    T, K = local_TK.shape
    X = kernels["up"].shape[0]
    flat_M = jnp.where(routed_TK, local_TK, X).reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)
    sizes_X = jnp.bincount(flat_M, length=X).astype(jnp.int32)
    xs_MD = jnp.take(x_TD, order_M // K, axis=0)
    up_MF = jax.lax.ragged_dot(xs_MD, kernels["up"], sizes_X)
    gate_MF = jax.lax.ragged_dot(xs_MD, kernels["gate"], sizes_X) if "gate" in kernels else None
    ys_MD = jax.lax.ragged_dot(mlp_hidden(kind, gate_MF, up_MF), kernels["down"], sizes_X)
    y_TKD = jnp.zeros_like(ys_MD).at[order_M].set(ys_MD).reshape(T, K, -1)
    weights_TK = jnp.where(routed_TK, weights_TK, 0.0).astype(y_TKD.dtype)
    return jnp.einsum("tkd,tk->td", y_TKD, weights_TK)


def dropless_dispatch(x_BLD, weights_BLK, experts_BLK, valid_BL, kernels, kind: str):
    """Experts' output [B, L, D] with no token dropped (see the module docstring for the sharded form)."""
    B, L, D = x_BLD.shape
    K = experts_BLK.shape[-1]
    active = sharding.active()
    if active is None:
        y_TD = _grouped_experts(x_BLD.reshape(B * L, D), weights_BLK.reshape(-1, K), experts_BLK.reshape(-1, K),
                                jnp.broadcast_to(valid_BL[..., None], experts_BLK.shape).reshape(-1, K), kernels, kind)
        return y_TD.reshape(B, L, D)
    mesh, rules = active
    return _sharded_dropless(mesh, rules, kind, x_BLD, weights_BLK, experts_BLK, valid_BL, kernels)


def _axes(spec_entry) -> tuple[str, ...]:
    return () if spec_entry is None else (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _sharded_dropless(mesh, rules, kind, x_BLD, weights_BLK, experts_BLK, valid_BL, kernels):
    E, D, F = kernels["up"].shape
    expert_axes, _, mlp_axes = map(_axes, sharding.logical_to_spec(("expert", "embed", "mlp"), (E, D, F), mesh, rules))
    batch_axes = _axes(sharding.logical_to_spec(("batch",), (x_BLD.shape[0],), mesh, rules)[0])
    if set(mlp_axes) & set(batch_axes):
        raise ConfigError(
            f"mesh axes {sorted(set(mlp_axes) & set(batch_axes))} split both the batch and the experts' hidden "
            "dimension; dropless MoE needs them apart: change mesh.rules for 'batch' or 'mlp'")
    # Tokens are gathered over the expert axes (each device sees every token of its data shard) ...
    outer = tuple(a for a in batch_axes if a not in expert_axes)
    scattered = tuple(a for a in batch_axes if a in expert_axes)
    tokens = jax.sharding.PartitionSpec(outer + scattered or None)
    # ... and each expert kernel whole in D (gathered like FSDP), split over experts and F.
    P = jax.sharding.PartitionSpec
    kernel_specs = {k: P(expert_axes or None, None, mlp_axes or None) if k != "down" else P(expert_axes or None, mlp_axes or None, None)
                    for k in kernels}
    X = E // math.prod(mesh.shape[a] for a in expert_axes)

    def local(x_BLD, weights_BLK, experts_BLK, valid_BL, kernels):
        if scattered:  # explicitly, so that the backward pass reduce-scatters the tokens' gradients
            x_BLD, weights_BLK, experts_BLK, valid_BL = (
                jax.lax.all_gather(a, scattered, axis=0, tiled=True) for a in (x_BLD, weights_BLK, experts_BLK, valid_BL))
        b, L, D = x_BLD.shape
        K = experts_BLK.shape[-1]
        first = jax.lax.axis_index(expert_axes) * X if expert_axes else 0
        local_BLK = experts_BLK - first
        routed_BLK = valid_BL[..., None] & (local_BLK >= 0) & (local_BLK < X)
        y_TD = _grouped_experts(x_BLD.reshape(b * L, D), weights_BLK.reshape(-1, K), local_BLK.reshape(-1, K),
                                routed_BLK.reshape(-1, K), kernels, kind)
        y_BLD = y_TD.reshape(b, L, D)
        if mlp_axes:  # the down projection summed over the hidden dimension's shards
            y_BLD = jax.lax.psum(y_BLD, mlp_axes)
        if scattered:  # every expert shard added its experts' part; each device keeps its own tokens
            y_BLD = jax.lax.psum_scatter(y_BLD, scattered, scatter_dimension=0, tiled=True)
        elif expert_axes:
            y_BLD = jax.lax.psum(y_BLD, expert_axes)
        return y_BLD

    return jax.shard_map(
        local, mesh=mesh, in_specs=(tokens, tokens, tokens, tokens, kernel_specs), out_specs=tokens,
    )(x_BLD, weights_BLK, experts_BLK, valid_BL, kernels)


class MoE(nnx.Module):
    """Router + experts (+ shared expert). __call__(x_BLD, valid_BL) -> (y_BLD, aux sums)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        m: MoEConfig = cfg.moe
        self.moe, self.kind = m, cfg.mlp
        # The router runs in float32: its softmax and top-k decide where every token goes.
        f32 = dataclasses.replace(cfg, dtype="float32")
        self.router = Dense((cfg.d_model,), (m.num_experts,), ("embed", None), f32, rngs)
        self.experts = Experts(cfg, rngs)
        self.shared = MLP(dataclasses.replace(cfg, mlp_dim=m.shared_mlp_dim), rngs) if m.shared_mlp_dim else None
        self.shared_gate = Dense((cfg.d_model,), (1,), ("embed", None), cfg, rngs) if m.shared_gate else None

    def __call__(self, x_BLD: jax.Array, valid_BL: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        m = self.moe
        B, L, _ = x_BLD.shape
        logits_BLE = self.router(x_BLD)
        weights_BLK, experts_BLK, probs_BLE = route(logits_BLE, m.experts_per_token, m.router)
        aux = router_stats(logits_BLE, probs_BLE, experts_BLK, valid_BL)
        kernels = self.experts.kernels()
        if m.dispatch == "capacity":
            capacity = min(L, math.ceil(m.capacity_factor * L * m.experts_per_token / m.num_experts))
            y_BLD, dropped = capacity_dispatch(x_BLD, weights_BLK, experts_BLK, valid_BL, kernels, self.kind, capacity)
        else:
            y_BLD, dropped = dropless_dispatch(x_BLD, weights_BLK, experts_BLK, valid_BL, kernels, self.kind), 0
        aux["dropped"] = jnp.asarray(dropped, jnp.float32)
        if self.shared is not None:
            shared_BLD = self.shared(x_BLD)
            if self.shared_gate is not None:
                shared_BLD = jax.nn.sigmoid(self.shared_gate(x_BLD)) * shared_BLD
            y_BLD = y_BLD + shared_BLD
        return constrain(y_BLD.astype(x_BLD.dtype), ("batch", "length", "act_embed")), aux


def moe_objective(aux: dict[str, jax.Array], norms: dict[str, jax.Array], cfg: ModelConfig):
    """(loss term, metrics) from a decoder's summed MoE aux; both divided by the whole batch's real
    token count (`norms["positions"]`) and averaged over the MoE layers, so micro-batches add up."""
    if cfg.moe is None or not aux:
        return 0.0, {}
    m = cfg.moe
    n = norms["positions"] * num_moe_layers(cfg)
    copies = n * m.experts_per_token
    balance, z = aux["balance"] / n, aux["z"] / n
    load_E = aux["load"] / copies
    # Sums only (no max): metrics of micro-batches are added up.
    metrics = {"moe_aux_loss": balance, "moe_z_loss": z, "moe_dropped_fraction": aux["dropped"] / copies}
    metrics.update({f"moe_load/e{j}": load_E[j] for j in range(m.num_experts)})
    return m.aux_loss_weight * balance + m.z_loss_weight * z, metrics


def add_aux(a: dict[str, jax.Array], b: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums two layers' aux dicts (a dense layer's is empty)."""
    return {k: a[k] + b[k] if k in a and k in b else a.get(k, b.get(k)) for k in {*a, *b}}
