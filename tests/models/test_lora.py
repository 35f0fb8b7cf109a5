"""LoRA and quantisation policies on an unchanged model: where adapters go, that they start as a no-op,
merge/unmerge, rsLoRA scaling, dropout only while training, and QLoRA's dequantised matmul."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models
from jaxllm.config import ConfigError, LoraConfig, MoEConfig, QuantConfig
from jaxllm.models import lora, policies
from jaxllm.models.layers import dropout_key
from jaxllm.quant.weights import quantize_part_names
from tests.conftest import random_params, tiny_model_config

BASE = tiny_model_config()
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 101, (2, 10)))


def _logits(cfg, params):
    graphdef = models.model_spec(cfg)[0]
    return jax.jit(lambda p: models.bind(graphdef, p)(TOKENS)[0])(params)


def _with_random_b(params, seed=1):
    """Adapters as after some training: B no longer zero."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(0.1 * rng.normal(size=a.shape), a.dtype) if path[-1].key == "lora_b" else a, params)


@pytest.fixture(scope="module")
def base_params():
    return random_params(BASE, seed=0)


def test_adapters_go_where_targets_match_and_start_as_a_no_op(base_params):
    cfg = dataclasses.replace(BASE, lora=LoraConfig(rank=4, targets="attn/(q|v)$|mlp/down"))
    params = lora.adapt(base_params, cfg, seed=3)
    adapters, frozen = lora.split_trainable(params)
    assert sorted(adapters["layers"]["attn"]) == ["q", "v"] and list(adapters["layers"]["mlp"]) == ["down"]
    assert adapters["layers"]["attn"]["q"]["lora_a"].shape == (2, 64, 4)  # [layers, D, R]
    assert adapters["layers"]["attn"]["q"]["lora_b"].shape == (2, 4, 4, 16)  # [layers, R, N, H]
    jax.tree.map(np.testing.assert_array_equal, frozen, base_params)
    np.testing.assert_allclose(_logits(cfg, params), _logits(BASE, base_params), atol=1e-6)
    with pytest.raises(ConfigError, match="matches no projection; the projections are .*layers/attn/q"):
        models.model_spec(dataclasses.replace(BASE, lora=LoraConfig(targets="attention/query")))


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_the_adapter_path_and_unmerge_restores_the_base(base_params, rslora):
    cfg = dataclasses.replace(BASE, lora=LoraConfig(rank=4, alpha=8, rslora=rslora, targets="attn|mlp"))
    params = _with_random_b(lora.adapt(base_params, cfg))
    assert policies.lora_scale(cfg) == (8 / 2 if rslora else 8 / 4)
    merged = lora.merge(params, cfg)
    np.testing.assert_allclose(_logits(BASE, merged), _logits(cfg, params), atol=1e-5)
    assert float(jnp.max(jnp.abs(_logits(BASE, merged) - _logits(BASE, base_params)))) > 1e-2  # adapters matter
    adapters = lora.partition(params, lora.is_adapter)[0]
    restored = lora.unmerge(merged, adapters, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), restored, base_params)


def test_dropout_only_under_a_training_key(base_params):
    cfg = dataclasses.replace(BASE, lora=LoraConfig(rank=4, dropout=0.5, targets="attn/q"))
    params = _with_random_b(lora.adapt(base_params, cfg))
    graphdef = models.model_spec(cfg)[0]

    def forward(p, key):
        with dropout_key(key):
            return models.bind(graphdef, p)(TOKENS)[0]

    plain = _logits(cfg, params)
    no_key = jax.jit(lambda p: forward(p, None))(params)
    a, a2, b = (jax.jit(forward)(params, jax.random.key(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(no_key, plain)  # evaluation and generation: no dropout
    np.testing.assert_array_equal(a, a2)  # the same key: the same masks
    assert float(jnp.max(jnp.abs(a - plain))) > 1e-3 and float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_qlora_matmul_uses_the_dequantised_base(base_params):
    """The quantised model computes exactly what the float model computes with dequantised kernels;
    and NF4 stays close to the float base (relative logit error)."""
    for quant in (QuantConfig("nf4", block_size=16), QuantConfig("nf4", block_size=16, double_quant=True),
                  QuantConfig("int8")):
        cfg = dataclasses.replace(BASE, lora=LoraConfig(rank=2, targets="attn/o"), quant=quant)
        params = _with_random_b(lora.adapt(base_params, cfg))
        q = params["layers"]["attn"]["q"]["kernel"]
        assert sorted(q) == sorted(quantize_part_names(quant))
        np.testing.assert_allclose(_logits(cfg, params), _logits(BASE, lora.merge(params, cfg)), atol=2e-5)
    cfg = dataclasses.replace(BASE, lora=LoraConfig(rank=2), quant=QuantConfig("int8"))
    err = jnp.max(jnp.abs(_logits(cfg, lora.adapt(base_params, cfg)) - _logits(BASE, base_params)))
    assert float(err) < 0.05 * float(jnp.max(jnp.abs(_logits(BASE, base_params))))


def test_quantisation_covers_experts_but_not_routers():
    cfg = tiny_model_config(moe=MoEConfig(num_experts=4), lora=LoraConfig(rank=2), quant=QuantConfig(block_size=16))
    abstract = models.model_spec(cfg)[1]["layers"]["mlp"]
    assert abstract["experts"]["up"]["codes"].shape == (2, 4, 4, 8, 96)  # [layers, E, D/16, 16/2, F]
    assert abstract["router"]["kernel"].dtype == jnp.float32  # routers stay float
