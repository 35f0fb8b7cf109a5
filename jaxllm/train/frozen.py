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
from jaxllm.models.vocab import resize_vocab
from jaxllm.convert.hf import config_from_hf, from_hf, hf_tokenizer_files_of
from jaxllm.convert.hf_io import SafetensorsReader, read_hf_config
from jaxllm.train.checkpoint import find_checkpoint

log = logging.getLogger("jaxllm")


@dataclasses.dataclass(frozen=True)
class FrozenSource:
    """Where an objective's frozen model comes from: a jaxllm run directory or checkpoint, or a Hugging Face
    model directory; `param_dtype` (e.g. bfloat16) stores it in another dtype than it was saved in."""

    path: str
    param_dtype: str | None = None
    # Grow a smaller vocabulary to the trained model's (the new rows as `models.vocab.resize_vocab` makes them,
    # as the trained model's own grew at init_from): a reference that must equal the starting model.
    match_vocab: bool = False


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


@dataclasses.dataclass
class Pretrained:
    """A trained model to start from (train.init_from) or to freeze beside the trained one: a jaxllm run
    directory or checkpoint (a LoRA/QLoRA run's adapters merged into its base), or a Hugging Face model
    directory (config.json + safetensors). `config` is the plain model's; `params(...)` reads the weights."""

    path: Path
    config: ModelConfig
    tokenizer_files: dict[str, bytes]
    where: str  # for messages: the checkpoint step directory, or the Hugging Face directory
    _checkpoint: Any = None  # (checkpointer, step, saved model config) of a jaxllm checkpoint
    run_config: Any = None  # a jaxllm checkpoint's whole Config (its data framing, mesh rules); None for Hugging Face

    def params(self, mesh, rules, param_dtype: str | None = None) -> Any:
        """The parameters on `mesh`, sharded by `rules`; `param_dtype` (e.g. bfloat16) casts them."""
        if self._checkpoint is None:
            return from_hf(self.path, mesh=mesh, rules=rules, param_dtype=param_dtype).params  # read in that dtype
        checkpointer, step, saved = self._checkpoint
        _, params = restore_base_params(checkpointer, step, saved, mesh, rules)
        if param_dtype is not None:
            dtype = DTYPES[param_dtype]
            params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params)
        return params


def open_pretrained(path: str | Path) -> Pretrained:
    """The model at `path` (a jaxllm run directory or checkpoint, or a Hugging Face model directory), its
    config and tokenizer files read; the weights are read by `Pretrained.params`."""
    path = Path(path)
    if (path / "config.json").is_file():
        config = config_from_hf(read_hf_config(path), None, SafetensorsReader(path))
        return Pretrained(path, config, hf_tokenizer_files_of(path), str(path))
    checkpointer, step = find_checkpoint(path)
    meta = checkpointer.restore_meta(step, with_data=False)
    saved = meta.config.model
    config = saved if saved.lora is None and saved.quant is None else lora.base_config(saved)
    return Pretrained(path, config, meta.tokenizer_files, str(checkpointer.directory / str(step)),
                      (checkpointer, step, saved), meta.config)


def load_frozen(path: str | Path, mesh, rules, param_dtype: str | None = None,
                vocab_size: int | None = None) -> FrozenModel:
    """A frozen model from a jaxllm run directory or checkpoint, or a Hugging Face model directory
    (config.json + safetensors), sharded on `mesh`; `param_dtype` (e.g. bfloat16) casts its parameters;
    `vocab_size`: a smaller vocabulary grows to it (`models.vocab.resize_vocab`)."""
    pretrained = open_pretrained(path)
    params = pretrained.params(mesh, rules, param_dtype)
    cfg = pretrained.config if param_dtype is None else dataclasses.replace(pretrained.config, param_dtype=param_dtype)
    if vocab_size is not None and cfg.vocab_size < vocab_size:
        params, cfg = resize_vocab(params, cfg, vocab_size)
    log.info("frozen model from %s: %s, %s parameters", path, cfg.family or cfg.arch,
             f"{sum(a.size for a in jax.tree.leaves(params)):,}")
    return FrozenModel(params, models.model_spec(cfg)[0], cfg)


def frozen_shardings(frozen: dict[str, FrozenModel]) -> dict[str, FrozenModel]:
    """The same tree with each array replaced by its sharding (the in_shardings of a jitted step)."""
    return jax.tree.map(lambda a: a.sharding, frozen)
