"""Tokenizer training: byte-level BPE and WordPiece written as Hugging Face directories that transformers loads with
the ids of `tokenizers` and of jaxllm's Tokenizer; sampling a corpus without holding it."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.config import DataConfig, JaxllmError, SourceConfig
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.sources import builtin_path
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.dataprep.tokenizer_train import sample_texts, train_tokenizer

ODD = ["naïve café résumé", "日本語のテキストです。", "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧",
       "  two  spaces\n\ttab\r\nend  ", "Ünïcödé ÅÄÖ ß ǅ", "e\u0301 combining", "مرحبا بالعالم",
       "don't stop—it's 12,345.678!", "", " ", "\n\n",
       "<|end_of_text|> [SEP] written in text", "ﬁ ligature ＦＵＬＬＷＩＤＴＨ", "a" * 300]  # fmt: skip


@pytest.fixture(scope="module")
def strings():
    """A few hundred strings: held-out verses (kjv-valid) plus odd unicode."""
    with gzip.open(builtin_path("kjv-valid"), "rt", encoding="utf-8") as f:
        lines = [line for doc in map(json.loads, f) for line in doc["text"].split("\n") if line]
    return lines[:300] + ODD


@pytest.fixture(scope="module", params=["byte-bpe", "wordpiece"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "tok"
    tokenizer, path = train_tokenizer(["builtin:kjv"], str(out), request.param, 1000, sample_docs=150, seed=1)
    return request.param, tokenizer, path


def test_transformers_tokenizers_and_jaxllm_give_the_same_ids(trained, strings):
    from tokenizers import Tokenizer as RustTokenizer
    from transformers import AutoTokenizer

    kind, ours, path = trained
    assert sorted(p.name for p in Path(path).iterdir()) == ["special_tokens_map.json", "tokenizer.json",
                                                            "tokenizer_config.json"]
    theirs, rust = AutoTokenizer.from_pretrained(path), RustTokenizer.from_file(f"{path}/tokenizer.json")
    assert ours.vocab_size == len(theirs) == rust.get_vocab_size() == 1000
    for text in strings:
        ids = rust.encode(text, add_special_tokens=False).ids
        assert theirs(text, add_special_tokens=False)["input_ids"] == ids == ours.encode(text), text
        assert theirs(text)["input_ids"] == rust.encode(text).ids, text  # the post-processor too
        if kind == "byte-bpe" and "<|" not in text:  # (a special token's text is its id, dropped by decode)
            assert ours.decode(ours.encode(text)) == text  # byte-level: nothing is lost, nothing is <unk>
    if kind == "byte-bpe":
        assert (ours.bos_id, ours.eos_id, ours.pad_id) == (0, 1, 2) and theirs.bos_token == "<|begin_of_text|>"
    else:
        assert [ours.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
        assert (ours.bos_id, ours.eos_id, ours.pad_id) == (2, 3, 0)
        assert theirs("in the beginning")["input_ids"][0] == 2 and theirs("in the beginning")["input_ids"][-1] == 3
        assert ours.encode("In the beginning God") == theirs("In the beginning God", add_special_tokens=False)[
            "input_ids"] and "[UNK]" not in theirs.tokenize("In the beginning God")  # fmt: skip


def test_the_data_pipeline_uses_a_trained_directory(trained):
    _, tokenizer, path = trained
    cfg = DataConfig(sources=[SourceConfig(path="builtin:kjv-valid")], seq_len=64, shuffle_window=0, prefetch=0)
    pipeline = make_pipeline(cfg, load_tokenizer(path), batch_size=2)
    batch = next(pipeline)
    pipeline.close()
    first = next(iter(sample_texts([SourceConfig(path="builtin:kjv-valid")])))
    expected = [tokenizer.bos_id, *tokenizer.encode(first)][:65]
    np.testing.assert_array_equal(batch["inputs"][0], expected[:64])
    np.testing.assert_array_equal(batch["targets"][0], expected[1:65])


def test_sampling_keeps_a_bounded_uniform_sample_in_corpus_order():
    everything = list(sample_texts([SourceConfig(path="builtin:kjv-valid")]))
    sample = list(sample_texts([SourceConfig(path="builtin:kjv-valid")], sample_docs=7, seed=0))
    assert len(sample) == 7 and sample == [t for t in everything if t in sample]  # a subset, in corpus order
    again = list(sample_texts([SourceConfig(path="builtin:kjv-valid")], sample_docs=7, seed=0))
    other = list(sample_texts([SourceConfig(path="builtin:kjv-valid")], sample_docs=7, seed=1))
    assert again == sample != other
    budget = 20_000
    by_bytes = list(sample_texts([SourceConfig(path="builtin:kjv-valid")], sample_bytes=budget, seed=0))
    size = sum(len(t.encode()) for t in by_bytes)
    assert size <= budget and size > budget - max(len(t.encode()) for t in everything) and len(by_bytes) > 1
    positions = [everything.index(t) for t in by_bytes]
    assert positions == sorted(positions) and positions[-1] - positions[0] > len(everything) // 2  # spread out
    with pytest.raises(JaxllmError, match="--sample-docs must be >= 1, got 0"):
        list(sample_texts([SourceConfig(path="builtin:kjv-valid")], sample_docs=0))


def test_the_trainer_gets_an_iterator(monkeypatch, tmp_path):
    import jaxllm.dataprep.tokenizer_train as module

    seen, real = [], module._byte_bpe
    monkeypatch.setattr(module, "_byte_bpe", lambda *args: (_Proxy(real(*args)[0], seen), real(*args)[1]))
    train_tokenizer(["builtin:kjv-valid"], str(tmp_path / "tok"), "byte-bpe", 400)
    assert seen == ["generator"]  # streamed, never a list of the corpus


class _Proxy:
    """A tokenizers.Tokenizer that notes the type of what train_from_iterator gets."""

    def __init__(self, rust, seen):
        object.__setattr__(self, "_rust", rust)
        object.__setattr__(self, "_seen", seen)

    def train_from_iterator(self, iterator, *args, **kwargs):
        self._seen.append(type(iterator).__name__)
        return self._rust.train_from_iterator(iterator, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._rust, name)

    def __setattr__(self, name, value):
        setattr(self._rust, name, value)


def test_cli_trains_each_kind(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("\n\n".join(f"paragraph {i}: the quick brown fox jumps over the lazy dog."
                                                for i in range(200)))  # fmt: skip
    assert main(["data", "train-tokenizer", "--input", str(tmp_path / "c.txt"), "--vocab-size", "300", "--model-type",
                 "wordpiece", "--output", str(tmp_path / "wp"), "--sample-docs", "50", "--lowercase"]) == 0
    assert f"tokenizer.path={tmp_path / 'wp'}" in capsys.readouterr().out
    assert load_tokenizer(str(tmp_path / "wp")).encode("THE QUICK") == load_tokenizer(str(tmp_path / "wp")).encode(
        "the quick")  # fmt: skip
    assert main(["data", "train-tokenizer", "--input", str(tmp_path / "c.txt"), "--vocab-size", "300",
                 "--output", str(tmp_path / "sp"), "--sample-bytes", "3000"]) == 0  # SentencePiece, sampled
    sp = load_tokenizer(str(tmp_path / "sp.model"))
    assert sp.vocab_size == 300 and sp.decode(sp.encode("the lazy dog")) == "the lazy dog"
    assert np.unique(sp.encode("paragraph 7: the quick brown fox")).size > 3
