"""Loading a trained model (config, parameters, tokenizer) from a run directory or checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
from flax import nnx

from jaxllm import models, sharding
from jaxllm.config import Config, MeshConfig
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer_from_files
from jaxllm.train.checkpoint import find_checkpoint


@dataclasses.dataclass
class LoadedModel:
    config: Config
    graphdef: nnx.GraphDef
    params: Any
    tokenizer: Tokenizer | None  # None when the checkpoint carries no tokenizer files
    tokenizer_files: dict[str, bytes]
    step: int


def load_model(path: str | Path, devices: Sequence[jax.Device] | None = None) -> LoadedModel:
    """Restores only the parameters (not the optimizer state) of the newest checkpoint under `path`,
    sharded fsdp-style over `devices` (default: all)."""
    checkpointer, step = find_checkpoint(path)
    meta = checkpointer.restore_meta(step, with_data=False)  # any process count may load it
    cfg = meta.config
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)
    rules = sharding.make_rules(cfg.mesh.rules)
    graphdef, target, _ = models.sharded_spec(cfg.model, mesh, rules)
    return LoadedModel(
        config=cfg,
        graphdef=graphdef,
        params=checkpointer.restore_params(step, target),
        tokenizer=load_tokenizer_from_files(meta.tokenizer_files) if meta.tokenizer_files else None,
        tokenizer_files=meta.tokenizer_files,
        step=step,
    )
