"""Models that ride along with the trained one: parameters loaded from a run or a Hugging Face directory,
sharded on the trainer's mesh by the same rules, never differentiated and never checkpointed.

Also the one way to read a checkpoint's parameters as a plain model (`restore_base_params`): a LoRA or
QLoRA run's adapters merged into its base. `train.init_from` and frozen models both use it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jaxllm import models
from jaxllm.config import ModelConfig
from jaxllm.models import lora
from jaxllm.models.blocks import without_embedding_noise
from jaxllm.models.layers import DTYPES
from jaxllm.train.checkpoint import find_checkpoint

log = logging.getLogger("jaxllm")


@dataclasses.dataclass(frozen=True)
class FrozenSource:
    """Where an objective's frozen model comes from: a jaxllm run directory or checkpoint, or a Hugging Face
    model directory; `param_dtype` (e.g. bfloat16) stores it in another dtype than it was saved in."""

    path: str
    param_dtype: str | None = None


@struct.dataclass
class FrozenModel:
    """A model's parameters (a jit argument, sharded) with its graphdef and config (static)."""

    params: Any
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    cfg: ModelConfig = struct.field(pytree_node=False)

    def bind(self) -> nnx.Module:
        """The module, for use inside a jitted loss; no gradient flows into it, and no embedding noise
        (NEFTune, adversarial) of the train step reaches its inputs."""
        return without_embedding_noise(models.bind(self.graphdef, jax.lax.stop_gradient(self.params)))


def restore_base_params(checkpointer, step: int, saved: ModelConfig, mesh, rules) -> tuple[ModelConfig, Any]:
    """(model config, parameters) of checkpoint `step` written by a run of model `saved`, on `mesh`; a
    LoRA/QLoRA run's adapters are merged into its base, which is then a plain model."""
    params = checkpointer.restore_params(step, models.sharded_spec(saved, mesh, rules)[1])
    if saved.lora is None and saved.quant is None:
        return saved, params
    base = lora.base_config(saved)
    return base, lora.merge(params, saved, models.sharded_spec(base, mesh, rules)[2])


def load_frozen(path: str | Path, mesh, rules, param_dtype: str | None = None) -> FrozenModel:
    """A frozen model from a jaxllm run directory or checkpoint, or a Hugging Face model directory
    (config.json + safetensors), sharded on `mesh`; `param_dtype` (e.g. bfloat16) casts its parameters."""
    path = Path(path)
    if (path / "config.json").is_file():
        from jaxllm.convert.hf import from_hf

        hf = from_hf(path, mesh=mesh, rules=rules, param_dtype=param_dtype)  # read in that dtype
        cfg, params = hf.config, hf.params
    else:
        checkpointer, step = find_checkpoint(path)
        meta = checkpointer.restore_meta(step, with_data=False)
        cfg, params = restore_base_params(checkpointer, step, meta.config.model, mesh, rules)
        if param_dtype is not None:
            dtype = DTYPES[param_dtype]
            params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
            cfg = dataclasses.replace(cfg, param_dtype=param_dtype)
    log.info("frozen model from %s: %s, %s parameters", path, cfg.family or cfg.arch,
             f"{sum(a.size for a in jax.tree.leaves(params)):,}")
    return FrozenModel(params, models.model_spec(cfg)[0], cfg)


def frozen_shardings(frozen: dict[str, FrozenModel]) -> dict[str, FrozenModel]:
    """The same tree with each array replaced by its sharding (the in_shardings of a jitted step)."""
    return jax.tree.map(lambda a: a.sharding, frozen)
