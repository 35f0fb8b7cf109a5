"""The family presets under configs/ have the parameter counts of their Hugging Face originals
(built from our exported config.json on torch's meta device: no memory, no download)."""

import math
from pathlib import Path

import jax
import pytest
import torch
import transformers as T

from jaxllm import models
from jaxllm.config import load_config
from jaxllm.convert.registry import family_for

PRESETS = {"gpt2-124m": 124.4e6, "mistral-7b": 7.24e9, "qwen2-0.5b": 0.494e9, "bert-base": 110e6,
           "t5-base": 248e6, "bart-base": 140e6, "mixtral-8x7b": 46.7e9}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_matches_transformers_parameter_count(name):
    cfg = load_config(Path(__file__).parents[2] / "configs" / f"{name}.yaml").model
    _, abstract, _ = models.model_spec(cfg)
    ours = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract))
    hf_config = T.AutoConfig.for_model(**family_for(cfg).config_to_hf(cfg))
    with torch.device("meta"):
        hf_model = T.AutoModelForMaskedLM.from_config(hf_config) if cfg.arch == "encoder" else (
            T.AutoModelForSeq2SeqLM.from_config(hf_config) if cfg.arch == "encoder_decoder"
            else T.AutoModelForCausalLM.from_config(hf_config))
    theirs = sum(p.numel() for p in hf_model.parameters())  # tied weights are counted once
    if cfg.family == "bart":  # HF keeps 2 unused position rows per stack, and the final logits bias as a buffer
        theirs = theirs - 2 * 2 * cfg.d_model + cfg.vocab_size
    if cfg.family == "t5" and not cfg.tie_embeddings:  # transformers 5 builds T5 tied; v1.1 checkpoints untie it
        theirs += cfg.vocab_size * cfg.d_model
    assert ours == theirs
    assert abs(ours - PRESETS[name]) / PRESETS[name] < 0.02
