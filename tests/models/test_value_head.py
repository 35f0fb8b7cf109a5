"""PPO's value head (model.value_head): per-token values beside unchanged logits in one forward pass, a fresh
head when train.init_from holds an LM, trained in full under LoRA, exported apart from the causal LM."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models
from jaxllm.config import ConfigError, DataConfig, LoraConfig, validate
from jaxllm.convert.hf import VALUE_HEAD_FILE, from_hf, jaxllm_to_hf, save_hf
from jaxllm.convert.hf_tokenizer import hf_tokenizer_files
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.models import lora
from jaxllm.models.heads import change_head
from jaxllm.train.loop import Trainer
from tests.conftest import random_params, tiny_model_config
from tests.train.test_loop import micro_config

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 101, (2, 9)), jnp.int32)


def test_values_come_with_unchanged_logits_from_one_hidden_state():
    lm = tiny_model_config()
    cfg = dataclasses.replace(lm, value_head=True)
    params = random_params(cfg, seed=1)
    assert params["value_head"]["kernel"].shape == (cfg.d_model, 1) and params["value_head"]["bias"].shape == (1,)
    graphdef = models.model_spec(cfg)[0]

    @jax.jit
    def forward(params):
        model = models.bind(graphdef, params)
        x, _, _ = model.hidden(TOKENS)
        return x, model.values(x), model.logits(x), model(TOKENS)[0]

    x, values, logits, called = forward(params)
    assert values.shape == TOKENS.shape and values.dtype == jnp.float32
    np.testing.assert_allclose(values, x @ params["value_head"]["kernel"][:, 0] + params["value_head"]["bias"][0],
                               rtol=1e-5, atol=1e-5)
    without = {k: v for k, v in params.items() if k != "value_head"}
    lm_graphdef = models.model_spec(lm)[0]
    np.testing.assert_array_equal(logits, jax.jit(lambda p: models.bind(lm_graphdef, p)(TOKENS)[0])(without))
    np.testing.assert_array_equal(called, logits)  # the forward pass still returns the logits


def test_an_lm_gets_a_fresh_value_head_and_loses_it_again():
    lm = tiny_model_config()
    cfg = dataclasses.replace(lm, value_head=True)
    params = random_params(lm)
    out = change_head(params, lm, cfg, seed=3)
    assert 0 < float(jnp.std(out["value_head"]["kernel"])) < 3 * cfg.init_std
    np.testing.assert_array_equal(out["value_head"]["bias"], 0.0)
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in out.items() if k != "value_head"}, params)
    models.bind(models.model_spec(cfg)[0], out)  # the tree is a value-head model's
    back = change_head(out, cfg, lm)
    assert "value_head" not in back
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_lora_trains_the_value_head_in_full():
    cfg = tiny_model_config(value_head=True, lora=LoraConfig(rank=4, alpha=8, targets="attn/(q|v)$"))
    params = lora.adapt(random_params(dataclasses.replace(cfg, lora=None)), cfg)
    trainable, frozen = lora.split_trainable(params)
    assert set(trainable["value_head"]) == {"kernel", "bias"} and "value_head" not in frozen
    graphdef = models.model_spec(cfg)[0]

    def value_error(trainable):
        model = models.bind(graphdef, lora.combine(trainable, frozen))
        return jnp.mean(jnp.square(model.values(model.hidden(TOKENS)[0]) - 1.0))

    grads = jax.jit(jax.grad(value_error))(trainable)
    assert float(jnp.abs(grads["value_head"]["kernel"]).sum()) > 0 and float(jnp.abs(grads["value_head"]["bias"]).sum()) > 0


def test_value_head_belongs_to_a_causal_lm():
    from jaxllm.config import Config

    with pytest.raises(ConfigError, match="model.value_head is a causal LM's PPO value head"):
        validate(Config(model=tiny_model_config(head="reward", value_head=True)))


def test_init_from_an_lm_then_export_writes_the_value_head_apart(tmp_path):
    """train.init_from of a Hugging Face LM with model.value_head=true: the backbone is the LM's, the value head
    new; `jaxllm_to_hf` of that run writes the LM (loadable, no value head) and value_head.safetensors."""
    safetensors = pytest.importorskip("safetensors.numpy")
    tok = load_tokenizer("builtin:kjv-sp4k")
    lm = tiny_model_config(vocab_size=tok.vocab_size, family="llama", max_seq_len=64)
    lm_params = random_params(lm, seed=2)
    save_hf(lm_params, lm, tmp_path / "lm", hf_tokenizer_files(tok, DataConfig()))
    cfg = micro_config(tmp_path / "ppo", f"train.init_from={tmp_path / 'lm'}", "model.value_head=true",
                       "data.prefetch=0")
    trainer = Trainer(cfg)
    try:
        params = jax.device_get(trainer.state.params)
        assert params["value_head"]["kernel"].shape == (lm.d_model, 1)
        np.testing.assert_array_equal(params["value_head"]["bias"], 0.0)
        np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"], lm_params["layers"]["attn"]["q"]["kernel"])
        trainer.save()  # step 0: what jaxllm export reads
    finally:
        trainer.close()
    out = jaxllm_to_hf(tmp_path / "ppo", tmp_path / "hf")
    head = safetensors.load_file(str(out / VALUE_HEAD_FILE))
    np.testing.assert_array_equal(head["v_head.summary.weight"], params["value_head"]["kernel"].T)
    np.testing.assert_array_equal(head["v_head.summary.bias"], params["value_head"]["bias"])
    loaded = from_hf(out)
    assert not loaded.config.value_head and "value_head" not in loaded.params
    np.testing.assert_array_equal(loaded.params["embed"]["embedding"], params["embed"]["embedding"])
