"""Batch formats: for each objective, the grain stages that turn documents into its rows and the arrays a
batch holds (`BatchFormat`, registered by objective name), plus the special ids each pretraining objective
needs and the lengths of its examples (docs/objectives.md describes every batch).

    clm:             tokenize (+BOS/EOS; inputs = t[:-1], targets = t[1:]) -> pack into rows of seq_len
    mlm:             tokenize (+BOS/EOS) -> pack like clm, unshifted -> mask row `index` (masking.py)
    span, bart, ul2: tokenize -> cut into chunks that fit -> corrupt chunk `index` (denoising.py)
                     -> first-fit pack encoder and decoder sides together, never splitting an example

Randomness is a function of (data.seed, process, index in the stream), and every index is part of the
iterator state, so a resumed run makes exactly the batches it would have made.

Special ids: the tokenizer's own token where it has one (`<mask>` or `[MASK]`; T5's `<extra_id_N>`; a UL2
mode token such as `[R]`), otherwise ids above its vocabulary V: mask V, sentinel i V + 1 + i, then the
mode tokens. `extra_token_count` says how many ids above V an objective uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, FirstFitPackIterDataset, FlatMapIterDataset, FlatMapTransform

from jaxllm.config import ConfigError, DataConfig, JaxllmError, ObjectiveConfig, SourceConfig
from jaxllm.data import denoising
from jaxllm.data.masking import MaskRows
from jaxllm.data.tokenizer import Tokenizer

ENCODER_DECODER = ("span", "bart", "ul2")
MASK_TOKENS = ("<mask>", "[MASK]")
_SALT = 0x646E73  # separates the corruption streams from the other users of data.seed


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The ids an objective adds to the text's. `vocab_size`: ids a model needs (largest used + 1)."""

    vocab_size: int
    mask: Optional[int] = None  # mlm, bart
    sentinels: tuple[int, ...] = ()  # span, ul2: the id that replaces the i-th span
    modes: dict[str, int] = dataclasses.field(default_factory=dict)  # ul2: mode token -> id
    decoder_start: Optional[int] = None  # span, bart, ul2: the first decoder input of each example


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Encoder-decoder row lengths, and the most document tokens one example takes (`chunk`)."""

    encoder: int
    decoder: int
    chunk: int
    spans: int = 0  # the most corrupted spans in one example: the sentinels needed


def encoder_decoder_lengths(cfg: DataConfig) -> Lengths:
    """Row lengths of span, bart and ul2, and the chunk length that fits them, as T5's random_spans_helper
    does: the longest chunk whose corrupted example fits the encoder (data.seq_len unless encoder_len
    is set), and a decoder row as long as the longest target (unless decoder_len is set)."""
    o = cfg.objective
    encoder = o.encoder_len or cfg.seq_len
    if o.name == "bart":  # targets are [BOS] text [EOS]; infilling never lengthens the encoder side past that
        decoder = o.decoder_len or encoder
        chunk = min(encoder, decoder) - 2
        if chunk < 1:
            raise JaxllmError(f"the bart objective needs rows of at least 3 tokens; {_raise_lengths(cfg)}")
        return Lengths(encoder, decoder, chunk)
    shapes = _example_shapes(o)
    decoder_limit = o.decoder_len or encoder  # a derived decoder row is never longer than the encoder's
    n, longest, spans = 0, (0, 0), 0
    while True:  # lengths grow with n, but not strictly: keep the running maxima
        sizes = [shape(n + 1) for shape in shapes]
        grown = (max(longest[0], *(s[0] for s in sizes)), max(longest[1], *(s[1] for s in sizes)))
        if grown[0] > encoder or grown[1] > decoder_limit:
            break
        n, longest, spans = n + 1, grown, max(spans, *(s[2] for s in sizes))
    if n == 0:
        raise JaxllmError(
            f"the {o.name} objective cannot fit even one token of text in its rows; {_raise_lengths(cfg)}"
        )
    return Lengths(encoder, o.decoder_len or longest[1], n, spans)


def _example_shapes(o: ObjectiveConfig) -> list[Callable[[int], tuple[int, int, int]]]:
    """For each way of making an example: chunk length -> (encoder length, decoder length, spans)."""

    def span(density: float, mean: float, mode: int) -> Callable[[int], tuple[int, int, int]]:
        def shape(n: int) -> tuple[int, int, int]:
            encoder, decoder = denoising.span_lengths(n, density, mean)
            return encoder + mode, decoder, denoising.span_counts(n, density, mean)[1]

        return shape

    if o.name == "span":
        return [span(o.noise_density, o.mean_span_length, 0)]
    prefix_lm = lambda n: (*denoising.prefix_lm_lengths(n), 0)  # noqa: E731
    return [span(d.noise_density, d.mean_span_length, 1) if d.kind == "span" else prefix_lm for d in o.denoisers]


def _raise_lengths(cfg: DataConfig) -> str:
    o = cfg.objective
    return (
        f"data.seq_len={cfg.seq_len}, encoder_len={o.encoder_len}, decoder_len={o.decoder_len}: "
        "raise data.seq_len (or data.objective.encoder_len / decoder_len)"
    )


def special_ids(cfg: DataConfig, tokenizer: Tokenizer) -> SpecialIds:
    """The ids `cfg.objective` uses with `tokenizer` (see the module docstring for the rule)."""
    o, vocab = cfg.objective, tokenizer.vocab_size
    mask, sentinels, modes, start = None, (), {}, None
    next_free = vocab + 1  # vocab is the mask's place, used or not: sentinel i is always vocab + 1 + i
    if o.name in ("mlm", "bart"):
        own = [i for i in map(tokenizer.token_to_id, MASK_TOKENS) if i is not None]
        mask = own[0] if own else vocab
    if o.name in ("span", "ul2"):
        count = encoder_decoder_lengths(cfg).spans
        if tokenizer.token_to_id("<extra_id_0>") is not None:
            found = [tokenizer.token_to_id(f"<extra_id_{i}>") for i in range(count)]
            if None in found:
                raise JaxllmError(
                    f"the tokenizer has only {found.index(None)} sentinel tokens <extra_id_N>, but the {o.name} "
                    f"objective needs {count} at data.seq_len={cfg.seq_len}; lower data.seq_len or noise_density, "
                    "or raise mean_span_length"
                )
            sentinels = tuple(found)
        else:
            sentinels = tuple(range(vocab + 1, vocab + 1 + count))
            next_free += count
    if o.name == "ul2":
        for d in o.denoisers:
            if d.mode_token not in modes:
                own_id = tokenizer.token_to_id(d.mode_token)
                modes[d.mode_token] = own_id if own_id is not None else next_free
                next_free += own_id is None
    if o.name in ENCODER_DECODER:
        start = o.decoder_start_id
        if start is None:
            start = tokenizer.eos_id if o.name == "bart" else tokenizer.pad_id
    used = [vocab - 1, *(i for i in (mask, start) if i is not None), *sentinels, *modes.values()]
    return SpecialIds(max(used) + 1, mask, sentinels, modes, start)


def extra_token_count(cfg: DataConfig, tokenizer: Tokenizer) -> int:
    """How many ids above the tokenizer's vocabulary the objective uses (0 for clm)."""
    return special_ids(cfg, tokenizer).vocab_size - tokenizer.vocab_size


def check_vocab_size(model_vocab_size: int, cfg: DataConfig, tokenizer: Tokenizer) -> None:
    """A ConfigError naming the fix when the model's embedding table has no row for some id the data uses."""
    needed = special_ids(cfg, tokenizer).vocab_size
    if model_vocab_size < needed:
        extra = needed - tokenizer.vocab_size
        also = f" + {extra} ids of the {cfg.objective.name} objective (mask, sentinels, mode tokens)" if extra else ""
        raise ConfigError(
            f"model.vocab_size={model_vocab_size} is too small: the tokenizer has {tokenizer.vocab_size} ids{also}, "
            f"{needed} in all; set model.vocab_size >= {needed} (e.g. {-(-needed // 128) * 128}, a multiple of 128)"
        )


def batch_spec(cfg: DataConfig, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array in a batch of `batch_size` rows of `cfg.objective`."""
    return batch_format(cfg.objective.name).spec(cfg, batch_size)


def token_rows_spec(cfg: DataConfig, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """clm and mlm: [B, L] inputs, targets, segment_ids, positions (int32) and loss_mask (float32)."""
    row = (batch_size, cfg.seq_len)
    keys = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    return {k: (row, np.dtype(np.float32) if k == "loss_mask" else np.dtype(np.int32)) for k in keys}


def _encoder_decoder_spec(cfg: DataConfig, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """span, bart, ul2: encoder_* [B, Le] and decoder_* [B, Ld]."""
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    lengths = encoder_decoder_lengths(cfg)
    enc, dec = (batch_size, lengths.encoder), (batch_size, lengths.decoder)
    return {
        **{f"encoder_{k}": (enc, i32) for k in ("inputs", "segment_ids", "positions")},
        **{f"decoder_{k}": (dec, i32) for k in ("inputs", "targets", "segment_ids", "positions")},
        "decoder_loss_mask": (dec, f32),
    }


# ------------------------------------------------------------------------------------- batch formats

Rows = Callable[[grain.IterDataset, DataConfig, Tokenizer, int, int], grain.IterDataset]
Spec = Callable[[DataConfig, int], dict[str, tuple[tuple[int, ...], np.dtype]]]
Convert = Callable[[DataConfig, Tokenizer, SourceConfig], Callable[[dict], Optional[dict]]]


@dataclasses.dataclass(frozen=True)
class BatchFormat:
    """What the pipeline makes of documents for one objective.

    `rows(docs, data_cfg, tokenizer, batch_size, process_index)`: the grain stages from documents to
    rows (dicts of [L] arrays), before batching; `spec(data_cfg, batch_size)`: the shape and dtype of
    every array of a batch. An objective (jaxllm.train.objective) names its format by its own name.
    `convert(data_cfg, tokenizer, source_cfg)`, for formats that read whole records instead of `{"text"}`
    documents: the function each source applies to its records (jaxllm.data.sources)."""

    rows: Rows
    spec: Spec
    convert: Optional[Convert] = None
    # Special tokens the format needs the tokenizer to hold as single tokens (e.g. a chat template's), given
    # the data config and the tokenizer; the Trainer adds them (tokenizer.add_special_tokens) before the model.
    tokens: Optional[Callable[[DataConfig, Tokenizer], list[str]]] = None


_FORMATS: dict[str, BatchFormat] = {}


def register_format(name: str, fmt: BatchFormat) -> None:
    """Makes `fmt` the batch format of objective `name` (data.objective.name)."""
    _FORMATS[name] = fmt


def tokens_to_add(cfg: DataConfig, tokenizer: Tokenizer) -> list[str]:
    """The special tokens `cfg.objective`'s batch format needs that `tokenizer` lacks (see `BatchFormat.tokens`)."""
    fmt = batch_format(cfg.objective.name)
    return fmt.tokens(cfg, tokenizer) if fmt.tokens is not None else []


def batch_format(name: str) -> BatchFormat:
    if name not in _FORMATS:
        raise ConfigError(f"data.objective.name={name} has no batch format; choose one of {', '.join(_FORMATS)}")
    return _FORMATS[name]


# ------------------------------------------------------------------------------------- grain stages


def _clm_rows(docs: grain.IterDataset, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int,
              process_index: int) -> grain.IterDataset:
    """clm: tokenize (+BOS/EOS; inputs = t[:-1], targets = t[1:]) -> pack into rows of seq_len
    (ConcatThenSplit: long documents continue on the next row)."""
    return pack_clm_rows(docs.map(ClmTokenize(tokenizer, cfg.add_bos, cfg.add_eos)), cfg.seq_len)


def pack_clm_rows(tokenized: grain.IterDataset, seq_len: int) -> grain.IterDataset:
    """clm's packing: `ClmTokenize`d documents -> rows of `seq_len` (documents without a target dropped).
    The trainer's path and `jaxllm data tokenize` (jaxllm.dataprep.shards) both pack with it."""
    ds = tokenized.filter(lambda doc: len(doc["inputs"]) > 0)
    ds = ConcatThenSplitIterDataset(ds, length_struct={"inputs": seq_len, "targets": seq_len})
    return ds.map(finish_token_row)


class ClmTokenize:
    """{"text"} -> {"inputs": t[:-1], "targets": t[1:]} (int32), t = [BOS] + tokens + [EOS] as configured."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
        self._encode = tokenizer.encode
        self._bos = [tokenizer.bos_id] if add_bos else []
        self._eos = [tokenizer.eos_id] if add_eos else []

    def __call__(self, doc: dict[str, str]) -> dict[str, np.ndarray]:
        tokens = np.asarray(self._bos + self._encode(doc["text"]) + self._eos, dtype=np.int32)
        return {"inputs": tokens[:-1], "targets": tokens[1:]}


def finish_token_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed row (grain's names) -> our batch fields, each [seq_len]; the loss mask is 1 on every real target,
    or the packed examples' own `loss_mask` where they carry one (sft)."""
    segment_ids = packed["inputs_segment_ids"]
    return {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "segment_ids": segment_ids,
        "positions": packed["inputs_positions"],
        "loss_mask": (packed.get("loss_mask", 1.0) * (segment_ids > 0)).astype(np.float32),
    }


def _mlm_rows(docs: grain.IterDataset, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int,
              process_index: int) -> grain.IterDataset:
    """mlm: tokenize (+BOS/EOS) -> pack like clm, unshifted -> mask row `index` (masking.py)."""
    o, ids = cfg.objective, special_ids(cfg, tokenizer)
    bos = [tokenizer.bos_id] if cfg.add_bos else []
    eos = [tokenizer.eos_id] if cfg.add_eos else []
    ds = docs.map(lambda doc: {"tokens": np.asarray(bos + tokenizer.encode(doc["text"]) + eos, np.int32)})
    ds = ds.filter(lambda row: len(row["tokens"]) > 0)
    ds = ConcatThenSplitIterDataset(ds, length_struct={"tokens": cfg.seq_len})
    no_predict = tokenizer.special_ids() | {ids.mask}
    mask_rows = MaskRows(cfg.seed, process_index, ids.mask, ordinary_ids(tokenizer, ids), no_predict,
                         o.mask_prob, o.mask_token_prob, o.random_token_prob)  # fmt: skip
    return ds.map_with_index(mask_rows)


def _encoder_decoder_rows(docs: grain.IterDataset, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int,
                          process_index: int) -> grain.IterDataset:
    """span, bart, ul2: tokenize -> cut into chunks that fit -> corrupt chunk `index` (denoising.py) ->
    first-fit pack encoder and decoder sides together, never splitting an example."""
    o, ids = cfg.objective, special_ids(cfg, tokenizer)
    needs = {"EOS": tokenizer.eos_id, **({"BOS": tokenizer.bos_id} if o.name == "bart" else {})}
    for name, token_id in needs.items():
        if token_id is None:
            raise JaxllmError(f"the {o.name} objective frames every example with {name}, but the tokenizer has "
                              f"no {name} token; use a tokenizer that has one")  # fmt: skip
    lengths = encoder_decoder_lengths(cfg)
    ds = FlatMapIterDataset(docs, _Chunks(tokenizer, lengths.chunk))
    ds = ds.map_with_index(EncoderDecoderExamples(cfg, tokenizer, ids, lengths, process_index))
    # First fit never splits an example, and gives one example the same segment id on both sides.
    length_struct = {
        "encoder_inputs": lengths.encoder, "decoder_inputs": lengths.decoder, "decoder_targets": lengths.decoder,
    }  # fmt: skip
    ds = FirstFitPackIterDataset(ds, length_struct=length_struct, num_packing_bins=batch_size, shuffle_bins=False)
    return ds.map(_finish_encoder_decoder_row)


def ordinary_ids(tokenizer: Tokenizer, ids: SpecialIds) -> np.ndarray:
    """int32 [k]: the tokenizer's ids that stand for text, the pool of MLM's random replacements."""
    taken = tokenizer.special_ids() | {i for i in (ids.mask, *ids.sentinels, *ids.modes.values()) if i is not None}
    ordinary = np.ones(tokenizer.vocab_size, bool)
    ordinary[[i for i in taken if i < tokenizer.vocab_size]] = False
    return np.flatnonzero(ordinary).astype(np.int32)


class _Chunks(FlatMapTransform):
    """{"text"} -> its tokens (int32) in consecutive chunks of at most `size`; none for an empty text."""

    max_fan_out = 1 << 20  # only MapDatasets use it; a document may be any length

    def __init__(self, tokenizer: Tokenizer, size: int):
        self._encode, self._size = tokenizer.encode, size

    def flat_map(self, doc: dict[str, str]) -> list[np.ndarray]:
        tokens = np.asarray(self._encode(doc["text"]), np.int32)
        return [tokens[i : i + self._size] for i in range(0, len(tokens), self._size)]


class EncoderDecoderExamples:
    """map_with_index transform: chunk `index` (int32 [n]) -> {encoder_inputs [<= Le], decoder_inputs,
    decoder_targets [<= Ld]}, corrupted by `cfg.objective` with a generator drawn from (seed, process, index).

    span: T5's [non-noise tokens, one sentinel per noise span, EOS] -> [sentinel, span tokens, ..., EOS].
    bart: [BOS, infilled (sentence-permuted) text, EOS] -> [BOS, text, EOS].
    ul2:  one denoiser chosen by weight; its mode token first on the encoder side, then span corruption
          with its parameters, or (prefix_lm) [mode, prefix, EOS] -> [suffix, EOS].
    decoder_inputs are the targets shifted right behind the decoder start id.
    """

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, ids: SpecialIds, lengths: Lengths, process_index: int):
        self._o, self._ids, self._lengths = cfg.objective, ids, lengths
        self._seed, self._process = cfg.seed, process_index
        self._bos, self._eos = tokenizer.bos_id, tokenizer.eos_id
        self._sentinels = np.asarray(ids.sentinels, np.int32)
        weights = np.asarray([d.weight for d in self._o.denoisers], np.float64)
        self._weights = weights / weights.sum()
        self._sentence_ends = denoising.SentenceEnds(tokenizer.decode)

    def __call__(self, index: int, chunk: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self._seed, _SALT, self._process, index])
        if self._o.name == "span":
            encoder, targets = self._span(chunk, self._o.noise_density, self._o.mean_span_length, rng)
        elif self._o.name == "bart":
            encoder, targets = self._bart(chunk, rng)
        else:
            denoiser = self._o.denoisers[rng.choice(len(self._weights), p=self._weights)]
            if denoiser.kind == "span":
                encoder, targets = self._span(chunk, denoiser.noise_density, denoiser.mean_span_length, rng)
            else:
                split = denoising.prefix_split(len(chunk), rng)
                encoder, targets = chunk[:split], chunk[split:]
            encoder = np.concatenate([[self._ids.modes[denoiser.mode_token]], encoder])
        eos = [self._eos] if self._o.name != "bart" else []  # bart's are framed already
        encoder = np.concatenate([encoder, eos]).astype(np.int32)
        targets = np.concatenate([targets, eos]).astype(np.int32)
        decoder_inputs = np.concatenate([[self._ids.decoder_start], targets[:-1]]).astype(np.int32)
        return {"encoder_inputs": encoder, "decoder_inputs": decoder_inputs, "decoder_targets": targets}

    def _span(self, chunk: np.ndarray, density: float, mean: float, rng: np.random.Generator):
        noise = denoising.random_spans_noise_mask(len(chunk), density, mean, rng)
        return denoising.span_corruption(chunk, noise, self._sentinels)

    def _bart(self, chunk: np.ndarray, rng: np.random.Generator):
        o = self._o
        if o.permute_sentences:
            bounds = denoising.sentence_bounds(self._sentence_ends(chunk))
        else:
            bounds = np.array([0, len(chunk)])
        # [BOS] + unmasked tokens + one mask per span + [EOS] must fit the encoder row; spans of length > 0
        # always do (no more of them than masked tokens), insertions beyond that are dropped.
        unmasked = len(chunk) - int(round(len(chunk) * o.mask_ratio))
        max_spans = self._lengths.encoder - 2 - unmasked
        order, spans = denoising.bart_plan(
            len(chunk), len(bounds) - 1, o.permute_sentences, o.mask_ratio, o.poisson_lambda, rng, max_spans
        )
        encoder = denoising.infill(denoising.permute_sentences(chunk, bounds, order), spans, self._ids.mask)
        return self._frame(encoder), self._frame(chunk)

    def _frame(self, tokens: np.ndarray) -> np.ndarray:
        return np.concatenate([[self._bos], tokens, [self._eos]])


def _finish_encoder_decoder_row(packed: dict[str, Any]) -> dict[str, np.ndarray]:
    """First-fit packed row (grain's names) -> our batch fields: encoder [Le], decoder [Ld]."""
    segment_ids = packed["decoder_targets_segment_ids"]
    return {
        "encoder_inputs": packed["encoder_inputs"],
        "encoder_segment_ids": packed["encoder_inputs_segment_ids"],
        "encoder_positions": packed["encoder_inputs_positions"],
        "decoder_inputs": packed["decoder_inputs"],
        "decoder_targets": packed["decoder_targets"],
        "decoder_segment_ids": segment_ids,
        "decoder_positions": packed["decoder_targets_positions"],
        "decoder_loss_mask": (segment_ids > 0).astype(np.float32),
    }


register_format("clm", BatchFormat(_clm_rows, token_rows_spec))
register_format("mlm", BatchFormat(_mlm_rows, token_rows_spec))
register_format("distill", batch_format("clm"))  # next-token rows; the loss honours loss_mask and segment_ids
for _name in ENCODER_DECODER:
    register_format(_name, BatchFormat(_encoder_decoder_rows, _encoder_decoder_spec))
