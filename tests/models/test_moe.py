"""Mixture of experts: routing, both dispatch modes against a per-token reference, aux sums, layer
groups, KV-cache decoding, and the same outputs on expert-parallel meshes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models, sharding
from jaxllm.config import ConfigError, MeshConfig, MoEConfig, load_config
from jaxllm.models.moe import capacity_dispatch, dropless_dispatch, route, router_stats
from tests.conftest import random_params, tiny_model_config

E, K, D, F = 4, 2, 8, 12


def moe_config(num_layers=4, **moe):
    return tiny_model_config(num_layers=num_layers, d_model=32, mlp_dim=48, moe=MoEConfig(**{"num_experts": E, **moe}))




def _kernels(seed=0):
    rng = np.random.default_rng(seed)
    return {name: jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)
            for name, shape in (("gate", (E, D, F)), ("up", (E, D, F)), ("down", (E, F, D)))}


def _routing(seed=0, B=3, L=10):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(B, L, E)) * 2, jnp.float32)
    valid = jnp.ones((B, L), bool).at[1, 7:].set(False)  # padding at the end of row 1
    weights, experts, probs = route(logits, K, "topk_softmax")
    return x, logits, weights, experts, probs, valid


def _reference(x, weights, experts, valid, kernels, keep=None):
    """Token by token: sum_k w_k * expert_k(x) over the kept choices (numpy, no dispatch tricks)."""
    x, weights, experts, valid = map(np.asarray, (x, weights, experts, valid))
    kn = {k: np.asarray(v) for k, v in kernels.items()}
    out = np.zeros_like(x)
    for b, l, k in np.ndindex(*experts.shape):
        if not valid[b, l] or (keep is not None and not keep[b, l, k]):
            continue
        e = experts[b, l, k]
        g, u = x[b, l] @ kn["gate"][e], x[b, l] @ kn["up"][e]
        out[b, l] += weights[b, l, k] * ((g / (1 + np.exp(-g))) * u) @ kn["down"][e]
    return out


def test_dropless_matches_a_per_token_reference():
    x, _, weights, experts, _, valid = _routing()
    kernels = _kernels()
    ours = dropless_dispatch(x, weights, experts, valid, kernels, "swiglu")
    np.testing.assert_allclose(ours, _reference(x, weights, experts, valid, kernels), atol=1e-5)


def test_sharded_dropless_gradients_equal_unsharded():
    """shard_map dropless on a (data 2, tensor 2, expert 2) mesh: gradients for tokens, kernels and
    router logits (token exchange and the F-sharded down projection are both differentiated)."""
    x, logits, _, _, _, valid = _routing(B=4, L=6)
    kernels = _kernels()
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=x.shape), jnp.float32)

    def loss(x, kernels, logits):
        weights, experts, _ = route(logits, K, "topk_softmax")
        return jnp.sum(dropless_dispatch(x, weights, experts, valid, kernels, "swiglu") * cotangent)

    reference = jax.grad(loss, argnums=(0, 1, 2))(x, kernels, logits)
    mesh = sharding.make_mesh(MeshConfig(2, 1, 2, 2))
    with sharding.activate(mesh, sharding.make_rules()):
        sharded = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, kernels, logits)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), sharded, reference)


def test_capacity_drops_the_latecomers_and_counts_them():
    x, _, weights, experts, _, valid = _routing()
    kernels = _kernels()
    capacity = 2
    ours, dropped = capacity_dispatch(x, weights, experts, valid, kernels, "swiglu", capacity)
    # Expected: per row, first choices in token order fill the slots, then second choices.
    keep = np.zeros(experts.shape, bool)
    for b in range(experts.shape[0]):
        used = np.zeros(E, int)
        for k in range(K):
            for l in range(experts.shape[1]):
                e = int(experts[b, l, k])
                if valid[b, l] and used[e] < capacity:
                    keep[b, l, k], used[e] = True, used[e] + 1
    assert int(dropped) == int(np.sum(np.asarray(valid)[..., None] & ~keep)) > 0
    np.testing.assert_allclose(ours, _reference(x, weights, experts, valid, kernels, keep), atol=1e-5)


@pytest.fixture(scope="module")
def grouped():
    """4 layers in 2 scanned groups (dense, mixture), a gated shared expert; params initialised once."""
    cfg = moe_config(every=2, shared_mlp_dim=16, shared_gate=True)
    return cfg, random_params(cfg, seed=2)


def _hidden(cfg, params, moe_cfg, tokens, segments):
    graphdef = models.model_spec(dataclasses.replace(cfg, moe=moe_cfg))[0]
    return jax.jit(lambda p: models.bind(graphdef, p).hidden(tokens, None, segments))(params)


def test_dispatch_modes_agree_when_capacity_suffices(grouped):
    cfg, params = grouped
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 1, cfg.vocab_size)
    segments = jnp.ones((3, 16), jnp.int32).at[2, 11:].set(0)
    dropless, _, aux = _hidden(cfg, params, cfg.moe, tokens, segments)
    roomy = dataclasses.replace(cfg.moe, dispatch="capacity", capacity_factor=E / K)
    capacity, _, aux_c = _hidden(cfg, params, roomy, tokens, segments)
    np.testing.assert_allclose(capacity, dropless, atol=1e-5)
    assert float(aux_c["dropped"]) == 0.0
    tight = dataclasses.replace(cfg.moe, dispatch="capacity", capacity_factor=0.5)
    _, _, aux_t = _hidden(cfg, params, tight, tokens, segments)
    assert float(aux_t["dropped"]) > 0
    for a in (aux, aux_t):  # 2 mixture layers x k routed copies of every real token
        assert float(jnp.sum(a["load"])) == 2 * K * (3 * 16 - 5)


def test_router_orders():
    logits = jnp.array([[[2.0, 1.0, 0.0, -1.0]]])
    w_renorm, idx, probs = route(logits, 2, "topk_softmax")
    w_plain, idx2, _ = route(logits, 2, "softmax_topk")
    assert idx.tolist() == idx2.tolist() == [[[0, 1]]]
    np.testing.assert_allclose(w_plain, probs[..., :2], rtol=1e-6)  # Qwen2-MoE: top-k of the full softmax
    np.testing.assert_allclose(w_renorm, w_plain / jnp.sum(w_plain), rtol=1e-6)  # Mixtral: renormalised


def test_balance_loss_is_one_when_balanced_and_larger_when_not():
    valid = jnp.ones((1, 4), bool)
    uniform = jnp.zeros((1, 4, E))
    experts = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    stats = router_stats(uniform, jax.nn.softmax(uniform), experts, valid)
    np.testing.assert_allclose(stats["balance"] / 4, 1.0, rtol=1e-6)  # per token: E * sum f p = 1
    np.testing.assert_allclose(stats["z"], 4 * np.log(E) ** 2, rtol=1e-6)
    skewed = jnp.array([[[5.0, 4.0, 0.0, 0.0]] * 4])
    stats = router_stats(skewed, jax.nn.softmax(skewed), jnp.array([[[0, 1]] * 4]), valid)
    assert float(stats["balance"]) / 4 > 1.5


def test_scanned_groups_equal_unscanned_layers(grouped):
    """Scanned groups (dense0, moe) laid out layer by layer give the same logits."""
    cfg, params = grouped
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    assert "experts" in params["layers"]["moe"]["mlp"] and "experts" not in params["layers"]["dense0"]["mlp"]
    per_layer = {}
    for g in range(2):
        per_layer[2 * g] = jax.tree.map(lambda a: a[g], params["layers"]["dense0"])
        per_layer[2 * g + 1] = jax.tree.map(lambda a: a[g], params["layers"]["moe"])
    looped_cfg = dataclasses.replace(cfg, scan_layers=False)
    scanned = jax.jit(lambda p: models.bind(models.model_spec(cfg)[0], p)(tokens)[0])(params)
    looped = jax.jit(lambda p: models.bind(models.model_spec(looped_cfg)[0], p)(tokens)[0])(
        dict(params, layers=per_layer))
    np.testing.assert_allclose(scanned, looped, atol=1e-5)


def test_cached_decoding_equals_the_full_forward(grouped):
    """The KV cache of grouped layers: one prefill then token by token equals the full forward."""
    cfg, params = grouped
    graphdef = models.model_spec(cfg)[0]
    model = jax.jit(lambda p, *args: models.bind(graphdef, p)(*args))
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 1, cfg.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    ones = jnp.ones((2, 9), jnp.int32)
    full, _ = model(params, tokens, positions, ones)
    cache = models.init_cache(cfg, 2, 9)
    prefix, cache = model(params, tokens[:, :6], positions[:, :6], ones[:, :6], cache)
    steps = [prefix]
    for t in range(6, 9):
        logits, cache = model(params, tokens[:, t:t + 1], positions[:, t:t + 1], ones[:, t:t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("dispatch, mesh_shape", [("capacity", (2, 1, 2, 2)), ("dropless", (1, 2, 1, 4))])
def test_expert_parallel_meshes_give_the_same_logits(grouped, dispatch, mesh_shape):
    """(data, fsdp, tensor, expert) meshes: experts split 2 and 4 ways; capacity large enough that
    both modes equal the unsharded dropless reference."""
    cfg, params = grouped
    tokens = jax.random.randint(jax.random.key(0), (8, 12), 0, cfg.vocab_size)
    segments = jnp.ones((8, 12), jnp.int32).at[1, 9:].set(0)
    reference = _hidden(cfg, params, cfg.moe, tokens, segments)[0]
    sharded_cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=dispatch, capacity_factor=E / K))
    mesh = sharding.make_mesh(MeshConfig(*mesh_shape))
    rules = sharding.make_rules()
    graphdef, abstract, logical = models.model_spec(sharded_cfg)
    shardings = sharding.tree_shardings(abstract, logical, mesh, rules)
    placed = jax.device_put(params, shardings)
    up = placed["layers"]["moe"]["mlp"]["experts"]["up"]  # [groups, E, D, F]: experts over the expert axis
    assert up.sharding.spec[1] == "expert"
    batch = sharding.batch_sharding(mesh, rules, 2)
    with sharding.activate(mesh, rules):
        hidden = jax.jit(lambda p, t, s: models.bind(graphdef, p).hidden(t, None, s)[0],
                         in_shardings=(shardings, batch, batch))(placed, tokens, segments)
    np.testing.assert_allclose(hidden, reference, atol=2e-5)


def test_moe_config_errors():
    with pytest.raises(ConfigError, match="does not divide into groups of model.moe.every=3"):
        load_config(None, ["model.num_layers=4", "model.moe.every=3"])
    with pytest.raises(ConfigError, match="experts_per_token=3 is more than num_experts=2"):
        load_config(None, ["model.moe.num_experts=2", "model.moe.experts_per_token=3"])
    with pytest.raises(ConfigError, match="implemented for decoders"):
        load_config(None, ["model.arch=encoder", "model.head=mlm", "model.moe.num_experts=4"])
