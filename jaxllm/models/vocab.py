"""Resizing a model's vocabulary: the token embedding, an untied output head and a logits bias grow or shrink
together (tokens added to a tokenizer need rows; jaxllm.train.loop and jaxllm.convert.hf call this)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig
from jaxllm.models import model_spec

VOCAB_MULTIPLE = 128  # a grown vocabulary is padded to a multiple of this (fast matmuls, divisible shardings)


def grown_vocab_size(needed: int) -> int:
    """The vocabulary a model grows to when it needs `needed` ids: the next multiple of VOCAB_MULTIPLE."""
    return -(-needed // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def resize_vocab(params: Any, cfg: ModelConfig, vocab_size: int) -> tuple[Any, ModelConfig]:
    """(params, cfg) of the same model with `vocab_size` token ids.

    Every parameter whose shape changes with `cfg.vocab_size` along a `vocab` axis (the token embedding, an
    untied output kernel, a logits bias; adapters and either half of ELECTRA alike) keeps its first rows and
    drops the rest, or gains rows that are the plain mean of its old rows (transformers'
    `resize_token_embeddings(mean_resizing=True)` draws them from N(mean, 1e-9 * covariance): the mean up to
    noise). `params` are those of `cfg` (a nested dict); jax arrays keep their shardings where the new size
    divides them (else that axis is replicated), numpy arrays stay on the host.
    """
    new_cfg = dataclasses.replace(cfg, vocab_size=vocab_size)
    if vocab_size == cfg.vocab_size:
        return params, new_cfg
    _, old_abstract, logical = model_spec(cfg)
    new_abstract = model_spec(new_cfg)[1]

    def resize(x, old, new, names):
        if old.shape == new.shape:
            return x
        (axis,) = [a for a, (m, n) in enumerate(zip(old.shape, new.shape)) if m != n]
        assert names[axis] == "vocab" and x.shape == old.shape, (names, x.shape, old.shape, new.shape)
        if isinstance(x, jax.Array):
            fn = jax.jit(_resize_rows, static_argnums=(1, 2), out_shardings=_same_sharding(x, new.shape))
            return fn(x, axis, vocab_size)
        return jax.device_get(_resize_rows(jnp.asarray(x), axis, vocab_size))

    is_names = lambda n: isinstance(n, tuple) or n is None
    resized = jax.tree.map(lambda names, x, old, new: resize(x, old, new, names), logical, params, old_abstract,
                           new_abstract, is_leaf=is_names)
    return resized, new_cfg


def _resize_rows(x: jax.Array, axis: int, size: int) -> jax.Array:
    old = x.shape[axis]
    if size <= old:
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    mean = jnp.mean(x.astype(jnp.float32), axis=axis, keepdims=True).astype(x.dtype)
    extra = jnp.broadcast_to(mean, (*x.shape[:axis], size - old, *x.shape[axis + 1 :]))
    return jnp.concatenate([x, extra], axis=axis)


def _same_sharding(x: jax.Array, shape: tuple[int, ...]):
    """`x`'s sharding for an array of `shape`, with any axis the new size does not divide replicated."""
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding):
        return sharding
    mesh, spec = sharding.mesh, list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for a, (entry, dim) in enumerate(zip(spec, shape)):
        axes = entry if isinstance(entry, tuple) else (entry,) if entry else ()
        size = 1
        for name in axes:
            size *= mesh.shape[name]
        if dim % size:
            spec[a] = None
    return NamedSharding(mesh, PartitionSpec(*spec))
