"""Special tokens added to a tokenizer (`Tokenizer.add_special_tokens`): one id each wherever they appear, in
both implementations; dropped by decode; persisted by files(); the same ids as transformers' add_special_tokens."""

import json
import re

import pytest

from jaxllm.config import JaxllmError
from jaxllm.data.tokenizer import (
    ADDED_TOKENS_FILE,
    load_tokenizer,
    load_tokenizer_from_files,
)
from tests.data.test_tokenizer import _hf_directory

CHATML = ["<|im_start|>", "<|im_end|>"]
TEXTS = ["<|im_start|>user\nWho begat Enos?<|im_end|>\n<|im_start|>assistant\n Seth.<|im_end|>\n",
         " And God said<|im_end|>", "<|im_end|><|im_start|>", "<|im_end|>  two spaces", "none here", "",
         "日本<|im_end|>語"]


def _check_added(tok, base_size):
    assert tok.add_special_tokens([*CHATML, CHATML[0]]) == CHATML
    assert tok.vocab_size == base_size + 2 and tok.add_special_tokens(CHATML) == []
    start, end = base_size, base_size + 1
    assert [tok.token_to_id(t) for t in CHATML] == [start, end]
    assert [tok.id_to_token(i) for i in (start, end)] == CHATML and tok.id_to_token(base_size + 2) is None
    assert {start, end} <= tok.special_ids()
    ids = [tok.encode(t) for t in TEXTS]
    assert tok.encode_batch(TEXTS) == ids
    for text, text_ids in zip(TEXTS, ids):
        found = re.findall("|".join(map(re.escape, CHATML)), text)
        assert [i for i in text_ids if i >= base_size] == [start + CHATML.index(t) for t in found]
        assert tok.decode(text_ids) == text.replace(CHATML[0], "").replace(CHATML[1], "")
        with_offsets, offsets = tok.encode_with_offsets(text)
        assert with_offsets == text_ids  # no control pieces in these texts: the same ids as encode
        assert [text[a:b] for (a, b), i in zip(offsets, with_offsets) if i >= base_size] == found
    assert tok.encode("Seth.") == tok.encode("<|im_end|>Seth.")[1:]  # the text after a token: as a text of its own
    return ids


def test_sentencepiece_added_tokens_round_trip_through_files(tmp_path):
    tok = load_tokenizer("builtin:kjv-sp4k")
    ids = _check_added(tok, 4096)
    files = tok.files()
    assert json.loads(files[ADDED_TOKENS_FILE]) == {"<|im_start|>": 4096, "<|im_end|>": 4097}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    for again in (load_tokenizer_from_files(files), load_tokenizer(str(tmp_path))):
        assert again.vocab_size == 4098 and [again.encode(t) for t in TEXTS] == ids
        assert again.files() == files


def test_hf_added_tokens_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    (tmp_path / "src").mkdir()
    directory = _hf_directory(tmp_path / "src")
    tok = load_tokenizer(str(directory))
    ids = _check_added(tok, 400)
    theirs = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert theirs.add_special_tokens({"additional_special_tokens": CHATML}) == 2
    assert [theirs(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == ids
    out = tmp_path / "out"
    out.mkdir()
    for name, blob in tok.files().items():
        (out / name).write_bytes(blob)
    assert [load_tokenizer(str(out)).encode(t) for t in TEXTS] == ids
    reloaded = transformers.AutoTokenizer.from_pretrained(str(out))
    assert [reloaded(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == ids


@pytest.mark.parametrize("token", ["", "   ", None])
def test_an_empty_added_token_is_refused(token):
    tok = load_tokenizer("builtin:kjv-sp4k")
    with pytest.raises(JaxllmError, match="an added special token must be a non-empty string, got .*; remove it from "
                                          "tokenizer.add_special_tokens"):
        tok.add_special_tokens(["<|im_start|>", token])
    assert tok.vocab_size == 4096  # nothing added


def test_a_bad_added_tokens_file_is_refused():
    model = load_tokenizer("builtin:kjv-sp4k").files()["tokenizer.model"]
    cases = [({"<x>": 4100}, "must give tokens the model lacks the ids 4096, 4097, ... after its 4096 pieces"),
             ({"</s>": 4096}, "must give tokens the model lacks"), (["<x>"], "must map each added token"),
             ("{", "is not valid JSON")]
    for added, message in cases:
        blob = added.encode() if isinstance(added, str) else json.dumps(added).encode()
        with pytest.raises(JaxllmError, match=f"tokenizer.model: {ADDED_TOKENS_FILE} {message}"):
            load_tokenizer_from_files({"tokenizer.model": model, ADDED_TOKENS_FILE: blob})


def test_added_tokens_need_contiguous_ids(tmp_path):
    """`tokenizers` numbers added tokens from its count of ids: with a hole in the vocabulary the new id would
    be an existing token's."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 3}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    with pytest.raises(JaxllmError, match=r"added tokens \['<\|im_start\|>'\] got the ids \[3\], not 4, 5, ...: its "
                                          "vocabulary's ids have holes; add the tokens to the tokenizer.json itself"):
        tok.add_special_tokens(CHATML[:1])
