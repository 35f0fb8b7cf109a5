"""`jaxllm data train-tokenizer`: a tokenizer trained on a sample of a corpus, of any size.

Kinds:
- `bpe`, `unigram`: SentencePiece (jaxllm.data.tokenizer.train_sentencepiece), written as PREFIX.model.
- `byte-bpe`: byte-level BPE as GPT-2 and LLaMA-3 (Hugging Face `tokenizers`): text split by GPT-2's regex, each
  byte a symbol (ByteLevel pre-tokenizer and decoder, no prefix space), so any text encodes without <unk>;
  special tokens <|begin_of_text|> (BOS), <|end_of_text|> (EOS), <|pad|>.
- `wordpiece`: BERT's WordPiece: BertNormalizer (lowercasing only with `lowercase`), BertPreTokenizer, `##`
  continuations; [PAD] [UNK] [CLS] [SEP] [MASK] are ids 0-4, and BertProcessing frames a text as [CLS] .. [SEP]
  (also jaxllm's BOS and EOS, so data.add_bos / add_eos frame each document the same way).
The Hugging Face kinds write OUTPUT/tokenizer.json, tokenizer_config.json and special_tokens_map.json, a directory
that `transformers.AutoTokenizer.from_pretrained` and jaxllm (`tokenizer.path: OUTPUT`) load with the same ids.

Sampling (`sample_texts`): the documents stream from the sources once; with `sample_docs` / `sample_bytes` a
uniform random sample of the documents is kept (each document draws a priority from a generator seeded by
`seed`; the documents of the lowest priorities are kept while they fit both limits: a bottom-k sample, memory
bounded by the sample) and handed to the trainer in corpus order. Without limits every document streams through.
Either way the trainer gets an iterator.
"""

from __future__ import annotations

import heapq
import json
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np

from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data.sources import make_source
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece
from jaxllm.utils import atomic_write_text

KINDS = ("bpe", "unigram", "byte-bpe", "wordpiece")
BYTE_BPE_SPECIALS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}
WORDPIECE_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                      "mask_token": "[MASK]"}  # fmt: skip


def sample_texts(sources: Sequence[SourceConfig], sample_docs: Optional[int] = None,
                 sample_bytes: Optional[int] = None, seed: int = 0) -> Iterator[str]:
    """The documents of `sources` (in order), or a uniform random sample of them within `sample_docs`
    documents and `sample_bytes` UTF-8 bytes (module docstring), in corpus order."""
    for name, limit in (("--sample-docs", sample_docs), ("--sample-bytes", sample_bytes)):
        if limit is not None and limit < 1:
            raise JaxllmError(f"{name} must be >= 1, got {limit}")
    docs = (doc["text"] for cfg in sources for doc in make_source(cfg, num_epochs=1))
    if sample_docs is None and sample_bytes is None:
        yield from docs
        return
    rng = np.random.default_rng(seed)
    kept: list[tuple[float, int, str, int]] = []  # a max-heap on priority: (-priority, index, text, bytes)
    size = 0
    for index, text in enumerate(docs):
        nbytes = len(text.encode("utf-8"))
        priority = float(rng.random())
        if sample_bytes is not None and nbytes > sample_bytes:
            continue  # could never fit
        heapq.heappush(kept, (-priority, index, text, nbytes))
        size += nbytes
        while (sample_docs is not None and len(kept) > sample_docs) or (
                sample_bytes is not None and size > sample_bytes):
            size -= heapq.heappop(kept)[3]  # the highest priority leaves
    for _, _, text, _ in sorted(kept, key=lambda item: item[1]):
        yield text


def train_tokenizer(sources: Sequence[Union[SourceConfig, str]], output: str, kind: str = "bpe",
                    vocab_size: int = 4096, *, sample_docs: Optional[int] = None, sample_bytes: Optional[int] = None,
                    min_frequency: int = 2, lowercase: bool = False, seed: int = 0) -> tuple[Tokenizer, str]:
    """Trains a tokenizer of `kind` (module docstring) on (a sample of) `sources`; returns it and where it was
    written: OUTPUT.model for SentencePiece, the directory OUTPUT for the Hugging Face kinds."""
    if kind not in KINDS:
        raise JaxllmError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")
    if vocab_size < 1:
        raise JaxllmError(f"--vocab-size must be >= 1, got {vocab_size}")
    configs = [s if isinstance(s, SourceConfig) else SourceConfig(path=s) for s in sources]
    texts = sample_texts(configs, sample_docs, sample_bytes, seed)
    if kind in ("bpe", "unigram"):
        tokenizer = train_sentencepiece(configs, output, vocab_size, model_type=kind, seed=seed, texts=texts)
        return tokenizer, f"{output}.model"
    if kind == "byte-bpe":
        rust, specials = _byte_bpe(vocab_size, min_frequency)
    else:
        rust, specials = _wordpiece(vocab_size, min_frequency, lowercase)
    rust.train_from_iterator(texts, trainer=specials.pop("trainer"))
    if rust.get_vocab_size() <= len(specials):
        raise JaxllmError(f"{', '.join(s.path for s in configs)} gave no text to train on; check the paths and "
                          "--text-field")  # fmt: skip
    if kind == "wordpiece":
        from tokenizers import processors

        cls, sep = specials["cls_token"], specials["sep_token"]
        rust.post_processor = processors.BertProcessing((sep, rust.token_to_id(sep)), (cls, rust.token_to_id(cls)))
    out = Path(output).expanduser()
    atomic_write_text(out / "tokenizer.json", rust.to_str(pretty=True))
    named = {k: v for k, v in specials.items() if k.endswith("_token")}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **named}
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(named, indent=2, ensure_ascii=False) + "\n")
    return load_tokenizer(str(out)), str(out)


def _byte_bpe(vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    rust.decoder = decoders.ByteLevel()
    rust.post_processor = processors.ByteLevel(trim_offsets=False)
    names = list(BYTE_BPE_SPECIALS.values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=names,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    return rust, {**BYTE_BPE_SPECIALS, "trainer": trainer}


def _wordpiece(vocab_size: int, min_frequency: int, lowercase: bool):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    rust = RustTokenizer(models.WordPiece(unk_token=WORDPIECE_SPECIALS["unk_token"]))
    rust.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                 lowercase=lowercase)  # fmt: skip
    rust.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rust.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                        special_tokens=list(WORDPIECE_SPECIALS.values()))  # fmt: skip
    # jaxllm frames documents with bos/eos: BERT's [CLS] .. [SEP]
    return rust, {**WORDPIECE_SPECIALS, "bos_token": "[CLS]", "eos_token": "[SEP]", "trainer": trainer}
