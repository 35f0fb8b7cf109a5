"""Tokenizers: the bundled SentencePiece model, Hugging Face directories, files() round trips, training."""

import json

import pytest

from tests.data.data_testing import read_docs, write_jsonl
from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data import ASSETS
from jaxllm.data.tokenizer import load_tokenizer, load_tokenizer_from_files, train_sentencepiece

ODD_TEXTS = [
    "  two leading spaces, two  inner, two trailing  ",
    "tabs\tand\nnewlines\r\nand a blank line\n\nend",
    "Ünïcödé, 日本語, a ligature ﬁ, an emoji 😀, digits 1234567890",
    "",
]


@pytest.fixture(scope="module")
def kjv_tokenizer():
    return load_tokenizer("builtin:kjv-sp4k")


def test_builtin_layout(kjv_tokenizer):
    tok = kjv_tokenizer
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (4096, 0, 2, 3)
    assert tok.encode("") == []


def test_builtin_round_trips_corpus_and_odd_text(kjv_tokenizer):
    docs = read_docs("builtin:kjv-valid") + ODD_TEXTS
    ids = kjv_tokenizer.encode_batch(docs)
    assert [kjv_tokenizer.decode(i) for i in ids] == docs
    assert ids[0] == kjv_tokenizer.encode(docs[0])
    assert 1 not in {i for seq in ids for i in seq}  # byte fallback: never <unk>
    # A trained vocabulary, not bytes: about 4 characters per token on this text.
    assert sum(map(len, docs[:24])) / sum(map(len, ids[:24])) > 3.5


def test_sentencepiece_files_and_paths(kjv_tokenizer, tmp_path):
    files = kjv_tokenizer.files()
    assert list(files) == ["tokenizer.model"]
    text = "And God said, Let there be light."
    again = load_tokenizer_from_files(files)
    assert again.encode(text) == kjv_tokenizer.encode(text)
    (tmp_path / "tokenizer.model").write_bytes(files["tokenizer.model"])
    assert load_tokenizer(str(tmp_path)).encode(text) == kjv_tokenizer.encode(text)  # a directory
    assert load_tokenizer(str(ASSETS / "kjv-sp4k.model")).vocab_size == 4096  # a .model file


def _hf_directory(tmp_path, with_config=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(read_docs("builtin:kjv-valid"), trainer)
    # Like Llama's: the post-processor prepends <s>; jaxllm must not (the pipeline adds BOS itself).
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(tmp_path / "tokenizer.json"))
    if with_config:
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<s>",
            "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False},
        }
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return tmp_path


def test_hf_directory(tmp_path):
    tok = load_tokenizer(str(_hf_directory(tmp_path)))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 400)
    for text in ["And God said, Let there be light.", *ODD_TEXTS]:
        ids = tok.encode(text)
        assert 1 not in ids[:1] or text.startswith("<s>")  # no BOS added by encode
        assert tok.decode(ids) == text
    assert tok.encode_batch(ODD_TEXTS) == [tok.encode(t) for t in ODD_TEXTS]
    assert tok.decode([1, *tok.encode("light"), 2]) == "light"  # special tokens dropped


def test_hf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = _hf_directory(tmp_path)
    ours = load_tokenizer(str(directory))
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    text = "For God so loved the world, 1234 times."
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]


def test_hf_without_config_has_no_special_ids_and_sane_pad(tmp_path):
    tok = load_tokenizer(str(_hf_directory(tmp_path, with_config=False)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, None, 0)
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))  # a tokenizer.json file works too
    assert tok.decode(tok.encode("In the beginning")) == "In the beginning"


def test_hf_files_round_trip(tmp_path):
    tok = load_tokenizer(str(_hf_directory(tmp_path)))
    files = tok.files()
    assert set(files) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    again = load_tokenizer_from_files(files)
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 0)
    assert again.encode("Behold, I come quickly") == tok.encode("Behold, I come quickly")


@pytest.mark.parametrize(
    "path, message",
    [
        ("/no/such/tokenizer.model", "tokenizer /no/such/tokenizer.model does not exist; expected a SentencePiece"),
        ("builtin:gpt9", "unknown tokenizer builtin:gpt9; the built-in tokenizers are builtin:kjv-sp4k"),
    ],
)
def test_load_errors_name_the_path(path, message):
    with pytest.raises(JaxllmError, match=message):
        load_tokenizer(path)


def test_load_errors_for_bad_directories_and_files(tmp_path):
    with pytest.raises(JaxllmError, match=f"{tmp_path} holds neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(JaxllmError, match="junk.model is not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"))
    with pytest.raises(JaxllmError, match="expected tokenizer.json or tokenizer.model"):
        load_tokenizer_from_files({"vocab.txt": b""})


def test_train_sentencepiece_on_a_small_corpus(tmp_path):
    docs = read_docs("builtin:kjv-valid")
    write_jsonl(tmp_path / "a.jsonl", docs[:12])
    (tmp_path / "b.txt").write_text("\n\n".join(docs[12:]))
    sources = [str(tmp_path / "a.jsonl"), SourceConfig(path=str(tmp_path / "b.txt"), text_unit="paragraph")]
    tok = train_sentencepiece(sources, str(tmp_path / "out" / "sp"), vocab_size=600, model_type="unigram")
    assert (tmp_path / "out" / "sp.model").is_file() and not (tmp_path / "out" / "sp.vocab").exists()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (600, 0, 2, 3)
    for text in docs[:3] + ODD_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    again = train_sentencepiece(sources, str(tmp_path / "again"), vocab_size=600, model_type="unigram")
    assert again.files() == tok.files()  # seeded: the same corpus gives the same model
    bpe = train_sentencepiece(sources[:1], str(tmp_path / "bpe"), vocab_size=400, max_documents=4)
    assert bpe.vocab_size == 400 and bpe.decode(bpe.encode(docs[0])) == docs[0]


def test_hf_tokenizer_ignores_padding_and_truncation_in_the_file(tmp_path):
    """A tokenizer.json that pads to a fixed length (sentence-transformers models do) must still
    encode a text to exactly its tokens."""
    import json

    from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers

    from jaxllm.data.tokenizer import load_tokenizer

    tok = RustTokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.enable_padding(length=16, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=2)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("a b a") == [2, 3, 2]


def test_token_lookup_and_special_ids(kjv_tokenizer, tmp_path):
    # Objectives look up mask and sentinel pieces, and never draw special ids as random tokens.
    assert kjv_tokenizer.token_to_id("▁God") == kjv_tokenizer.encode("God")[0]
    assert kjv_tokenizer.token_to_id("<mask>") is None and kjv_tokenizer.token_to_id("<extra_id_0>") is None
    assert kjv_tokenizer.special_ids() == {0, 1, 2, 3}  # pad, unk, bos, eos
    hf = load_tokenizer(str(_hf_directory(tmp_path)))
    assert (hf.token_to_id("</s>"), hf.token_to_id("<mask>")) == (2, None)
    assert hf.special_ids() == {0, 1, 2, 3}  # <pad> <s> </s> <unk>, special tokens of the tokenizer.json
