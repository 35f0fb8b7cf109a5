"""An exported Hugging Face directory tokenizes as the trainer did: `AutoTokenizer(text)["input_ids"]`
equals [BOS] + encode(text) + [EOS] by the run's data.add_bos / data.add_eos, for the bundled
SentencePiece tokenizer and for a tokenizer.json; and it holds no checkpoint-library files."""

import json
from pathlib import Path

import pytest
import torch
import transformers as T

from jaxllm.cli import main
from jaxllm.config import DataConfig
from jaxllm.convert.hf_tokenizer import hf_tokenizer_files
from jaxllm.data.tokenizer import HFTokenizer, load_tokenizer
from jaxllm.infer.load import load_model
from tests.train.test_loop import MICRO

TINY = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
TEXTS = ["And God said", " leading space", "trailing space ", "  two  spaces  ", "line\nnext\n\n", "\ttab\r\n",
         "12345 digits 2024.", "naïve café, Ελληνικά, 日本語 🙂", "", " ", "<s> literal </s>", "Amen.\n"]


def _framed(tokenizer, data, text):
    return [tokenizer.bos_id] * data.add_bos + tokenizer.encode(text) + [tokenizer.eos_id] * data.add_eos


def _hf_ids(directory, texts):
    tok = T.AutoTokenizer.from_pretrained(directory)
    return [tok(t)["input_ids"] for t in texts]


def test_sentencepiece_run_exports_a_tokenizer_with_the_trainers_ids(tmp_path):
    run = tmp_path / "run"
    assert main(["train", TINY, *MICRO, "train.steps=2", "checkpoint.every=2", "train.sample_prompt=",
                 "eval.sources=[]", f"run_dir={run}"]) == 0
    out = tmp_path / "hf"
    assert main(["convert", "jaxllm-to-hf", str(run), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "tokenizer.model", "tokenizer_config.json"]
    loaded = load_model(run)
    assert loaded.config.data.add_bos and loaded.config.data.add_eos
    assert _hf_ids(out, TEXTS) == [_framed(loaded.tokenizer, loaded.config.data, t) for t in TEXTS]
    tok = T.AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (2, 3, 0)
    assert tok.decode(tok("And God said")["input_ids"], skip_special_tokens=True) == "And God said"


@pytest.mark.parametrize("add_bos, add_eos", [(True, True), (False, True), (True, False), (False, False)])
def test_sentencepiece_framing_follows_the_data_config(tmp_path, add_bos, add_eos):
    tokenizer, data = load_tokenizer("builtin:kjv-sp4k"), DataConfig(add_bos=add_bos, add_eos=add_eos)
    for name, blob in hf_tokenizer_files(tokenizer, data).items():
        (tmp_path / name).write_bytes(blob)
    assert _hf_ids(tmp_path, TEXTS) == [_framed(tokenizer, data, t) for t in TEXTS]


def _bpe_tokenizer(directory: Path, post_bos: bool) -> None:
    """A byte-level BPE tokenizer.json whose own post-processor adds BOS (as LLaMA-3's does) and
    which pads to 16: the export must frame ids as the trainer did regardless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["In the beginning God created the heaven and the earth.", "And God said, Let there be light."] * 20,
                            trainer)
    if post_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=16)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "LlamaTokenizerFast",
              "add_bos_token": True, "add_eos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_tokenizer_json_run_exports_the_trainers_ids(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    T.LlamaForCausalLM(config).save_pretrained(src, safe_serialization=True)
    _bpe_tokenizer(src, post_bos=True)
    run, out = tmp_path / "run", tmp_path / "hf"
    assert main(["convert", "hf-to-jaxllm", str(src), str(run)]) == 0
    assert main(["convert", "jaxllm-to-hf", str(run), str(out)]) == 0
    assert "commit_success.txt" not in {p.name for p in out.iterdir()}
    loaded = load_model(run)
    assert isinstance(loaded.tokenizer, HFTokenizer)
    assert _hf_ids(out, TEXTS) == [_framed(loaded.tokenizer, loaded.config.data, t) for t in TEXTS]
    for add_bos, add_eos in [(False, True), (False, False)]:
        data, other = DataConfig(add_bos=add_bos, add_eos=add_eos), tmp_path / f"hf-{add_bos}-{add_eos}"
        other.mkdir()
        for name, blob in hf_tokenizer_files(loaded.tokenizer, data).items():
            (other / name).write_bytes(blob)
        assert _hf_ids(other, TEXTS) == [_framed(loaded.tokenizer, data, t) for t in TEXTS]
