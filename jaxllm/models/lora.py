"""LoRA and quantisation as policies applied to an unchanged model (docs/lora.md).

`apply_policies` walks a built model: with `model.quant` it replaces the kernels of the base
projections (attention, MLPs, experts; not routers) by `QuantizedKernel`s; with `model.lora` it adds
`lora_a` [in..., R] and `lora_b` [R, out...] beside the kernel of every `Dense` whose path matches
`model.lora.targets` (B starts at zero, so the adapted model starts as the base). Parameters stay one
nested dict (`layers/attn/q/kernel`, `layers/attn/q/lora_a`, ...): checkpoints, shardings, generation and
conversion see one tree; the train step differentiates and optimises only `trainable(params)`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ConfigError, ModelConfig
from jaxllm.models.layers import Dense
from jaxllm.models.moe import Experts
from jaxllm.quant import QuantizedKernel, kernel_array

ADAPTER_KEYS = ("lora_a", "lora_b")
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


# ----------------------------------------------------------------------------------------- params


def is_adapter(path) -> bool:
    return any(getattr(p, "key", p) in ADAPTER_KEYS for p in path)


def partition(params: Any, keep: Callable[[tuple], bool]) -> tuple[dict, dict]:
    """(the leaves whose path satisfies `keep`, the others), as two nested dicts without empty branches."""
    yes, no = {}, {}
    for key, value in params.items():
        if isinstance(value, dict):
            a, b = partition(value, lambda path, key=key: keep((key, *path)))
            if a:
                yes[key] = a
            if b:
                no[key] = b
        else:
            (yes if keep((key,)) else no)[key] = value
    return yes, no


def combine(a: dict, b: dict) -> dict:
    """Merges two nested dicts of disjoint leaves (the inverse of `partition`)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = combine(out[key], value) if key in out else value
    return out


def split_trainable(params: Any) -> tuple[dict, dict]:
    """(trainable, frozen): the adapters and the rest when the model has adapters; else (params, {})."""
    trainable, frozen = partition(params, is_adapter)
    return (trainable, frozen) if trainable else (params, {})


def trainable(params: Any) -> dict:
    return split_trainable(params)[0]


def adapt(base_params: Any, cfg: ModelConfig, shardings: Any = None, seed: int = 0) -> Any:
    """Parameters of `cfg` (with its policies) from parameters of `base_config(cfg)`: the base
    quantised, fresh adapters. `shardings`: those of `cfg`'s parameters, for a sharded result."""
    from jaxllm.models import bind, model_spec

    if cfg.lora is None and cfg.quant is None:
        return base_params
    graphdef = model_spec(base_config(cfg))[0]

    def build(params):
        model = apply_policies(bind(graphdef, params), cfg, nnx.Rngs(params=seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(build, out_shardings=shardings)(base_params)


def merge(params: Any, cfg: ModelConfig, shardings: Any = None) -> Any:
    """Parameters of `base_config(cfg)`: each adapted kernel becomes W + scale * A B (dequantised first
    when quantised; a merged QLoRA model is float). `shardings`: those of the base's parameters."""
    return _fold(params, cfg, +1, _float_dtype(cfg), shardings)


def unmerge(merged: Any, adapters: Any, cfg: ModelConfig) -> Any:
    """The float base back from merged parameters and the adapters (`partition(params, is_adapter)[0]`)."""
    return _fold(combine(merged, adapters), dataclasses.replace(cfg, quant=None), -1, None)


def _fold(params: Any, cfg: ModelConfig, sign: int, dtype, shardings: Any = None) -> Any:
    """One walk for merge (sign +1) and unmerge (-1): every adapted kernel of `params` (parameters of
    `cfg`) becomes W + sign * scale * A B without its adapters, and every quantised kernel a float one.
    New kernels are in `dtype`; None keeps each kernel's own (unmerge: its float base has no quantised kernels)."""
    from jaxllm.models import bind, model_spec

    graphdef = model_spec(cfg)[0]

    def fold(params):
        model = bind(graphdef, params)
        for _, module in list(nnx.iter_modules(model)):
            if isinstance(module, Dense) and (module.lora_a is not None or isinstance(module.kernel, QuantizedKernel)):
                module.kernel = nnx.Param(_merged(module, sign).astype(dtype or module.kernel.dtype))
                module.lora_a = module.lora_b = None
            elif isinstance(module, Experts):
                for part in ("gate", "up", "down"):
                    if isinstance(getattr(module, part), QuantizedKernel):
                        setattr(module, part, nnx.Param(kernel_array(getattr(module, part), dtype)))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    return jax.jit(fold, out_shardings=shardings)(params)


def _float_dtype(cfg: ModelConfig):
    return jnp.bfloat16 if cfg.param_dtype == "bfloat16" else jnp.float32


def _merged(dense: Dense, sign: int) -> jax.Array:
    """W + sign * scale * A B in float32, in W's shape (layers stacked in front stay stacked)."""
    kernel = kernel_array(dense.kernel, jnp.float32)
    if dense.lora_a is None:
        return kernel
    a, b = dense.lora_a[...], dense.lora_b[...]
    n_in = len(dense.in_shape)
    n_lead = a.ndim - n_in - 1
    lead = a.shape[:n_lead]
    a2 = a.reshape(*lead, math.prod(dense.in_shape), a.shape[-1])
    b2 = b.reshape(*lead, b.shape[n_lead], math.prod(dense.out_shape))
    delta = jnp.einsum("...ir,...ro->...io", a2, b2).reshape(kernel.shape)
    return kernel + sign * dense.lora_scale * delta
