"""LoRA parameter trees (docs/lora.md): adapters beside the kernels they adapt (models/policies.py puts them
there when a model is built). The train step differentiates and optimises only `trainable(params)`;
`merge` folds adapters (and dequantises a quantised base) into plain kernels, `unmerge` takes them out
again, and `adapt` applies a config's policies to a plain base's parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.models import bind, model_spec
from jaxllm.models.layers import Dense
from jaxllm.models.moe import Experts
from jaxllm.models.policies import apply_policies, base_config
from jaxllm.quant import QuantizedKernel, kernel_array

ADAPTER_KEYS = ("lora_a", "lora_b")


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


# Heads trained in full beside the adapters (PEFT's `modules_to_save`): a reward model's `score` and PPO's
# `value_head` start untrained on a pretrained backbone, so a LoRA model must learn them (as TRL's SEQ_CLS
# LoRA does, and TRL's PPO value head, which sits outside the PEFT model).
FULLY_TRAINED_HEADS = ("score", "value_head")


def _trained_with_adapters(path) -> bool:
    return is_adapter(path) or getattr(path[0], "key", path[0]) in FULLY_TRAINED_HEADS


def split_trainable(params: Any) -> tuple[dict, dict]:
    """(trainable, frozen): the adapters (and a fresh head, `FULLY_TRAINED_HEADS`) and the rest when the model
    has adapters; else (params, {})."""
    if not partition(params, is_adapter)[0]:
        return params, {}
    return partition(params, _trained_with_adapters)


def trainable(params: Any) -> dict:
    return split_trainable(params)[0]


def adapt(base_params: Any, cfg: ModelConfig, shardings: Any = None, seed: int = 0) -> Any:
    """Parameters of `cfg` (with its policies) from parameters of `base_config(cfg)`: the base
    quantised, fresh adapters. `shardings`: those of `cfg`'s parameters, for a sharded result."""
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
