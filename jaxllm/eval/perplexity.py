"""Perplexity of text sources (the `data.sources` syntax) with sliding windows: token, word and byte perplexity.

Each document is tokenized on its own (BOS first when the model's tokenizer adds one) and every token after
the first is predicted exactly once: the Hugging Face "perplexity of fixed-length models" recipe. Windows of
at most `max_length` input tokens start every `stride` tokens; each scores the next-token predictions of its
positions not scored by the window before (the first: all of them; then the last `stride`), so a scored token
sees at least `max_length - stride + 1` tokens of the document before it once the document is that long. One
difference from the recipe as printed: a window's targets are the tokens after each of its positions, the
last one included, so no token is lost at a window boundary (the recipe's labels are the window's own tokens,
shifted inside the model, which never scores a window's first token: one lost per window at stride ==
max_length). lm-evaluation-harness's rolling windows are the same except that its last window is moved back
to hold `max_length` tokens.

Reported per source, from the summed negative log-likelihood NLL (nats) of the scored tokens:
token perplexity exp(NLL / tokens); word perplexity exp(NLL / words), words = `len(re.split(r"\\s+", text))`
per document; byte perplexity exp(NLL / bytes) and bits per byte NLL / bytes / ln 2, bytes = the UTF-8 length
of each document: lm-evaluation-harness's `word_perplexity`, `byte_perplexity` and `bits_per_byte`
(lm_eval/api/metrics.py, `Task.count_words` / `count_bytes`), which do not depend on the tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import models, sharding
from jaxllm.config import JaxllmError, MeshConfig, ModelConfig, SourceConfig
from jaxllm.data.sources import make_source
from jaxllm.data.tokenizer import HFTokenizer, Tokenizer, load_tokenizer, load_tokenizer_from_files
from jaxllm.train.losses import chunked_sums

_WHITESPACE = re.compile(r"\s+")
_LOGITS_PER_PIECE = 2**25  # float32 logits alive at once ([B, chunk, V]): 128 MiB


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them (`Task.count_words`): pieces between runs of whitespace."""
    return len(_WHITESPACE.split(text))


def count_bytes(text: str) -> int:
    """UTF-8 bytes (`Task.count_bytes`)."""
    return len(text.encode("utf-8"))


def windows(length: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of a document of `length` token ids: (start, stop, scored), where the input ids[start:stop]
    (at most `max_length`) predict ids[start + 1 : stop + 1] and the last `scored` of those predictions count.
    Windows start every `stride` ids; every id after the first is scored once; none for fewer than 2 ids."""
    out: list[tuple[int, int, int]] = []
    scored_to = 0  # the inputs ids[:scored_to] have had their next id scored
    for start in range(0, length - 1, stride):
        stop = min(start + max_length, length - 1)
        out.append((start, stop, stop - scored_to))
        scored_to = stop
        if stop == length - 1:
            break
    return out


@dataclasses.dataclass
class Scorer:
    """A decoder on a mesh with the tokenizer and framing it reads text with (`bos_id`: None = no BOS)."""

    graphdef: nnx.GraphDef
    params: Any
    cfg: ModelConfig
    tokenizer: Tokenizer
    bos_id: int | None
    mesh: jax.sharding.Mesh
    rules: Any
    where: str = ""


def load_scorer(path: str | Path, tokenizer: str | None = None) -> Scorer:
    """The decoder at `path` (a jaxllm run directory or checkpoint, or a Hugging Face directory), sharded
    fsdp-style over all devices as `jaxllm generate` loads; `tokenizer` replaces the model's own."""
    from jaxllm.train.frozen import open_pretrained

    if not Path(path).exists():
        raise JaxllmError(f"model {path} does not exist; give a jaxllm run directory, a checkpoint or a Hugging "
                          "Face model directory")
    pretrained = open_pretrained(path)
    cfg = pretrained.config
    if cfg.arch != "decoder":
        raise JaxllmError(f"{path} is an {cfg.arch.replace('_', '-')} model; perplexity scores decoder-only "
                          "language models")
    run = pretrained.run_config
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    rules = sharding.make_rules(run.mesh.rules if run is not None else ())
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    elif pretrained.tokenizer_files:
        tok = load_tokenizer_from_files(pretrained.tokenizer_files)
    else:
        raise JaxllmError(f"{path} carries no tokenizer; pass --tokenizer PATH (a tokenizer.json or a directory "
                          "with one, a SentencePiece .model, or builtin:kjv-sp4k)")
    if tok.vocab_size > cfg.vocab_size:
        raise JaxllmError(f"the tokenizer has {tok.vocab_size} tokens but the model only {cfg.vocab_size}; give "
                          "the tokenizer the model was trained with")
    adds_bos = run.data.add_bos if run is not None else _hf_adds_bos(tok)
    graphdef = models.model_spec(cfg)[0]
    params = pretrained.params(mesh, rules)
    return Scorer(graphdef, params, cfg, tok, tok.bos_id if adds_bos else None, mesh, rules, pretrained.where)


def _hf_adds_bos(tokenizer: Tokenizer) -> bool:
    """Whether a Hugging Face tokenizer frames a text with BOS: tokenizer_config.json's add_bos_token, else
    what its tokenizer.json's post-processor does (a SentencePiece model alone: no)."""
    if tokenizer.bos_id is None:
        return False
    files = tokenizer.files()
    config = json.loads(files.get("tokenizer_config.json", b"{}"))  # valid: the tokenizer has read it
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    if isinstance(tokenizer, HFTokenizer):
        from tokenizers import Tokenizer as RustTokenizer

        ids = RustTokenizer.from_str(files["tokenizer.json"].decode("utf-8")).encode("a").ids
        return bool(ids) and ids[0] == tokenizer.bos_id
    return False


@dataclasses.dataclass
class Totals:
    """Sums over the documents of one source (or of all)."""

    documents: int = 0
    tokens: int = 0  # scored tokens
    words: int = 0
    bytes: int = 0
    nll: float = 0.0  # nats, summed over the scored tokens

    def add(self, other: Totals) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def report(self) -> dict[str, float | int]:
        def exp(x: float) -> float:
            return math.exp(x) if x < 709 else math.inf

        return {
            "token_perplexity": exp(self.nll / self.tokens), "word_perplexity": exp(self.nll / self.words),
            "byte_perplexity": exp(self.nll / self.bytes), "bits_per_byte": self.nll / self.bytes / math.log(2),
            "nll_per_token": self.nll / self.tokens, "nll": self.nll,
            "documents": self.documents, "tokens": self.tokens, "words": self.words, "bytes": self.bytes,
        }


@dataclasses.dataclass
class _Row:
    """One window: ids[start:stop] of a document of source `source`, its last `scored` predictions counted."""

    ids: np.ndarray
    start: int
    stop: int
    scored: int
    source: int


def perplexity(scorer: Scorer, sources: Sequence[SourceConfig], max_length: int | None = None,
               stride: int | None = None, batch_size: int = 8, limit: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Token, word and byte perplexity of each source (module docstring) and, with several, of all together.

    `max_length`: tokens per window (default: the model's context); `stride`: new tokens scored per window
    after the first (default `max_length`: windows do not overlap); `batch_size` windows run at once; `limit`
    documents per source; `progress(batches done, batches)` after each batch.
    """
    cfg = scorer.cfg
    max_length = cfg.max_seq_len if max_length is None else max_length
    stride = max_length if stride is None else stride
    _check_arguments(cfg, max_length, stride, batch_size, limit)
    names = [s.path for s in sources]
    if len(set(names)) != len(names):
        raise JaxllmError(f"--data names a source twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    totals, rows = [], []
    for index, source in enumerate(sources):
        total = Totals()
        for text in _documents(source, limit):
            ids = np.asarray(([] if scorer.bos_id is None else [scorer.bos_id]) + scorer.tokenizer.encode(text),
                             np.int32)
            total.add(Totals(documents=1, tokens=max(len(ids) - 1, 0), words=count_words(text),
                             bytes=count_bytes(text)))
            rows += [_Row(ids, *window, index) for window in windows(len(ids), max_length, stride)]
        if total.tokens == 0:  # the source itself raises when it holds no text at all
            raise JaxllmError(f"--data {source.path}: no document is longer than one token and the tokenizer adds "
                              "no BOS, so no token has a context to be scored in")
        totals.append(total)
    for index, nll in _score(scorer, rows, max_length, batch_size, progress):
        totals[index].nll += nll
    result: dict[str, Any] = {"model": scorer.where, "max_length": max_length, "stride": stride,
                              "bos": scorer.bos_id is not None,
                              "sources": {name: total.report() for name, total in zip(names, totals)}}
    if len(totals) > 1:
        everything = Totals()
        for total in totals:
            everything.add(total)
        result["all"] = everything.report()
    return result


def _check_arguments(cfg: ModelConfig, max_length: int, stride: int, batch_size: int, limit: int | None) -> None:
    if max_length < 1 or max_length > cfg.max_seq_len:
        raise JaxllmError(f"--max-length {max_length} must be between 1 and the model's context of "
                          f"{cfg.max_seq_len} tokens")
    _check_stride(max_length, stride)
    if batch_size < 1:
        raise JaxllmError(f"--batch-size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise JaxllmError(f"--limit must be >= 1 (documents per source), got {limit}")


def _check_stride(max_length: int, stride: int) -> None:
    if not 1 <= stride <= max_length:
        raise JaxllmError(f"--stride {stride} must be between 1 and --max-length {max_length} (new tokens scored "
                          "per window; the rest of the window is context)")


def _documents(source: SourceConfig, limit: int | None) -> Iterator[str]:
    """The texts of `source` read once from its start (all of it on every process: the windows are split over
    the devices, not the documents over the processes)."""
    iterator = iter(make_source(source, num_epochs=1))
    try:
        for count, doc in enumerate(iterator):
            if limit is not None and count >= limit:
                break
            yield doc["text"]
    except JaxllmError as e:  # raised inside grain, which appends lines about its traceback
        raise JaxllmError(str(e).split("\n", 1)[0]) from None
    finally:
        iterator.close()


def _lengths(max_length: int) -> list[int]:
    """The padded window lengths compiled: max_length and its halves down to 16."""
    out = [max_length]
    while out[-1] > 16 and out[-1] % 2 == 0:
        out.append(out[-1] // 2)
    return sorted(out)


def _score(scorer: Scorer, rows: list[_Row], max_length: int, batch_size: int,
           progress: Callable[[int, int], None] | None) -> Iterator[tuple[int, float]]:
    """(source index, summed NLL of a window) for every window: windows of like lengths batched together,
    padded to `_lengths` and to a batch that divides over the data-parallel devices."""
    dp = sharding.data_parallel_size(scorer.mesh, scorer.rules)
    B = -(-batch_size // dp) * dp
    lengths = _lengths(max_length)
    by_length: dict[int, list[_Row]] = {}
    for row in rows:
        by_length.setdefault(next(L for L in lengths if L >= row.stop - row.start), []).append(row)
    batches = [(L, group[i: i + B]) for L, group in sorted(by_length.items()) for i in range(0, len(group), B)]
    in_sharding = sharding.batch_sharding(scorer.mesh, scorer.rules, 2)
    for done, (L, batch) in enumerate(batches, 1):
        tokens, targets, mask = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
        for i, row in enumerate(batch):
            n = row.stop - row.start
            tokens[i, :n] = row.ids[row.start: row.stop]
            targets[i, :n] = row.ids[row.start + 1: row.stop + 1]
            mask[i, n - row.scored: n] = 1
        lengths_B = np.asarray([r.stop - r.start for r in batch] + [0] * (B - len(batch)), np.int32)
        arrays = [_put(a, in_sharding) for a in (tokens, targets, mask)]
        with sharding.activate(scorer.mesh, scorer.rules):
            nll_B = _window_nll(scorer.params, *arrays, jnp.asarray(lengths_B), graphdef=scorer.graphdef,
                                chunk=max(1, _LOGITS_PER_PIECE // (B * scorer.cfg.vocab_size)))
        nll_B = np.asarray(nll_B.addressable_data(0), np.float64)  # replicated: every process holds all of it
        for row, nll in zip(batch, nll_B):
            yield row.source, float(nll)
        if progress is not None:
            progress(done, len(batches))


def _put(array: np.ndarray, in_sharding: jax.sharding.NamedSharding) -> jax.Array:
    """A global array from the same host array on every process (each process places its devices' parts)."""
    return jax.make_array_from_callback(array.shape, in_sharding, lambda index: array[index])


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _window_nll(params, tokens_BL, targets_BL, mask_BL, lengths_B, *, graphdef, chunk):
    """float32 [B]: each row's summed -log p(target) over its masked positions. Row b is a window of
    lengths_B[b] tokens from position 0, padded on the right (segment 0: no token attends to padding)."""
    model = models.bind(graphdef, params)
    B, L = tokens_BL.shape
    positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    segment_ids_BL = (positions_BL < lengths_B[:, None]).astype(jnp.int32)
    x_BLD, _, _ = model.hidden(tokens_BL, positions_BL, segment_ids_BL)

    def piece(x_BCD, t_BC, m_BC):
        logits_BCV = model.logits(x_BCD).astype(jnp.float32)
        target_BC = jnp.take_along_axis(logits_BCV, t_BC[..., None], axis=-1)[..., 0]
        nll_BC = jax.nn.logsumexp(logits_BCV, axis=-1) - target_BC
        return (jnp.sum(jnp.where(m_BC > 0, nll_BC, 0.0), axis=1),)  # where: padded rows may hold NaN

    (nll_B,) = chunked_sums(piece, (x_BLD, targets_BL, mask_BL), chunk)
    return sharding.constrain(nll_B, (None,))  # replicated, so each process reads the whole batch's sums


def run_perplexity(args) -> int:
    """`jaxllm perplexity MODEL --data SOURCE ...`: prints each source's numbers, and writes them as JSON to
    --output."""
    import sys

    from jaxllm import distributed
    from jaxllm.config import DistributedConfig
    from jaxllm.utils import atomic_write_text

    for name in ("max_length", "stride"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise JaxllmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_length is not None and args.stride is not None:
        _check_stride(args.max_length, args.stride)  # before the model is read
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise JaxllmError(f"--output {args.output}: its directory does not exist")
    distributed.initialize(DistributedConfig())  # several processes join from the environment, as generate
    scorer = load_scorer(args.model, args.tokenizer)
    sources = [SourceConfig(path=p, text_field=args.text_field, text_unit=args.text_unit) for p in args.data]
    show = jax.process_index() == 0

    def progress(done: int, total: int) -> None:
        if show and (done == total or sys.stderr.isatty() or done % max(total // 10, 1) == 0):
            end = "\n" if done == total or not sys.stderr.isatty() else ""
            print(f"\rperplexity: {done}/{total} batches", end=end, file=sys.stderr, flush=True)

    result = perplexity(scorer, sources, args.max_length, args.stride, args.batch_size, args.limit, progress)
    if not show:
        return 0
    print(f"{result['model']}: windows of {result['max_length']} tokens, stride {result['stride']}"
          f"{', BOS first' if result['bos'] else ''}")
    for name, r in [*result["sources"].items(), *([("all", result["all"])] if "all" in result else [])]:
        print(f"{name}: {r['documents']:,} documents, {r['tokens']:,} tokens, {r['words']:,} words, "
              f"{r['bytes']:,} bytes\n  token perplexity {r['token_perplexity']:.4f}, word perplexity "
              f"{r['word_perplexity']:.4f}, byte perplexity {r['byte_perplexity']:.4f}, bits per byte "
              f"{r['bits_per_byte']:.4f}")
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0
