"""Tokenizers: SentencePiece `.model` files and Hugging Face `tokenizer.json` directories, behind one small class.

`encode` never adds special tokens: the pipeline adds BOS/EOS itself (data.add_bos / data.add_eos),
so a tokenizer.json whose post-processor would prepend BOS cannot double it. `decode` drops special
tokens. Ids absent from a tokenizer are None (`bos_id`, `eos_id`); `pad_id` is always an int: the
tokenizer's pad token, else EOS, else 0 (padded positions are masked out of the loss, so any valid id
is safe there).

`add_special_tokens` adds tokens (a chat template's `<|im_start|>`) the vocabulary lacks, as new ids after
its last one; wherever an added token appears in a text it is one id (the text is split on added tokens
first, as transformers does), and `decode` drops it. A SentencePiece model keeps its added tokens in
`added_tokens.json` (transformers' convention: token -> id) beside `tokenizer.model`; a Hugging Face
tokenizer in its `tokenizer.json` (the `tokenizers` library's own special tokens).

`files()` returns the files that rebuild a tokenizer (`tokenizer.model` [+ `added_tokens.json`], or
`tokenizer.json` plus its config files) so it can travel inside a checkpoint; `load_tokenizer_from_files`
rebuilds it.
"""

from __future__ import annotations

import abc
import io
import json
import os
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import sentencepiece as spm

from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data import ASSETS
from jaxllm.utils import atomic_write_bytes

BUILTIN_TOKENIZERS = {"kjv-sp4k": "kjv-sp4k.model"}
_HF_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
ADDED_TOKENS_FILE = "added_tokens.json"  # a SentencePiece model's added tokens, {token: id} (transformers' name)
SPECIAL_TOKEN_NAMES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")  # transformers' `{name}_token`


class Tokenizer(abc.ABC):
    """What the rest of jaxllm uses of a tokenizer; see the module docstring for special-token rules.
    Implementations: SentencePieceTokenizer, HFTokenizer."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS (the data pipeline adds those)."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`, special tokens dropped."""

    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    # The source of the chat template that travels with the tokenizer (a Hugging Face directory's
    # chat_template.jinja or tokenizer_config.json `chat_template`, or the one a run trained with); files()
    # saves it as chat_template.jinja.
    chat_template: Optional[str] = None

    @property
    def pad_id(self) -> int:
        pad = self._pad_id()
        return pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def _pad_id(self) -> Optional[int]:
        return None

    def token_to_id(self, token: str) -> Optional[int]:
        """The id of `token` when the vocabulary has it as one piece (e.g. `<mask>`), else None."""
        return None

    def id_to_token(self, i: int) -> Optional[str]:
        """The piece of id `i` (an added token's text), None outside the vocabulary."""
        return None

    def add_special_tokens(self, tokens: Sequence[str]) -> list[str]:
        """Adds those of `tokens` the vocabulary lacks, in order, as ids vocab_size, vocab_size + 1, ...
        (`vocab_size` grows) and returns them; a token it has keeps its id and its role. An added token is
        one id wherever it appears in a text (encode, encode_batch, encode_with_offsets), `decode` drops
        it, and `special_ids` and `files()` include it."""
        for token in tokens:
            if not isinstance(token, str) or not token.strip():
                raise JaxllmError(f"an added special token must be a non-empty string, got {token!r}; remove it from "
                                  "tokenizer.add_special_tokens")  # fmt: skip
        new = [t for t in dict.fromkeys(tokens) if self.token_to_id(t) is None]
        if new:
            self._add(new)
        return new

    def _add(self, tokens: list[str]) -> None:
        """Appends `tokens` (new to the vocabulary, distinct) as ids vocab_size, vocab_size + 1, ..."""
        raise JaxllmError(f"{type(self).__name__} cannot add tokens; special tokens need a SentencePiece or Hugging "
                          "Face tokenizer")  # fmt: skip

    def special_tokens(self) -> dict[str, str]:
        """The special tokens by transformers' names (`bos_token`, `eos_token`, ...: what chat templates
        see), as strings; those the tokenizer lacks are absent."""
        return {}

    def special_ids(self) -> set[int]:
        """Ids that never stand for text (BOS, EOS, pad, control tokens): objectives never draw them at random."""
        return {i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None}

    @abc.abstractmethod
    def files(self) -> dict[str, bytes]:
        """The files that recreate this tokenizer (name -> bytes): they travel with checkpoints."""

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and each token's (start, end) character span in `text`. Unlike `encode`,
        special tokens written in the text (a chat template's `<|im_end|>`, `</s>`) become their own ids, as
        in transformers; chat templates (jaxllm.data.chat) need this."""
        raise JaxllmError(f"{type(self).__name__} gives no token offsets; chat templates need a SentencePiece "
                          "or Hugging Face tokenizer")

    def encode_rendered(self, text: str) -> list[int]:
        """Token ids of a chat template's output: the special tokens the template writes (`</s>`, `<|im_end|>`)
        become their ids, as transformers' `apply_chat_template(tokenize=True)` and training (jaxllm.data.chat)
        give them; `encode` would read them as plain characters, as it must for a document's text."""
        return self.encode_with_offsets(text)[0]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, kept as its serialised bytes (the `.model` file) so `files()` is exact, plus
    the tokens added after its pieces (`added_tokens`, ids from the model's piece count on).

    Added tokens split a text into parts that are encoded as separate texts, each with SentencePiece's dummy
    prefix ("▁"): transformers' legacy SentencePiece tokenizers do so, and the `tokenizer.json` an export
    writes (jaxllm.convert.hf_tokenizer) gives the same ids. `decode` undoes it part by part, so
    decode(encode(text)) is the text without its added tokens."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece", added_tokens: Optional[dict[str, int]] = None):
        self.name = name
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except (RuntimeError, OSError) as e:
            raise JaxllmError(f"{name} is not a SentencePiece model ({e}); expected a .model file") from None
        self._added: dict[str, int] = {}
        self._added_pattern: Optional[re.Pattern] = None
        if added_tokens:
            self.add_special_tokens(sorted(added_tokens, key=added_tokens.get))
            if self._added != added_tokens:
                n = self._sp.get_piece_size()
                raise JaxllmError(f"{name}: {ADDED_TOKENS_FILE} must give tokens the model lacks the ids {n}, {n + 1}, "
                                  f"... after its {n} pieces, got {added_tokens!r:.120}")  # fmt: skip

    def _add(self, tokens: list[str]) -> None:
        for token in tokens:
            self._added[token] = self.vocab_size
        self._added_pattern = _split_pattern(self._added)
        self._controls = None  # encode_with_offsets splits on added tokens too

    def _parts(self, text: str) -> list[str]:
        """`text` split on added tokens (kept as parts of their own), empty parts dropped."""
        if self._added_pattern is None:
            return [text] if text else []
        return [p for p in self._added_pattern.split(text) if p]

    def encode(self, text: str) -> list[int]:
        if not self._added:
            return self._sp.encode(text)
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        threads = min(4, os.cpu_count() or 1)
        if not self._added:
            return self._sp.encode(list(texts), num_threads=threads)
        parts = [self._parts(t) for t in texts]
        plain = [p for ps in parts for p in ps if p not in self._added]
        encoded = iter(self._sp.encode(plain, num_threads=threads))
        return [[i for p in ps for i in ([self._added[p]] if p in self._added else next(encoded))] for ps in parts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        if not self._added:
            return self._sp.decode(ids)
        pieces, run = [], []  # each run between added tokens was encoded as a text of its own
        for i in ids + [self._sp.get_piece_size()]:
            if i >= self._sp.get_piece_size():
                pieces.append(self._sp.decode(run))
                run = []
            else:
                run.append(i)
        return "".join(pieces)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() + len(self._added)

    @property
    def bos_id(self) -> Optional[int]:
        return _id_or_none(self._sp.bos_id())

    @property
    def eos_id(self) -> Optional[int]:
        return _id_or_none(self._sp.eos_id())

    def _pad_id(self) -> Optional[int]:
        return _id_or_none(self._sp.pad_id())

    def token_to_id(self, token: str) -> Optional[int]:
        if token in self._added:
            return self._added[token]
        i = self._sp.piece_to_id(token)  # the unknown id when absent
        return i if self._sp.id_to_piece(i) == token and not self._sp.is_unknown(i) else None

    def id_to_token(self, i: int) -> Optional[str]:
        if 0 <= i < self._sp.get_piece_size():
            return self._sp.id_to_piece(i)
        return next((t for t, j in self._added.items() if j == i), None)

    def special_tokens(self) -> dict[str, str]:
        sp = self._sp
        ids = (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unk", sp.unk_id()), ("pad", sp.pad_id()))
        return {f"{key}_token": sp.id_to_piece(i) for key, i in ids if i >= 0}

    def special_ids(self) -> set[int]:
        sp = self._sp
        own = {i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)}
        return own | set(self._added.values())

    def files(self) -> dict[str, bytes]:
        added = {ADDED_TOKENS_FILE: json.dumps(self._added, ensure_ascii=False).encode()} if self._added else {}
        return _with_template({"tokenizer.model": self._proto, **added}, self.chat_template)

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        # Control pieces (`<s>`, `</s>`) never come out of SentencePiece's encode: split them off and encode
        # the text between them; text after a control piece gets no dummy prefix ("▁"), as transformers'
        # non-legacy SentencePiece tokenizers do (text after an added token gets it, as `encode` gives).
        # Offsets come from the pieces' byte spans.
        sp = self._sp
        if getattr(self, "_controls", None) is None:
            controls = {sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i)}
            self._controls = {**controls, **self._added}
            self._controls_pattern = _split_pattern(self._controls)
        controls = self._controls
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos, prefix = 0, True
        for part in self._controls_pattern.split(text) if self._controls_pattern else [text]:
            if part in controls:
                ids.append(controls[part])
                offsets.append((pos, pos + len(part)))
                prefix = part in self._added
            elif part:
                processor = sp if prefix else self._processor_without_dummy_prefix()
                pieces = processor.encode(part, return_type="proto").pieces
                char_at = _byte_to_char_offsets(part)
                spans = [(char_at[p.begin], char_at[p.end]) for p in pieces]
                for k in range(len(spans) - 2, -1, -1):  # a byte-fallback or dummy-prefix piece spans no
                    if spans[k][0] == spans[k][1]:  # character: give it the span of the piece it leads into
                        spans[k] = spans[k + 1]
                ids += [p.id for p in pieces]
                offsets += [(pos + a, pos + b) for a, b in spans]
            pos += len(part)
        return ids, offsets

    def _processor_without_dummy_prefix(self) -> spm.SentencePieceProcessor:
        if getattr(self, "_sp_no_prefix", None) is None:
            from sentencepiece import sentencepiece_model_pb2

            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(self._proto)
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_no_prefix = spm.SentencePieceProcessor()
            self._sp_no_prefix.LoadFromSerializedProto(proto.SerializeToString())
        return self._sp_no_prefix


def _split_pattern(tokens: Iterable[str]) -> Optional[re.Pattern]:
    """A regex whose `split` keeps each of `tokens` as a part (longest first); None for no tokens."""
    alternatives = "|".join(map(re.escape, sorted(tokens, key=len, reverse=True)))
    return re.compile(f"({alternatives})") if alternatives else None


def _sentencepiece_added_tokens(files: dict[str, bytes], name: str) -> dict[str, int]:
    """The {token: id} of an `added_tokens.json` in `files`, {} without one."""
    if ADDED_TOKENS_FILE not in files:
        return {}
    try:
        added = json.loads(files[ADDED_TOKENS_FILE])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JaxllmError(f"{name}: {ADDED_TOKENS_FILE} is not valid JSON ({e})") from None
    if not isinstance(added, dict) or not all(isinstance(i, int) for i in added.values()):
        raise JaxllmError(f"{name}: {ADDED_TOKENS_FILE} must map each added token to its id, got {added!r:.80}")
    return added


def _id_or_none(i: int) -> Optional[int]:
    return i if i >= 0 else None  # SentencePiece says -1 for "no such token"


def _byte_to_char_offsets(text: str) -> list[int]:
    """For each UTF-8 byte offset of `text` (and its end), the index of the character it falls in."""
    out = []
    for i, c in enumerate(text):
        out += [i] * len(c.encode("utf-8"))
    return out + [len(text)]


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` plus the bos/eos/pad tokens named in tokenizer_config.json or
    special_tokens_map.json (the latter wins, as in transformers)."""

    def __init__(self, files: dict[str, bytes], name: str = "tokenizer.json"):
        from tokenizers import Tokenizer as RustTokenizer

        self.name = name
        self._files = files
        try:
            self._tok = RustTokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise JaxllmError(f"{name}: not a Hugging Face tokenizer.json ({e})") from None
        # A tokenizer.json may switch on padding/truncation (e.g. to 128); the pipeline packs and
        # pads itself, so encode must return exactly the text's tokens.
        self._tok.no_padding()
        self._tok.no_truncation()
        special: dict[str, object] = {}
        for config_name in _HF_CONFIG_FILES:
            if config_name in files:
                try:
                    special.update(json.loads(files[config_name]))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise JaxllmError(f"{name}: {config_name} is not valid JSON ({e})") from None
        self._special = {key: self._token_id(special.get(f"{key}_token")) for key in ("bos", "eos", "pad")}
        self._special_tokens = {}
        for key in SPECIAL_TOKEN_NAMES:
            value = special.get(f"{key}_token")
            value = value.get("content") if isinstance(value, dict) else value  # a serialised AddedToken
            if isinstance(value, str):
                self._special_tokens[f"{key}_token"] = value
        self._encode_batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _add(self, tokens: list[str]) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        start = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._tok.add_special_tokens(tokens)  # special, not normalized: split off before anything else
        ids = [self._tok.token_to_id(t) for t in tokens]
        if ids != list(range(start, start + len(tokens))):  # `tokenizers` numbers them from the count of ids
            raise JaxllmError(f"{self.name}: added tokens {tokens} got the ids {ids}, not {start}, {start + 1}, ...: "
                              "its vocabulary's ids have holes; add the tokens to the tokenizer.json itself")
        saved = RustTokenizer.from_str(self._files["tokenizer.json"].decode("utf-8"))  # with the file's own padding
        saved.add_special_tokens(tokens)
        self._files = {**self._files, "tokenizer.json": saved.to_str().encode()}

    def _token_id(self, token: object) -> Optional[int]:
        if isinstance(token, dict):  # a serialised AddedToken: {"content": "<s>", ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if isinstance(token, str) else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = self._tok.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> Optional[int]:
        return self._special["bos"]

    @property
    def eos_id(self) -> Optional[int]:
        return self._special["eos"]

    def _pad_id(self) -> Optional[int]:
        return self._special["pad"]

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(i)

    def special_tokens(self) -> dict[str, str]:
        return dict(self._special_tokens)

    def special_ids(self) -> set[int]:
        added = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        return added | super().special_ids()

    def files(self) -> dict[str, bytes]:
        return _with_template(dict(self._files), self.chat_template)


def _with_template(files: dict[str, bytes], template: Optional[str]) -> dict[str, bytes]:
    if template is not None:
        files["chat_template.jinja"] = template.encode("utf-8")
    return files


def _template_source(files: dict[str, bytes]) -> Optional[str]:
    """The chat template among a tokenizer's files: chat_template.jinja, else a string `chat_template` in
    tokenizer_config.json (lists of named templates are left to jaxllm.data.chat_template)."""
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode("utf-8")
    try:
        value = json.loads(files.get("tokenizer_config.json", b"{}")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from `builtin:kjv-sp4k`, a SentencePiece `.model` file, a `tokenizer.json` file, or a
    directory holding `tokenizer.json` (Hugging Face; preferred) or `tokenizer.model` (SentencePiece)."""
    if path.startswith("builtin:"):
        name = path.removeprefix("builtin:")
        if name not in BUILTIN_TOKENIZERS:
            choices = ", ".join(f"builtin:{n}" for n in BUILTIN_TOKENIZERS)
            raise JaxllmError(f"unknown tokenizer {path}; the built-in tokenizers are {choices}")
        path = str(ASSETS / BUILTIN_TOKENIZERS[name])
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            files = {f: (p / f).read_bytes() for f in ("tokenizer.json", *_HF_CONFIG_FILES) if (p / f).is_file()}
            tokenizer = HFTokenizer(files, name=str(p))
            template = p / "chat_template.jinja"
            tokenizer.chat_template = (template.read_text(encoding="utf-8") if template.is_file()
                                       else _template_source(files))
            return tokenizer
        if (p / "tokenizer.model").is_file():
            files = {f: (p / f).read_bytes() for f in ("tokenizer.model", ADDED_TOKENS_FILE, "chat_template.jinja")
                     if (p / f).is_file()}
            return load_tokenizer_from_files(files, name=str(p / "tokenizer.model"))
        raise JaxllmError(f"tokenizer directory {p} holds neither tokenizer.json nor tokenizer.model")
    if p.is_file() and p.name.endswith(".json"):
        return HFTokenizer({"tokenizer.json": p.read_bytes()}, name=str(p))
    if p.is_file():
        return SentencePieceTokenizer(p.read_bytes(), name=str(p))
    raise JaxllmError(
        f"tokenizer {path} does not exist; expected a SentencePiece .model file, a directory with tokenizer.json "
        "or tokenizer.model, or builtin:kjv-sp4k"
    )


def load_tokenizer_from_files(files: dict[str, bytes], name: Optional[str] = None) -> Tokenizer:
    """Rebuilds a tokenizer from `Tokenizer.files()` (e.g. as saved in a checkpoint)."""
    tokenizer: Tokenizer
    if "tokenizer.json" in files:
        tokenizer = HFTokenizer({k: v for k, v in files.items() if k != "chat_template.jinja"},
                                name=name or "tokenizer.json")
    elif "tokenizer.model" in files:
        name = name or "tokenizer.model"
        tokenizer = SentencePieceTokenizer(files["tokenizer.model"], name, _sentencepiece_added_tokens(files, name))
    else:
        raise JaxllmError(f"no tokenizer among the files {sorted(files)}; expected tokenizer.json or tokenizer.model")
    tokenizer.chat_template = _template_source(files)
    return tokenizer


def train_sentencepiece(
    sources: Sequence[Union[SourceConfig, str]],
    output_prefix: str,
    vocab_size: int,
    model_type: str = "bpe",
    input_sentence_size: int = 1_000_000,
    max_documents: Optional[int] = None,
    max_sentence_chars: int = 4000,
    character_coverage: float = 0.9995,
    seed: int = 0,
    texts: Optional[Iterable[str]] = None,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece model on one pass over `sources` (or over `texts`, e.g. a sample of them: see
    jaxllm.dataprep.tokenizer_train) and writes `output_prefix.model`.

    Documents are streamed to the trainer in chunks of whole lines (at most `max_sentence_chars`;
    newlines kept so the model learns line starts); SentencePiece keeps a random sample of
    `input_sentence_size` chunks, so a big corpus only costs time (cap it with `max_documents`).
    Ids: pad=0, unk=1, bos=2, eos=3, then the pieces; byte_fallback spells any character outside
    the vocabulary as UTF-8 byte pieces, so nothing is ever <unk>. Normalization is `identity` (not
    nmt_nfkc, which rewrites e.g. ligatures and maps tabs/newlines to spaces) and extra whitespace
    is kept: decode(encode(text)) == text for any text. Digits are split one per piece.
    `seed` fixes SentencePiece's sampling, so the same corpus gives the same model.
    """
    from jaxllm.data.sources import make_source

    if model_type not in ("bpe", "unigram"):
        raise JaxllmError(f"model_type must be bpe or unigram, got {model_type!r}")
    configs = [s if isinstance(s, SourceConfig) else SourceConfig(path=s) for s in sources]

    def sentences():
        count = 0
        documents = texts if texts is not None else (d["text"] for c in configs for d in make_source(c, num_epochs=1))
        for text in documents:
            yield from _chunks(text, max_sentence_chars)
            count += 1
            if max_documents is not None and count >= max_documents:
                return

    spm.set_random_generator_seed(seed)
    model = io.BytesIO()  # only the .model file is written: the .vocab listing is for people, not needed
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        character_coverage=character_coverage,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=4 * max_sentence_chars + 16,  # it counts bytes: 4 per character at most
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )  # fmt: skip
    path = Path(f"{output_prefix}.model")
    atomic_write_bytes(path, model.getvalue())
    return SentencePieceTokenizer(model.getvalue(), name=str(path))


def _chunks(text: str, limit: int):
    """Pieces of `text` of at most `limit` characters, cut after newlines (or spaces in a very long line)."""
    while len(text) > limit:
        cut = text.rfind("\n", 0, limit) + 1 or text.rfind(" ", 0, limit) + 1 or limit
        yield text[:cut]
        text = text[cut:]
    if text:
        yield text
