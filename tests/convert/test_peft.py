"""PEFT interop on a tiny LLaMA: adapters saved by `peft` load here with peft's logits, and adapters we
export load in `peft` with ours; `jaxllm convert` merges a LoRA run into a plain Hugging Face model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers as T

from jaxllm import from_hf, models
from jaxllm.config import LoraConfig
from jaxllm.convert.hf_io import ConversionError
from jaxllm.convert.peft import load_peft_adapters, save_peft_adapters
from jaxllm.models import lora
from tests.convert.test_parity import _llama

TOKENS = np.random.default_rng(0).integers(3, 97, (2, 12))


def _hf_base(directory):
    torch.manual_seed(0)
    config = _llama()
    config._attn_implementation = "eager"
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def _peft_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS)).logits.numpy()


def _our_logits(params, cfg):
    graphdef = models.model_spec(cfg)[0]
    return np.asarray(jax.jit(lambda p: models.bind(graphdef, p)(TOKENS)[0])(params))


def _close(ours, theirs):
    error = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
    print(f"max abs error {np.max(np.abs(ours - theirs)):.1e}, relative {error:.1e}")
    assert error <= 1e-4, f"relative max error {error:.2e}"


@pytest.mark.parametrize("rslora", [False, True])
def test_adapters_saved_by_peft_give_peft_logits_here(tmp_path, rslora):
    base = _hf_base(tmp_path / "base")
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, lora_dropout=0.1,
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():  # as after training: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "adapter")
    loaded = from_hf(tmp_path / "base")
    params, cfg = load_peft_adapters(tmp_path / "adapter", loaded.params, loaded.config)
    assert cfg.lora.rank == 4 and cfg.lora.rslora == rslora and cfg.lora.dropout == pytest.approx(0.1)
    with_adapter = from_hf(tmp_path / "base", adapter=tmp_path / "adapter")  # the Python API, as --adapter
    assert with_adapter.config == cfg
    jax.tree.map(np.testing.assert_array_equal, with_adapter.params, params)
    assert sorted(lora.trainable(params)["layers"]["attn"]) == ["o", "q", "v"]
    theirs = _peft_logits(model)
    _close(_our_logits(params, cfg), theirs)
    with model.disable_adapter():
        assert np.max(np.abs(theirs - _peft_logits(model))) > 1e-2  # the adapters matter


def test_adapters_we_export_load_in_peft_with_our_logits(tmp_path):
    _hf_base(tmp_path / "base")
    loaded = from_hf(tmp_path / "base")
    cfg = dataclasses.replace(loaded.config, lora=LoraConfig(rank=3, alpha=6, rslora=True, targets="attn/(q|k)$|mlp/up"))
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(0.2 * rng.normal(size=a.shape), a.dtype) if path[-1].key == "lora_b" else a,
        lora.adapt(loaded.params, cfg, seed=2))
    ours = _our_logits(params, cfg)
    assert np.max(np.abs(ours - _our_logits(loaded.params, loaded.config))) > 1e-2  # the adapters matter
    save_peft_adapters(params, cfg, tmp_path / "adapter")
    base = T.LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    _close(ours, _peft_logits(model))
    # ... and back: the same adapters, bit for bit.
    again, again_cfg = load_peft_adapters(tmp_path / "adapter", loaded.params, loaded.config)
    jax.tree.map(np.testing.assert_array_equal, lora.trainable(again), lora.trainable(params))
    assert again_cfg.lora.rank == 3 and again_cfg.lora.alpha == 6 and again_cfg.lora.rslora


def test_unsupported_peft_variants_are_refused(tmp_path):
    base = _hf_base(tmp_path / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(tmp_path / "dora")
    loaded = from_hf(tmp_path / "base")
    with pytest.raises(ConversionError, match="use_dora=True is not supported"):
        load_peft_adapters(tmp_path / "dora", loaded.params, loaded.config)


def test_cli_fine_tunes_a_converted_model_then_merges_and_exports(tmp_path):
    """configs/lora_hf.yaml on a converted HF model, then `jaxllm convert jaxllm-to-hf` gives a plain HF
    model with our logits (adapters merged) and, with --adapters-only, a PEFT adapter with our logits."""
    from pathlib import Path

    from jaxllm.cli import main
    from jaxllm.infer.load import load_model

    torch.manual_seed(1)
    hf = T.LlamaForCausalLM(_llama(vocab_size=4096))  # the bundled tokenizer's vocabulary
    hf.save_pretrained(tmp_path / "base", safe_serialization=True)
    assert main(["convert", "hf-to-jaxllm", str(tmp_path / "base"), str(tmp_path / "converted")]) == 0
    config = Path(__file__).parents[2] / "configs" / "lora_hf.yaml"
    small = ["model.dtype=float32", "model.remat=none", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
             "data.seq_len=32", "data.shuffle_window=0", "data.prefetch=0", "train.batch_size=8", "train.steps=4",
             "optim.lr=1e-2", "optim.warmup_steps=1", "train.progress_bar=false", "train.sample_prompt=null",
             "tokenizer.path=builtin:kjv-sp4k"]
    assert main(["train", str(config), f"train.init_from={tmp_path / 'converted'}", *small,
                 f"run_dir={tmp_path / 'ft'}"]) == 0
    run = load_model(tmp_path / "ft")
    assert run.config.model.lora.rank == 16 and run.config.model.family == "llama"
    assert np.any(np.asarray(run.params["layers"]["mlp"]["down"]["lora_b"]) != 0)  # the adapters trained
    tokens = np.random.default_rng(2).integers(3, 4096, (2, 12))
    graphdef = models.model_spec(run.config.model)[0]
    ours = np.asarray(jax.jit(lambda p: models.bind(graphdef, p)(tokens)[0])(run.params))

    assert main(["convert", "jaxllm-to-hf", str(tmp_path / "ft"), str(tmp_path / "merged")]) == 0
    merged = T.LlamaForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        _close(ours, merged(input_ids=torch.tensor(tokens)).logits.numpy())
    assert main(["convert", "jaxllm-to-hf", str(tmp_path / "ft"), str(tmp_path / "adapter"), "--adapters-only"]) == 0
    base = T.LlamaForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=torch.tensor(tokens)).logits
    _close(ours, theirs.numpy())
