"""`jaxllm convert` both ways from the command line, sharded bfloat16 export, and clear refusals."""

import json

import numpy as np
import pytest
import torch
import transformers as T
from safetensors.numpy import load_file, save_file

from jaxllm.cli import main
from jaxllm.config import GenerateConfig
from jaxllm.convert.hf import from_hf
from jaxllm.infer.generate import generate
from jaxllm.infer.load import load_model


def _tiny_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    )


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_llama")
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # sharper distributions: greedy choices far from ties
    model.save_pretrained(directory, safe_serialization=True)
    _tiny_tokenizer(directory)
    return directory, model


def test_hf_to_jaxllm_then_generate_matches_transformers_greedy(hf_llama, tmp_path, capsys):
    hf_dir, hf_model = hf_llama
    out = tmp_path / "run"
    assert main(["convert", "hf-to-jaxllm", str(hf_dir), str(out)]) == 0
    loaded = load_model(out)
    assert loaded.tokenizer is not None and loaded.config.model.family == "llama"
    prompt = [1, 10, 11, 12, 13]
    ours = generate(loaded.graphdef, loaded.params, loaded.config.model, [prompt],
                    GenerateConfig(max_new_tokens=10, temperature=0.0), eos_id=None, pad_id=0)[0]
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(out), "--prompt", "w6 w7 w8", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("w6 w7 w8")


def test_jaxllm_to_hf_sharded_bfloat16(hf_llama, tmp_path):
    hf_dir, hf_model = hf_llama
    run = tmp_path / "run"
    assert main(["convert", "hf-to-jaxllm", str(hf_dir), str(run)]) == 0
    out = tmp_path / "exported"
    assert main(["convert", "jaxllm-to-hf", str(run), str(out), "--dtype", "bfloat16", "--max-shard-gb", "0.000004"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((out / s).is_file() for s in shards)
    assert (out / "tokenizer.json").is_file()
    reloaded = T.LlamaForCausalLM.from_pretrained(out).eval()
    assert reloaded.dtype == torch.bfloat16
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    import copy

    rounded = copy.deepcopy(hf_model)
    with torch.no_grad():
        for p in rounded.parameters():  # the original weights rounded to bfloat16, computed in float32
            p.copy_(p.to(torch.bfloat16).float())
        expected = rounded(ids).logits.numpy()
        got = reloaded.float()(ids).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # bfloat16 back in: our params equal the bf16 tensors exactly.
    back = from_hf(out)
    assert back.config.param_dtype == "bfloat16"
    q = np.asarray(back.params["layers"]["attn"]["q"]["kernel"][0].astype(np.float32))
    shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    stored = load_file(out / shard)["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    np.testing.assert_array_equal(q, stored.T.reshape(q.shape))


def _edit(hf_dir, tmp_path, config_edit=None, tensors_edit=None):
    target = tmp_path / "edited"
    target.mkdir()
    config = json.loads((hf_dir / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (target / "config.json").write_text(json.dumps(config))
    tensors = load_file(hf_dir / "model.safetensors")
    if tensors_edit:
        tensors_edit(tensors)
    if tensors is not None:
        save_file(tensors, target / "model.safetensors")
    return target


@pytest.mark.parametrize(
    "config_edit, tensors_edit, message",
    [
        (lambda c: c.update(model_type="gpt_neox"), None, "model_type 'gpt_neox' is not supported; jaxllm converts"),
        (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), None,
         "rope scaling type 'yarn' is not supported"),
        (lambda c: c.update(hidden_act="gelu"), None, "hidden_act='gelu' is not supported"),
        (None, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}),
         "tensors jaxllm does not use (model.layers.0.mlp.extra.weight)"),
        (None, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"),
         "tensor 'model.layers.1.self_attn.k_proj.weight' is missing"),
    ],
)
def test_unsupported_checkpoints_are_refused(hf_llama, tmp_path, capsys, config_edit, tensors_edit, message):
    edited = _edit(hf_llama[0], tmp_path, config_edit, tensors_edit)
    assert main(["convert", "hf-to-jaxllm", str(edited), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_pickle_checkpoints_are_never_loaded(hf_llama, tmp_path, capsys):
    target = tmp_path / "pickled"
    target.mkdir()
    (target / "config.json").write_text((hf_llama[0] / "config.json").read_text())
    (target / "pytorch_model.bin").write_bytes(b"not even read")
    assert main(["convert", "hf-to-jaxllm", str(target), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "PyTorch pickles, which jaxllm never loads" in err and "safe_serialization=True" in err


def test_weights_only_model_converts_loads_and_generates_with_a_given_tokenizer(hf_llama, tmp_path, capsys, caplog):
    hf_dir, _ = hf_llama
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((hf_dir / name).read_bytes())
    run = tmp_path / "run"
    assert main(["convert", "hf-to-jaxllm", str(bare), str(run)]) == 0
    loaded = load_model(run)
    assert loaded.tokenizer is None and loaded.tokenizer_files == {}
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(run), "--prompt", "w6 w7 w8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "carries no tokenizer; pass --tokenizer PATH" in err[0], err
    caplog.clear()
    assert main(["generate", "--run-dir", str(run), "--prompt", "w6 w7 w8", "--max-new-tokens", "4",
                 "--temperature", "0", "--tokenizer", str(hf_dir)]) == 0
    assert capsys.readouterr().out.startswith("w6 w7 w8")
    noise = [r.getMessage() for r in caplog.records if "read only" in r.getMessage() or "read_only" in r.getMessage()]
    assert not noise
    out = tmp_path / "hf"
    assert main(["convert", "jaxllm-to-hf", str(run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_a_tokenizer_larger_than_the_model_is_refused(hf_llama, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["convert", "hf-to-jaxllm", str(hf_llama[0]), str(run)]) == 0
    capsys.readouterr()
    assert main(["generate", "--run-dir", str(run), "--prompt", "And", "--tokenizer", "builtin:kjv-sp4k"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tokenizer builtin:kjv-sp4k has 4096 tokens but the model only 64" in err[0], err
