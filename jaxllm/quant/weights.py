"""NF4 and int8 weight quantisation.

A kernel [lead..., *in, *out] (lead: stacked layers or experts) is viewed as [lead..., R, *out] with
R = prod(in): each output column's R inputs are what a matmul contracts.

- nf4 (QLoRA, Dettmers et al. 2023): the R inputs of a column are cut into blocks of `block_size`; each
  block keeps its absmax (a float32 scale) and 4-bit indices into the NormalFloat codebook, two per byte:
  codes [lead..., R/bs, bs/2, *out] uint8, scale [lead..., R/bs, *out]. 4.5 bits per weight with bs=64.
- double_quant: the float32 block scales themselves stored as int8 around their mean, one absmax per
  output column (QLoRA quantises them in blocks of 256 with an 8-bit float code; a per-column linear
  code keeps the scales sharded like the kernel): ~4.13 bits per weight.
- int8: symmetric, one float32 scale per output column: int8 codes in the kernel's own shape.

Shapes keep the kernel's input axis (as R/bs) and output axes, so the logical sharding names carry over.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import ConfigError, QuantConfig

# The 16 NormalFloat-4 levels: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (bitsandbytes).
NF4_CODEBOOK = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


def quantize(w: jax.Array, n_lead: int, n_in: int, cfg: QuantConfig) -> dict[str, jax.Array]:
    """The stored parts of kernel `w` (see the module docstring for their shapes)."""
    lead, out = w.shape[:n_lead], w.shape[n_lead + n_in:]
    R = math.prod(w.shape[n_lead:n_lead + n_in])
    w = w.astype(jnp.float32).reshape(*lead, R, *out)
    r = n_lead  # the axis of R
    if cfg.kind == "int8":
        scale = jnp.max(jnp.abs(w), axis=r) / 127.0
        codes = jnp.round(w / jnp.expand_dims(jnp.where(scale == 0, 1.0, scale), r))
        return {"codes": codes.astype(jnp.int8), "scale": scale}
    bs = cfg.block_size
    if R % bs:
        raise ConfigError(f"a kernel with {R} inputs does not split into NF4 blocks of model.quant.block_size={bs}; "
                          f"use a block size that divides {R}")
    blocks = w.reshape(*lead, R // bs, bs, *out)
    absmax = jnp.max(jnp.abs(blocks), axis=r + 1)
    normed = blocks / jnp.expand_dims(jnp.where(absmax == 0, 1.0, absmax), r + 1)
    idx = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed).astype(jnp.uint8)  # nearest level
    low, high = jnp.take(idx, jnp.arange(0, bs, 2), axis=r + 1), jnp.take(idx, jnp.arange(1, bs, 2), axis=r + 1)
    parts = {"codes": low | (high << 4)}
    if not cfg.double_quant:
        return parts | {"scale": absmax}
    mean = jnp.mean(absmax, axis=r)
    spread = jnp.max(jnp.abs(absmax - jnp.expand_dims(mean, r)), axis=r) / 127.0
    codes = jnp.round((absmax - jnp.expand_dims(mean, r)) / jnp.expand_dims(jnp.where(spread == 0, 1.0, spread), r))
    return parts | {"scale_codes": codes.astype(jnp.int8), "scale_spread": spread, "scale_mean": mean}


def dequantize(parts: dict[str, jax.Array], shape: Sequence[int], n_lead: int, n_in: int, kind: str, dtype) -> jax.Array:
    """The kernel of `shape` (= [lead..., *in, *out]) back from its parts, in `dtype`."""
    r = n_lead
    if kind == "int8":
        w = parts["codes"].astype(jnp.float32) * jnp.expand_dims(parts["scale"], r)
        return w.astype(dtype).reshape(shape)
    if "scale" in parts:
        absmax = parts["scale"]
    else:
        absmax = (parts["scale_codes"].astype(jnp.float32) * jnp.expand_dims(parts["scale_spread"], r)
                  + jnp.expand_dims(parts["scale_mean"], r))
    packed = parts["codes"]
    low, high = packed & 0xF, packed >> 4
    idx = jnp.stack([low, high], axis=r + 2).reshape(*packed.shape[:r + 1], 2 * packed.shape[r + 1], *packed.shape[r + 2:])
    values = jnp.take(jnp.asarray(NF4_CODEBOOK), idx.astype(jnp.int32)) * jnp.expand_dims(absmax, r + 1)
    return values.astype(dtype).reshape(shape)


class QuantizedKernel(nnx.Module):
    """A Dense or expert kernel stored quantised; `value(dtype)` is the dequantised kernel.

    Made from a float kernel by the quantisation policy (models/policies.py `apply_policies`); its parts are
    parameters (checkpointed and sharded like any other) that never train."""

    def __init__(self, kernel: jax.Array, names: Sequence[str | None], n_lead: int, n_in: int, cfg: QuantConfig):
        # Static data describes one kernel without the leading axes: a scanned stack slices those off.
        self.kind, self.n_in, self.core_shape = cfg.kind, n_in, tuple(kernel.shape[n_lead:])
        lead_names, in_name = tuple(names[:n_lead]), names[n_lead]
        out_names = tuple(names[n_lead + n_in:])
        for name, part in quantize(kernel, n_lead, n_in, cfg).items():
            if name == "codes" and cfg.kind != "int8":  # nf4: [lead..., R/bs, bs/2, *out]
                part_names = lead_names + (in_name, None) + out_names
            elif name in ("scale_spread", "scale_mean") or (name == "scale" and cfg.kind == "int8"):
                part_names = lead_names + out_names  # one per output column
            else:  # int8 codes [lead..., R, *out] and per-block scales [lead..., R/bs, *out]
                part_names = lead_names + (in_name,) + out_names
            setattr(self, name, nnx.Param(part, out_sharding=part_names))
        self.part_names = tuple(sorted(quantize_part_names(cfg)))

    def value(self, dtype) -> jax.Array:
        parts = {name: getattr(self, name)[...] for name in self.part_names}
        n_out = len(self.core_shape) - self.n_in
        n_lead = parts["codes"].ndim - n_out - (1 if self.kind == "int8" else 2)
        shape = parts["codes"].shape[:n_lead] + self.core_shape
        return dequantize(parts, shape, n_lead, self.n_in, self.kind, dtype)


def kernel_array(kernel, dtype) -> jax.Array:
    """A kernel as an array in `dtype`: dequantised when it is a QuantizedKernel, cast when it is a Param."""
    return kernel.value(dtype) if isinstance(kernel, QuantizedKernel) else kernel[...].astype(dtype)


def quantize_part_names(cfg: QuantConfig) -> tuple[str, ...]:
    if cfg.kind == "int8":
        return ("codes", "scale")
    return ("codes", "scale_codes", "scale_mean", "scale_spread") if cfg.double_quant else ("codes", "scale")
