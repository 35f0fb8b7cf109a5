"""Attention kernels against an einsum reference, and the cuDNN packed-segment layout.

The cuDNN kernel itself runs only on NVIDIA GPUs: tools/check_attention.py compares it with the
XLA kernel there (docs/performance.md has the numbers)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.models.attention import Masking, attention_mask, dot_product_attention, resolve_impl, segment_offsets


def reference(q, k, v, mask, bias, scale):
    """Plain einsum attention in float64-like precision: GQA by repeating kv heads."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("blnh,bsnh->bnls", q, k) * scale
    if bias is not None:
        logits = logits + bias
    logits = jnp.where(mask[:, None], logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = jnp.where(mask[:, None].any(-1, keepdims=True), probs, 0.0)  # rows with no key output 0
    return jnp.einsum("bnls,bsnh->blnh", probs, v)


def test_xla_kernel_matches_reference_with_packing_gqa_window_and_bias():
    B, L, N, K, H = 2, 12, 6, 2, 8
    kq, kk, kv, kb = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(x, (B, L, n, H)) for x, n in ((kq, N), (kk, K), (kv, K)))
    seg = jnp.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])
    pos = jnp.array([list(range(5)) * 2 + [0, 0], list(range(12))])
    idx = jnp.arange(L)
    mask = attention_mask(seg, pos, idx, seg, pos, idx, True, 4)
    bias = jax.random.normal(kb, (B, N, L, L))
    out = dot_product_attention(q, k, v, Masking(mask, seg, seg, True, 4, "xla"), bias, H**-0.5)
    ref = reference(q, k, v, mask, bias, H**-0.5)
    real = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)


def test_segment_offsets_describe_each_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    offsets, lengths = segment_offsets(seg, max_segments=4)
    np.testing.assert_array_equal(offsets, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1]])
    np.testing.assert_array_equal(lengths, [[3, 2, 1, -1], [8, -1, -1, -1]])
    # left padding (prefill of left-padded prompts, online RL's rows): the last segment ends at its last token
    offsets, lengths = segment_offsets(jnp.array([[0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 2, 2, 2, 2, 2]]), max_segments=2)
    np.testing.assert_array_equal(offsets, [[2, -1, -1], [1, 3, -1]])
    np.testing.assert_array_equal(lengths, [[3, -1], [2, 5]])


def test_the_kernel_is_decided_in_one_place_and_decoding_uses_xla():
    """resolve_impl alone picks the kernel (Stack.run carries it to the layers in Masking): a configured
    fused kernel stays for training and prefill, and cached decoding always runs XLA."""
    from jaxllm import models
    from tests.conftest import random_params, tiny_model_config

    assert resolve_impl("cudnn", jnp.bfloat16, False, decoding=True) == "xla"
    assert resolve_impl("cudnn", jnp.bfloat16, True, decoding=False) == "cudnn"
    assert resolve_impl("auto", jnp.bfloat16, True, decoding=False) == "xla"  # a position bias
    cfg = tiny_model_config(num_layers=1)
    params, tokens = random_params(cfg), jnp.array([[5, 7, 9]])
    logits = {}
    for impl in ("xla", "cudnn"):  # cuDNN needs an NVIDIA GPU; decoding with a cache never asks for it
        graphdef = models.model_spec(dataclasses.replace(cfg, attention_impl=impl))[0]
        logits[impl] = models.bind(graphdef, params)(tokens, cache=models.init_cache(cfg, 1, 4))[0]
    np.testing.assert_array_equal(logits["cudnn"], logits["xla"])


def test_splash_kernel_matches_xla_sharded_with_packing_gqa_and_window():
    """Pallas splash attention (the TPU kernel), run in the Pallas interpreter on CPU, inside
    shard_map on a (data 2, fsdp 2, tensor 2) mesh: the XLA kernel's output, forward and gradients."""
    from jaxllm import sharding
    from jaxllm.config import MeshConfig

    B, L, N, K, H = 4, 256, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(x, (B, L, n, H)) for x, n in ((kq, N), (kk, K), (kv, K)))
    seg = np.ones((B, L), np.int32)
    seg[:, 100:200], seg[:, 200:], seg[1, 240:] = 2, 3, 0
    pos = np.concatenate([np.arange(100), np.arange(100), np.arange(56)])[None].repeat(B, 0)
    seg, pos, idx = jnp.asarray(seg), jnp.asarray(pos), jnp.arange(L)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    for window in (None, 40):
        dense = attention_mask(seg, pos, idx, seg, pos, idx, True, window)

        def loss(q, k, v, masking):  # padding outputs are undefined: only real positions count
            out = dot_product_attention(q, k, v, masking, None, H**-0.5)
            return jnp.sum(out**2 * (seg > 0)[:, :, None, None])

        ref = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, Masking(dense, seg, seg, True, window, "xla"))
        with sharding.activate(mesh, sharding.make_rules()):
            got = jax.jit(jax.value_and_grad(
                lambda q, k, v: loss(q, k, v, Masking(None, seg, seg, True, window, "splash_interpret")),
                argnums=(0, 1, 2)))(q, k, v)
        real = np.asarray(seg) > 0
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4)
        for a, b in zip(got[1], ref[1]):
            np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-4, rtol=1e-4)


def test_splash_is_chosen_on_tpu_and_compiles_ahead_of_time():
    """On a TPU mesh (compile-only v5e devices from libtpu; no TPU needed) `attention_impl: auto` picks
    splash attention, and the model's forward and backward compile with its Pallas kernels."""
    import pytest

    pytest.importorskip("libtpu")
    from jaxllm import models, sharding
    from jaxllm.config import MeshConfig
    from jaxllm.plan import parse_topology
    from jaxllm.plan.chips import topology_devices
    from tests.conftest import tiny_model_config

    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=1, tensor=2), topology_devices(parse_topology("v5e-4")))
    rules = sharding.make_rules()
    cfg = tiny_model_config(dtype="bfloat16", max_seq_len=256)
    graphdef, abstract, logical = models.model_spec(cfg)
    shardings = sharding.tree_shardings(abstract, logical, mesh, rules)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    tokens = jax.ShapeDtypeStruct((4, 256), jnp.int32, sharding=sharding.batch_sharding(mesh, rules, 2))

    def loss(params, tokens):
        return jnp.sum(models.bind(graphdef, params)(tokens)[0])

    with sharding.activate(mesh, rules):
        compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    text = compiled.as_text()
    assert "splash" in text.lower() and "tpu_custom_call" in text
