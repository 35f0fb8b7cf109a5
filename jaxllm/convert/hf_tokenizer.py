"""Tokenizer files for an exported Hugging Face directory.

A run's tokenizer `encode`s without special tokens; the trainer framed every document as
[BOS] + tokens + [EOS] by `data.add_bos` / `data.add_eos`. The exported `tokenizer.json` carries that
framing as its post-processor and `tokenizer_config.json` names the special tokens, so
`transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]` is exactly what the model was
trained on. A SentencePiece model gets a `tokenizer.json` written here with the `tokenizers` library
(transformers' own conversion drops the dummy-prefix "▁" of text that starts with a space, so its ids
differ); its `tokenizer.model` goes along for tools that want it. One difference remains for unigram
models only: text that spells a control token ("<s>") may come out as that token, where SentencePiece
spells it in characters (BPE models match SentencePiece there too).

Tokens added to a run's tokenizer (`Tokenizer.add_special_tokens`) keep their ids. A SentencePiece run's
(from its `added_tokens.json`) are written into `tokenizer.json` as tokens that are not "special" to the
`tokenizers` library (else `split_special_tokens`, which spells `<s>` in characters, would spell them too)
and named in `tokenizer_config.json`'s `extra_special_tokens` (transformers' `all_special_ids` has them).
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE, Unigram

from jaxllm.config import DataConfig
from jaxllm.data.tokenizer import SentencePieceTokenizer, Tokenizer

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6  # SentencePiece piece types
_UNIGRAM, _BPE = 1, 2  # SentencePiece model types


def hf_tokenizer_files(tokenizer: Tokenizer, data: DataConfig) -> dict[str, bytes]:
    """tokenizer.json + tokenizer_config.json (+ the tokenizer's own files) for an HF export."""
    files = tokenizer.files()
    if isinstance(tokenizer, SentencePieceTokenizer):
        fast, config = sentencepiece_to_tokenizers(files["tokenizer.model"]), {}
        added = [tokenizer.id_to_token(i) for i in range(fast.get_vocab_size(), tokenizer.vocab_size)]
        fast.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
        if added:
            config["extra_special_tokens"] = added
    else:
        fast = RustTokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        config = json.loads(files.get("tokenizer_config.json", b"{}"))
    fast.no_padding()  # jaxllm's encode never pads or truncates; neither may theirs
    fast.no_truncation()
    bos = fast.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else None
    eos = fast.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
    framing = ([bos] if data.add_bos and bos else []), ([eos] if data.add_eos and eos else [])
    special = [(t, fast.token_to_id(t)) for t in (bos, eos) if t]
    fast.post_processor = processors.TemplateProcessing(
        single=[*framing[0], "$A:0", *framing[1]],
        pair=[*framing[0], "$A:0", *framing[1], *[f"{t}:1" for t in framing[0]], "$B:1", *[f"{t}:1" for t in framing[1]]],
        special_tokens=special,
    )
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",  # tokenizer.json as written, no class-specific rebuilding
        bos_token=bos, eos_token=eos, pad_token=fast.id_to_token(tokenizer.pad_id),
        add_bos_token=bool(framing[0]), add_eos_token=bool(framing[1]),
    )
    if isinstance(tokenizer, SentencePieceTokenizer):
        config["unk_token"] = next((t for t, i in _special_pieces(files["tokenizer.model"]) if i == _UNKNOWN), None)
        config["split_special_tokens"] = True  # SentencePiece reads "<s>" in text as characters
    return {**files, "tokenizer.json": fast.to_str().encode(), "tokenizer_config.json": json.dumps(config, indent=2).encode()}


def _proto(model: bytes) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2.ModelProto.FromString(model)


def _special_pieces(model: bytes) -> list[tuple[str, int]]:
    return [(p.piece, p.type) for p in _proto(model).pieces if p.type in (_UNKNOWN, _CONTROL, _USER_DEFINED)]


def sentencepiece_to_tokenizers(model: bytes) -> RustTokenizer:
    """A `tokenizers.Tokenizer` giving the ids of the SentencePiece `model` (BPE or unigram)."""
    proto = _proto(model)
    pieces = list(proto.pieces)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    unk = next(i for i, p in enumerate(pieces) if p.type == _UNKNOWN)
    if trainer.model_type == _BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        mergeable = {p.piece for p in pieces if p.type == _NORMAL}
        merges: list[tuple[str, str, float]] = []
        for p in pieces:  # as transformers' SentencePieceExtractor: every split of a piece into two pieces
            if p.type != _NORMAL:
                continue
            local = [(p.piece[:k], p.piece[k:], p.score) for k in range(1, len(p.piece))
                     if p.piece[:k] in mergeable and p.piece[k:] in mergeable]
            merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.sort(key=lambda m: -m[2])  # stable: higher-scored pieces merge first
        fast = RustTokenizer(BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=pieces[unk].piece,
                                 byte_fallback=trainer.byte_fallback, fuse_unk=True))
    elif trainer.model_type == _UNIGRAM:
        fast = RustTokenizer(Unigram([(p.piece, p.score) for p in pieces], unk, byte_fallback=trainer.byte_fallback))
    else:
        raise ValueError(f"SentencePiece model type {trainer.model_type} is neither BPE nor unigram")
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    fast.normalizer = normalizers.Sequence(steps)
    fast.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []),
    ])
    fast.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in _special_pieces(model)
                             if kind != _USER_DEFINED])
    fast.add_tokens([AddedToken(t, normalized=False) for t, kind in _special_pieces(model) if kind == _USER_DEFINED])
    return fast
