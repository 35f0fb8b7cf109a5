"""Changing a decoder's head: a causal LM's parameters become a reward model's (`train.init_from` of an LM
run or Hugging Face directory into `model.head: reward`, as TRL's RewardTrainer loads an LM checkpoint
with AutoModelForSequenceClassification): the backbone is kept, the LM head dropped and the `score` head
initialised fresh (normal with std `model.init_std`, as transformers initialises it). PPO's value head
(`model.value_head`) is added the same way when the saved model has none (kernel normal(init_std), bias 0)
and dropped when this run has none."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import JaxllmError, ModelConfig
from jaxllm.models import model_spec

log = logging.getLogger(__name__)


def change_head(params: Any, saved: ModelConfig, cfg: ModelConfig, shardings: Any = None, seed: int = 0) -> Any:
    """`params` of model `saved` as parameters of `saved` with `cfg.head` (only lm -> reward changes anything)
    and `cfg.value_head`; `shardings`: those of the new parameters (they place a fresh head)."""
    params = _value_head(params, saved, cfg, shardings, seed)
    if saved.head == cfg.head:
        return params
    if (saved.head, cfg.head) != ("lm", "reward"):
        raise JaxllmError(f"train.init_from holds a model with model.head={saved.head}, which cannot start a "
                          f"model.head={cfg.head} model; start from a causal LM (head=lm) or a model of this head")
    new = dataclasses.replace(saved, head=cfg.head, lora=None, quant=None)
    score = model_spec(new)[1]["score"]["kernel"]
    out = {k: v for k, v in params.items() if k != "lm_head"}

    def fresh():
        return (new.init_std * jax.random.normal(jax.random.key(seed), score.shape)).astype(score.dtype)

    placement = shardings["score"]["kernel"] if shardings is not None else None
    out["score"] = {"kernel": jax.jit(fresh, out_shardings=placement)()}
    return out


def _value_head(params: Any, saved: ModelConfig, cfg: ModelConfig, shardings: Any, seed: int) -> Any:
    if saved.value_head == cfg.value_head:
        return params
    if not cfg.value_head:
        log.info("train.init_from has a PPO value head and this run has none (model.value_head=false): dropped")
        return {k: v for k, v in params.items() if k != "value_head"}
    new = dataclasses.replace(saved, value_head=True, lora=None, quant=None)
    spec = model_spec(new)[1]["value_head"]
    placement = shardings["value_head"] if shardings is not None else None

    def fresh():
        kernel = cfg.init_std * jax.random.normal(jax.random.fold_in(jax.random.key(seed), 1), spec["kernel"].shape)
        return {"kernel": kernel.astype(spec["kernel"].dtype), "bias": jnp.zeros(spec["bias"].shape, spec["bias"].dtype)}

    log.info("train.init_from has no PPO value head: model.value_head starts fresh (normal, std %g; bias 0)",
             cfg.init_std)
    return {**params, "value_head": jax.jit(fresh, out_shardings=placement)()}
