"""Loading a trained model (config, parameters, tokenizer) from a run directory or checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
from flax import nnx

from jaxllm import models, sharding
from jaxllm.config import Config, JaxllmError, MeshConfig
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_from_files
from jaxllm.train.checkpoint import find_checkpoint


@dataclasses.dataclass
class LoadedModel:
    config: Config
    graphdef: nnx.GraphDef
    params: Any
    tokenizer: Tokenizer | None  # None when the checkpoint carries no tokenizer files and none was given
    tokenizer_files: dict[str, bytes]
    step: int


def load_model(path: str | Path, devices: Sequence[jax.Device] | None = None,
               tokenizer: str | None = None) -> LoadedModel:
    """Restores only the parameters (not the optimizer state) of the newest checkpoint under `path`,
    sharded fsdp-style over `devices` (default: all). `tokenizer` (any path `load_tokenizer` takes)
    replaces the checkpoint's own, or gives one to a checkpoint that has none."""
    checkpointer, step = find_checkpoint(path)
    meta = checkpointer.restore_meta(step, with_data=False)  # any process count may load it
    cfg = meta.config
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    rules = sharding.make_rules(cfg.mesh.rules)
    graphdef, target, _ = models.sharded_spec(cfg.model, mesh, rules)
    params = checkpointer.restore_params(step, target)
    if tokenizer is not None:
        tok: Tokenizer | None = load_tokenizer(tokenizer)
        if tok.vocab_size > cfg.model.vocab_size:
            raise JaxllmError(f"tokenizer {tokenizer} has {tok.vocab_size} tokens but the model only "
                              f"{cfg.model.vocab_size}; give the tokenizer the model was trained with")
        files = tok.files()
    else:
        files = meta.tokenizer_files
        tok = load_tokenizer_from_files(files) if files else None
    return LoadedModel(config=cfg, graphdef=graphdef, params=params, tokenizer=tok, tokenizer_files=files, step=step)
