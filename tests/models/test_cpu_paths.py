"""The CPU-specific forms of the model (docs/performance.md, "CPU"): the same math as the forms other
backends run, in layouts XLA's CPU backend computes without large transposes or a layer loop."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import models
from jaxllm.models import blocks, layers
from jaxllm.models.attention import Masking, attention_mask, dot_product_attention
from tests.conftest import tiny_model_config


def _loss_and_grads(cfg, tokens):
    model = models.create_model(cfg, seed=1)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    weights = jax.random.normal(jax.random.key(2), tokens.shape + (cfg.vocab_size,))

    def loss(p):
        return jnp.sum(models.bind(graphdef, p)(tokens)[0] * weights)

    return loss, params


def test_cpu_unrolls_the_scanned_stack_with_the_same_math_and_layout(monkeypatch):
    cfg = tiny_model_config(remat="full")
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
    loss, params = _loss_and_grads(cfg, tokens)
    assert params["layers"]["attn"]["q"]["kernel"].shape[0] == cfg.num_layers  # the stacked layout stays
    # A fresh jitted function for each form: the patched platform is read while tracing.
    unrolled_text = jax.jit(lambda p: loss(p)).lower(params).as_text()
    unrolled = jax.jit(jax.value_and_grad(lambda p: loss(p)))(params)
    monkeypatch.setattr(blocks, "active_platform", lambda: "gpu", raising=False)  # the rolled scan other backends run
    rolled_text = jax.jit(lambda p: loss(p)).lower(params).as_text()
    rolled = jax.jit(jax.value_and_grad(lambda p: loss(p)))(params)
    assert "while" in rolled_text and "while" not in unrolled_text
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), unrolled, rolled)


def test_cpu_tied_output_projection_has_the_einsum_gradient(monkeypatch):
    cfg = tiny_model_config(tie_embeddings=True)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
    loss, params = _loss_and_grads(cfg, tokens)
    cpu = jax.jit(jax.value_and_grad(lambda p: loss(p)))(params)
    monkeypatch.setattr(layers, "active_platform", lambda: "gpu")  # plain einsum and its autodiff
    plain = jax.jit(jax.value_and_grad(lambda p: loss(p)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), cpu, plain)


@pytest.mark.parametrize("bias_shape, dtype", [(None, jnp.float32), ((1, 6, 10, 10), jnp.float32),
                                               ((2, 1, 10, 10), jnp.bfloat16)])
def test_xla_attention_matches_jax_nn_values_and_gradients(bias_shape, dtype):
    """Our XLA kernel's heads-first layout against jax.nn.dot_product_attention's XLA path (GQA,
    packing with a padded tail, causal window, biases broadcast over batch or heads)."""
    B, L, N, K, H = 2, 10, 6, 2, 8
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(x, (B, L, n, H)).astype(dtype) for x, n in zip(keys, (N, K, K)))
    bias = None if bias_shape is None else jax.random.normal(keys[3], bias_shape)
    seg = jnp.array([[1] * 4 + [2] * 4 + [0] * 2, [1] * 10])
    pos = jnp.array([list(range(4)) * 2 + [0, 0], list(range(10))])
    mask = attention_mask(seg, pos, jnp.arange(L), seg, pos, jnp.arange(L), True, 3)
    g = jax.random.normal(keys[4], (B, L, N, H))

    def ours(q, k, v, bias):
        out = dot_product_attention(q, k, v, Masking(mask, seg, seg, True, 3, "xla"), bias, H**-0.5)
        return jnp.sum(out.astype(jnp.float32) * g)

    def reference(q, k, v, bias):
        b = None if bias is None else bias.astype(q.dtype)
        out = jax.nn.dot_product_attention(q, k, v, bias=b, mask=mask[:, None], scale=H**-0.5, implementation="xla")
        return jnp.sum(out.astype(jnp.float32) * g)

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    got = jax.value_and_grad(ours, argnums)(q, k, v, bias)
    want = jax.value_and_grad(reference, argnums)(q, k, v, bias)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                                         rtol=tol, atol=tol * 10), got, want)
