"""NF4 and int8 weights: exact on their own grid, bounded error elsewhere, the bytes they take, and
the dequantised kernel of a quantised model's layers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import ConfigError, QuantConfig
from jaxllm.quant import NF4_CODEBOOK, dequantize, quantize

RNG = np.random.default_rng(0)


def _roundtrip(w, n_lead, n_in, cfg):
    parts = quantize(jnp.asarray(w), n_lead, n_in, cfg)
    return parts, np.asarray(dequantize(parts, w.shape, n_lead, n_in, cfg.kind, jnp.float32))


def test_nf4_is_exact_on_its_grid_and_packs_two_codes_per_byte():
    # Every block of 4 inputs per output column: codebook values times a per-block absmax.
    idx = RNG.integers(0, 16, (8, 3))
    idx[0] = 15  # each block holds its absmax (level 1.0)
    idx[4] = 15
    absmax = np.repeat(RNG.uniform(0.5, 2.0, (2, 3)), 4, axis=0)
    w = NF4_CODEBOOK[idx] * absmax
    parts, back = _roundtrip(w.astype(np.float32), 0, 1, QuantConfig("nf4", block_size=4))
    np.testing.assert_allclose(back, w, rtol=1e-6)
    assert parts["codes"].shape == (2, 2, 3) and parts["codes"].dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(parts["codes"])[0, 0], idx[0] | (idx[1] << 4))


def test_nf4_picks_the_nearest_level():
    w = RNG.normal(size=(2, 128, 6)).astype(np.float32)  # 2 stacked layers (a lead axis)
    parts, back = _roundtrip(w, 1, 1, QuantConfig("nf4", block_size=64))
    blocks = w.reshape(2, 2, 64, 6)
    absmax = np.abs(blocks).max(axis=2, keepdims=True)
    nearest = NF4_CODEBOOK[np.abs(blocks[..., None] / absmax[..., None] - NF4_CODEBOOK).argmin(-1)] * absmax
    np.testing.assert_allclose(back, nearest.reshape(w.shape), rtol=1e-6, atol=1e-7)
    gap = np.max(np.diff(NF4_CODEBOOK)) / 2
    assert np.all(np.abs(back - w) <= gap * absmax.max() + 1e-6)


@pytest.mark.parametrize("cfg, ratio", [(QuantConfig("nf4"), 0.28125), (QuantConfig("nf4", double_quant=True), 0.2588),
                                        (QuantConfig("int8"), 0.5005)])
def test_bytes_against_bfloat16(cfg, ratio):
    """A 4096 x 4096 kernel: NF4 is 4.5 bits a weight (~3.6x smaller than bf16), 4.14 with double
    quantisation (~3.9x); int8 8 bits plus a scale per column."""
    w = jnp.zeros((4096, 4096), jnp.float32) + 0.01
    parts = quantize(w, 0, 1, cfg)
    assert sum(p.nbytes for p in parts.values()) / (w.size * 2) == pytest.approx(ratio, abs=1e-4)


def test_double_quantised_scales_and_int8_errors():
    w = RNG.normal(size=(256, 2, 16)).astype(np.float32)  # multi-dimensional output (heads, head_dim)
    _, single = _roundtrip(w, 0, 1, QuantConfig("nf4", block_size=32))
    parts, double = _roundtrip(w, 0, 1, QuantConfig("nf4", block_size=32, double_quant=True))
    assert parts["scale_codes"].dtype == jnp.int8 and parts["scale_mean"].shape == (2, 16)
    assert np.sqrt(np.mean((double - single) ** 2)) < 0.01 * np.sqrt(np.mean(w**2))
    parts, int8 = _roundtrip(w, 0, 1, QuantConfig("int8"))
    assert parts["codes"].shape == (256, 2, 16) and parts["scale"].shape == (2, 16)
    assert np.all(np.abs(int8 - w) <= np.asarray(parts["scale"]) / 2 + 1e-6)


def test_a_block_size_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ConfigError, match="100 inputs does not split into NF4 blocks of model.quant.block_size=64"):
        quantize(jnp.zeros((100, 8)), 0, 1, QuantConfig("nf4"))
