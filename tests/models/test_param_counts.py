"""`models.param_counts`: exact counts from the abstract shapes, checked against `transformers`'
`num_parameters()` of the same (tiny) models, and a mixture's active parameters by hand.

T5 is left out: transformers 5 ties T5's output projection to the embedding whatever
`tie_word_embeddings` says, so its count is not the untied model's."""

import dataclasses

import pytest

from jaxllm import models
from jaxllm.config import load_config


@pytest.mark.parametrize("config", ["tiny.yaml", "tiny-bert-mlm.yaml", "tiny-albert-mlm.yaml",
                                    "tiny-bart.yaml"])
def test_counts_match_transformers(config):
    transformers = pytest.importorskip("transformers")
    from jaxllm.convert.registry import family_for

    m = dataclasses.replace(load_config(f"configs/{config}").model, num_layers=2, vocab_size=512)
    hf_dict = family_for(m).config_to_hf(m)
    hf = getattr(transformers, hf_dict["architectures"][0])(transformers.AutoConfig.for_model(**hf_dict))
    counts = models.param_counts(m)
    # BART's learned position tables (encoder, decoder) carry 2 rows for an offset no position reaches,
    # and its final_logits_bias is a buffer there, a parameter here
    offset_rows, logits_bias = (2 * 2 * m.d_model, m.vocab_size) if m.family == "bart" else (0, 0)
    assert counts["total"] == counts["active"] == hf.num_parameters() - offset_rows + logits_bias
    # transformers leaves out nn.Embedding tables only; an untied output projection (nn.Linear) stays in
    untied_head = 0 if m.tie_embeddings else m.vocab_size * m.d_model
    assert counts["non_embedding"] == hf.num_parameters(exclude_embeddings=True) - untied_head + logits_bias


def test_a_mixture_counts_the_experts_a_token_visits():
    moe = load_config("configs/tiny-moe.yaml").model  # 8 experts of 256 per layer, 2 per token
    counts = models.param_counts(moe)
    expert = 3 * moe.d_model * moe.moe.expert_mlp_dim
    assert counts["total"] - counts["active"] == moe.num_layers * (8 - 2) * expert
    assert counts["non_embedding"] == counts["total"] - moe.vocab_size * moe.d_model  # tied: one table
