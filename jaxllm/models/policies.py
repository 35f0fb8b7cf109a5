"""LoRA and quantisation as policies applied to an unchanged model (docs/lora.md): applied when a model is
built (`apply_policies`, called by `models.build`).

`apply_policies` walks a built model: with `model.quant` it replaces the kernels of the base
projections (attention, MLPs, experts; not routers) by `QuantizedKernel`s; with `model.lora` it adds
`lora_a` [in..., R] and `lora_b` [R, out...] beside the kernel of every `Dense` whose path matches
`model.lora.targets` (B starts at zero, so the adapted model starts as the base). Parameters stay one
nested dict (`layers/attn/q/kernel`, `layers/attn/q/lora_a`, ...): checkpoints, shardings, generation and
conversion see one tree. What is done with such trees (the trainable split, merge, unmerge, adapt) is in
models/lora.py.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.models.layers import Dense
from jaxllm.models.moe import Experts
from jaxllm.quant import QuantizedKernel

UNQUANTISED = ("router", "shared_gate")  # small, and they decide where tokens go


def base_config(cfg: ModelConfig) -> ModelConfig:
    """The architecture without its policies: what a Hugging Face or pretraining checkpoint holds."""
    return dataclasses.replace(cfg, lora=None, quant=None)


def lora_scale(cfg: ModelConfig) -> float:
    r = cfg.lora.rank
    return cfg.lora.alpha / (math.sqrt(r) if cfg.lora.rslora else r)


def apply_policies(model: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Adds LoRA adapters and quantises the base, in place (see the module docstring)."""
    if cfg.lora is None and cfg.quant is None:
        return model
    with nnx.use_eager_sharding(False):  # placement comes from the logical names, by the caller
        adapted = _apply(model, cfg, rngs)
    if cfg.lora is not None and not adapted:
        names = sorted({"/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, Dense)})
        raise ConfigError(f"model.lora.targets={cfg.lora.targets!r} matches no projection; the projections are "
                          f"{', '.join(names)}")
    return model


def _apply(model: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> list[str]:
    adapted = []
    for path, module in list(nnx.iter_modules(model)):
        name = "/".join(map(str, path))
        in_layers = "layers" in path and path[-1] not in UNQUANTISED
        if isinstance(module, Dense):
            if cfg.lora is not None and re.search(cfg.lora.targets, name):
                _add_adapter(module, name, cfg, rngs)
                adapted.append(name)
            if cfg.quant is not None and in_layers:
                module.kernel = _quantized(module.kernel, len(module.in_shape), len(module.out_shape), cfg)
        elif isinstance(module, Experts) and cfg.quant is not None:
            for part in ("gate", "up", "down"):
                if getattr(module, part) is not None:
                    setattr(module, part, _quantized(getattr(module, part), 1, 1, cfg))
    return adapted


def _quantized(kernel: nnx.Param, n_in: int, n_out: int, cfg: ModelConfig) -> QuantizedKernel:
    names = kernel.get_metadata()["out_sharding"]
    return QuantizedKernel(kernel[...], names, kernel.ndim - n_in - n_out, n_in, cfg.quant)


def _add_adapter(dense: Dense, name: str, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    names = dense.kernel.get_metadata()["out_sharding"]
    n_in, n_out = len(dense.in_shape), len(dense.out_shape)
    n_lead = dense.kernel.ndim - n_in - n_out
    lead, r = dense.kernel.shape[:n_lead], cfg.lora.rank
    # A ~ N(0, 1/fan_in) and B = 0: the adapter starts as a no-op. Adapters stay float32 (they train).
    std = math.prod(dense.in_shape) ** -0.5
    a = std * jax.random.normal(rngs.params(), (*lead, *dense.in_shape, r), jnp.float32)
    dense.lora_a = nnx.Param(a, out_sharding=(*names[:n_lead + n_in], "lora_rank"))
    dense.lora_b = nnx.Param(jnp.zeros((*lead, r, *dense.out_shape), jnp.float32),
                             out_sharding=(*names[:n_lead], "lora_rank", *names[n_lead + n_in:]))
    dense.lora_scale, dense.lora_dropout = lora_scale(cfg), cfg.lora.dropout
    dense.lora_id = zlib.crc32(name.encode()) & 0x7FFFFFFF  # a static per-projection dropout stream


