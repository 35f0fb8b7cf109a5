"""Changing a decoder's head: a causal LM's parameters become a reward model's (`train.init_from` of an LM
run or Hugging Face directory into `model.head: reward`, as TRL's RewardTrainer loads an LM checkpoint
with AutoModelForSequenceClassification): the backbone is kept, the LM head dropped and the `score` head
initialised fresh (normal with std `model.init_std`, as transformers initialises it)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxllm.config import JaxllmError, ModelConfig
from jaxllm.models import model_spec


def change_head(params: Any, saved: ModelConfig, cfg: ModelConfig, shardings: Any = None, seed: int = 0) -> Any:
    """`params` of model `saved` as parameters of `saved` with `cfg.head` (only lm -> reward changes anything);
    `shardings`: those of the new parameters (their `score` entry places the fresh head)."""
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
