"""Models built from a `ModelConfig`, and their parameters as plain nested dicts of arrays."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxllm.config import ModelConfig
from jaxllm.models.electra import Electra
from jaxllm.models.policies import apply_policies
from jaxllm.models.transformer import MODEL_CLASSES, DecodeCache, Decoder, Encoder, EncoderDecoder, init_cache
from jaxllm.sharding import Rules, tree_shardings

__all__ = ["Decoder", "Encoder", "EncoderDecoder", "DecodeCache", "init_cache", "build", "create_model", "model_spec",
           "sharded_spec", "init_params", "bind", "param_counts"]


def model_class(cfg: ModelConfig) -> type[nnx.Module]:
    """The module class of `cfg`: ELECTRA pre-training (generator + discriminator) or the class of `cfg.arch`."""
    return Electra if cfg.electra_generator is not None else MODEL_CLASSES[cfg.arch]


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The model of `cfg.arch` with the config's policies applied (LoRA adapters, quantised base)."""
    return apply_policies(model_class(cfg)(cfg, rngs), cfg, rngs)


def create_model(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
    """An eagerly initialised, unsharded model of `cfg.arch` (tests, conversion, small experiments)."""
    with nnx.use_eager_sharding(False):
        return build(cfg, nnx.Rngs(params=seed))


def model_spec(cfg: ModelConfig) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, abstract params, logical axis names) without allocating any parameter.

    Params are a nested dict of arrays (`nnx.to_pure_dict`); the logical names a matching dict of tuples.
    """
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build(cfg, nnx.Rngs(params=0)))
    graphdef, state = nnx.split(model, nnx.Param)
    abstract = nnx.to_pure_dict(state)
    specs = nnx.get_partition_spec(state)
    logical = jax.tree.map(lambda p: tuple(p), nnx.to_pure_dict(specs), is_leaf=lambda x: x is None or isinstance(x, tuple))
    return graphdef, abstract, logical


def sharded_spec(cfg: ModelConfig, mesh: Mesh, rules: Rules) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, target, shardings): the parameters as ShapeDtypeStructs carrying their NamedShardings
    on `mesh` (what a restore or a conversion fills, or an ahead-of-time compile takes), and the
    shardings alone."""
    graphdef, abstract, logical = model_spec(cfg)
    shardings = tree_shardings(abstract, logical, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, target, shardings


def init_params(cfg: ModelConfig, mesh: Mesh, rules: Rules, seed: int) -> tuple[nnx.GraphDef, Any, Any]:
    """Initialises parameters directly into their shardings (no host ever holds the whole model).

    Returns (graphdef, params, param_shardings).
    """
    graphdef, _, shardings = sharded_spec(cfg, mesh, rules)

    def init():
        with nnx.use_eager_sharding(False):
            model = build(cfg, nnx.Rngs(params=seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    params = jax.jit(init, out_shardings=shardings)()
    return graphdef, params, shardings


def bind(graphdef: nnx.GraphDef, params: Any) -> nnx.Module:
    """The model module for `params` (a pure dict); cheap, used inside jitted functions."""
    return nnx.merge(graphdef, params)


@functools.cache
def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts of `cfg`'s model, from its abstract parameter shapes (cached per config):

    - `total`: every parameter (a tied embedding once);
    - `active`: those one token uses: a mixture's routed experts count `experts_per_token` of
      `num_experts` (router and shared experts fully);
    - `non_embedding`: without the embedding matrices (Kaplan et al.'s N): the token, position,
      token-type and relative-position tables and an untied output projection (the vocabulary's own
      matrix), so tying does not change it; a factorised embedding's projection counts;
    - `embedding_lookups`: the tables read by index, not multiplied (all of the above but an untied
      output projection); FLOPs count `active - embedding_lookups` plus the output projection.
    """
    _, abstract, _ = model_spec(cfg)
    flat = {"/".join(str(k.key) for k in path): math.prod(a.shape)
            for path, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    total = sum(flat.values())
    lookups = sum(n for p, n in flat.items() if p.endswith(("/embedding", "token_types")) or p == "embedding")
    untied_head = sum(n for p, n in flat.items() if p.endswith("lm_head/kernel"))
    inactive = 0
    if cfg.moe is not None:
        experts = sum(n for p, n in flat.items() if "/experts/" in f"/{p}")
        inactive = experts * (cfg.moe.num_experts - cfg.moe.experts_per_token) // cfg.moe.num_experts
    return {"total": total, "active": total - inactive, "non_embedding": total - lookups - untied_head,
            "embedding_lookups": lookups}
