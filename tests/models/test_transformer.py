import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import models
from jaxllm.config import RopeScaling
from jaxllm.models.attention import attention_mask
from jaxllm.models.positions import rope_inv_freq
from tests.conftest import tiny_model_config


def _params(model):
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def _unstack(stacked_params, num_layers):
    """Scanned-layer params -> per-layer params (the layout of scan_layers=False)."""
    out = dict(stacked_params)
    out["layers"] = {i: jax.tree.map(lambda x: x[i], stacked_params["layers"]) for i in range(num_layers)}
    return out


def test_logits_shape_and_dtype(model_cfg):
    model = models.create_model(model_cfg)
    logits, cache = model(jnp.zeros((3, 10), jnp.int32))
    assert logits.shape == (3, 10, model_cfg.vocab_size)
    assert logits.dtype == jnp.float32
    assert cache is None


def test_scan_and_loop_give_same_logits(model_cfg):
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, model_cfg.vocab_size)
    scanned = models.create_model(model_cfg, seed=3)
    _, stacked = _params(scanned)
    looped_cfg = dataclasses.replace(model_cfg, scan_layers=False)
    graphdef, _ = _params(models.create_model(looped_cfg))
    looped = nnx.merge(graphdef, _unstack(stacked, model_cfg.num_layers))
    np.testing.assert_allclose(scanned(tokens)[0], looped(tokens)[0], atol=1e-5, rtol=1e-5)


def test_packed_rows_equal_separate_sequences(model_cfg):
    """Two documents packed in one row (segment ids, restarted positions) give the logits each
    document gets alone: no attention crosses the document boundary."""
    model = models.create_model(model_cfg)
    a = jnp.array([[5, 6, 7, 8, 9]])
    b = jnp.array([[11, 12, 13]])
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], axis=1)
    segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 0, 0]])
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 0, 0]])
    packed_logits, _ = model(packed, positions, segments)
    np.testing.assert_allclose(packed_logits[0, :5], model(a)[0][0], atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, 5:8], model(b)[0][0], atol=1e-5)


def test_causal_future_tokens_do_not_matter(model_cfg):
    model = models.create_model(model_cfg)
    x = jnp.array([[1, 2, 3, 4, 5, 6]])
    y = x.at[0, 4:].set(jnp.array([50, 60]))
    np.testing.assert_allclose(model(x)[0][0, :4], model(y)[0][0, :4], atol=1e-6)
    assert not np.allclose(model(x)[0][0, 4:], model(y)[0][0, 4:])


def test_sliding_window_limits_attention():
    cfg = tiny_model_config(sliding_window=3)
    model = models.create_model(cfg)
    x = jnp.arange(1, 11)[None]
    y = x.at[0, 0].set(99)  # token 0 is outside the window of positions >= 3 (and of no later layer's reach)
    lx, ly = model(x)[0], model(y)[0]
    # With 2 layers, information travels at most 2 * (window - 1) = 4 positions.
    np.testing.assert_allclose(lx[0, 5:], ly[0, 5:], atol=1e-6)
    assert not np.allclose(lx[0, :3], ly[0, :3])
    # Without the window the change reaches the end of the sequence.
    full = models.create_model(tiny_model_config())
    assert not np.allclose(full(x)[0][0, 9], full(y)[0][0, 9])


def test_attention_mask_rule():
    seg = jnp.array([[1, 1, 1, 2, 2, 0]])
    pos = jnp.array([[0, 1, 2, 0, 1, 0]])
    idx = jnp.arange(6)
    mask = np.asarray(attention_mask(seg, pos, idx, seg, pos, idx, sliding_window=2))[0]
    expected = np.array(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],  # window 2: position 2 sees positions 1, 2
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 0],  # padding attends nowhere
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_math(model_cfg, remat):
    tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, model_cfg.vocab_size)
    base = models.create_model(model_cfg)
    graphdef, params = _params(base)
    graphdef_r, _ = _params(models.create_model(dataclasses.replace(model_cfg, remat=remat)))

    def loss(gd, p):
        return jnp.mean(nnx.merge(gd, p)(tokens)[0] ** 2)

    g1 = jax.grad(loss, argnums=1)(graphdef, params)
    g2 = jax.grad(loss, argnums=1)(graphdef_r, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g2)


def test_bfloat16_compute_keeps_float32_params_and_logits(model_cfg):
    cfg = dataclasses.replace(model_cfg, dtype="bfloat16")
    model = models.create_model(cfg)
    _, params = _params(model)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits, _ = model(jnp.ones((1, 4), jnp.int32))
    assert logits.dtype == jnp.float32
    ref, _ = models.create_model(model_cfg)(jnp.ones((1, 4), jnp.int32))
    np.testing.assert_allclose(logits, ref, atol=0.1)  # bf16 has ~3 significant digits


def test_tied_embeddings_have_no_output_head(model_cfg):
    model = models.create_model(dataclasses.replace(model_cfg, tie_embeddings=True))
    _, params = _params(model)
    assert "lm_head" not in params
    untied = _params(models.create_model(model_cfg))[1]
    assert untied["lm_head"]["kernel"].shape == (model_cfg.d_model, model_cfg.vocab_size)


def test_rope_llama3_scaling_matches_reference_formula():
    inv = rope_inv_freq(64, 500000.0, None)
    scaled = rope_inv_freq(64, 500000.0, RopeScaling(factor=8.0, original_max_position_embeddings=8192))
    wavelen = 2 * np.pi / inv
    # High frequencies (short wavelengths) are untouched, the lowest ones divided by the factor.
    np.testing.assert_allclose(scaled[wavelen < 8192 / 4], inv[wavelen < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelen > 8192], inv[wavelen > 8192] / 8.0, rtol=1e-6)
    linear = rope_inv_freq(64, 10000.0, RopeScaling(type="linear", factor=2.0))
    np.testing.assert_allclose(linear, rope_inv_freq(64, 10000.0, None) / 2.0, rtol=1e-6)


def test_model_spec_names_every_parameter(model_cfg):
    _, abstract, logical = models.model_spec(model_cfg)
    for a, names in zip(jax.tree.leaves(abstract), jax.tree.leaves(logical, is_leaf=lambda x: isinstance(x, tuple))):
        assert len(names) == len(a.shape)
    assert logical["layers"]["attn"]["q"]["kernel"] == ("layers", "embed", "heads", "head_dim")
