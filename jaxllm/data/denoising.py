"""Corruptions for encoder-decoder pretraining, as numpy functions of one example's tokens.

- T5 span corruption: `random_spans_noise_mask` (T5's, with its rounding) and `span_corruption`.
- BART: `sentence_ends` / `permute_sentences` (sentence permutation), `infilling_plan` / `infill`
  (text infilling: Poisson-length spans, each replaced by one mask token).
- Prefix LM (UL2's S-denoiser): `prefix_split`.

What is random (a plan: noise mask, span plan, sentence order, split point) is drawn by one function from
a numpy Generator; applying a plan is a separate, deterministic function, so tests can fix a plan and
check the result by hand. Token arrays are 1-D int32 `[n]`; masks are bool `[n]`.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

# ------------------------------------------------------------------------------------ T5 span corruption


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) that `random_spans_noise_mask` makes for `length` tokens.

    T5's arithmetic, float32 and round-half-to-even as tf.round: noise = round(length * density) kept in
    [1, length - 1], spans = max(round(noise / mean), 1). A length of 1 is treated as 2 (T5's).
    """
    length = max(length, 2)
    noise = int(np.round(np.float32(length) * np.float32(noise_density)))
    noise = min(max(noise, 1), length - 1)
    spans = max(int(np.round(np.float32(noise) / np.float32(mean_span_length))), 1)
    return noise, spans


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(encoder, decoder) lengths of `span_corruption` + EOS for `length` tokens: the same for every mask."""
    if length == 1:  # the mask is cut back to one non-noise token: [t, EOS] and [sentinel, EOS]
        return 2, 2
    noise, spans = span_counts(length, noise_density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def random_spans_noise_mask(
    length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
    """T5's `random_spans_noise_mask` (random_roll=False): bool [length], True = noise.

    The tokens are cut into alternating non-noise and noise spans, starting with non-noise and ending
    with noise; the span lengths are random partitions of the non-noise and noise counts (`span_counts`)
    into that many non-empty parts.
    """
    padded = max(length, 2)
    noise, spans = span_counts(length, noise_density, mean_span_length)
    noise_lengths = _random_segmentation(noise, spans, rng)
    nonnoise_lengths = _random_segmentation(padded - noise, spans, rng)
    return spans_to_mask(nonnoise_lengths, noise_lengths)[:length]


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random partition of `num_items` into `num_segments` non-empty segments."""
    first_in_segment = np.zeros(num_items, np.int64)
    first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(first_in_segment), minlength=num_segments)


def spans_to_mask(nonnoise_lengths: np.ndarray, noise_lengths: np.ndarray) -> np.ndarray:
    """Alternating spans, non-noise first: ([2, 1], [1, 3]) -> [F F T F T T T]."""
    lengths = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.arange(len(lengths)) % 2 == 1, lengths)


def replace_noise_spans(tokens: np.ndarray, noise_mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """T5's noise_span_to_unique_sentinel: the i-th run of noise tokens becomes the one token sentinels[i]."""
    previous = np.concatenate([[False], noise_mask[:-1]])
    first = noise_mask & ~previous
    count = int(first.sum())
    if count > len(sentinels):
        raise ValueError(f"{count} noise spans but only {len(sentinels)} sentinel ids")  # a bug: sized by span_counts
    out = tokens.copy()
    out[first] = sentinels[:count]
    return out[~(noise_mask & previous)]


def span_corruption(tokens: np.ndarray, noise_mask: np.ndarray, sentinels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) without EOS: inputs keep the non-noise tokens with one sentinel per noise span;
    targets are each noise span after the sentinel that replaced it (T5's span_corruption)."""
    return replace_noise_spans(tokens, noise_mask, sentinels), replace_noise_spans(tokens, ~noise_mask, sentinels)


# ------------------------------------------------------------------------------------------------ BART


class SentenceEnds:
    """Which token ids end a sentence: those whose text holds a newline or ends in `.`, `!` or `?`.

    For the bundled corpus a document is a chapter with one verse per line, so sentences are verses, or
    the parts of a verse that end in a full stop. Decided once per id, from the id's own text.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self._decode = decode
        self._known: dict[int, bool] = {}

    def _ends(self, token: int) -> bool:
        if token not in self._known:
            text = self._decode([token])
            self._known[token] = "\n" in text or text.rstrip().endswith((".", "!", "?"))
        return self._known[token]

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """bool [n]: True where a sentence ends after this token."""
        return np.fromiter((self._ends(int(t)) for t in tokens), bool, count=len(tokens))


def sentence_bounds(is_end: np.ndarray) -> np.ndarray:
    """Start offsets of the sentences plus the total length: [F T F F T F] -> [0, 2, 5, 6].

    A run of ending tokens ends one sentence ("!" then a newline); tokens after the last sentence end
    form a last sentence of their own."""
    cuts = np.flatnonzero(is_end[:-1] & ~is_end[1:]) + 1
    return np.concatenate([[0], cuts, [len(is_end)]]).astype(np.int64)


def permute_sentences(tokens: np.ndarray, bounds: np.ndarray, order: np.ndarray) -> np.ndarray:
    """The sentences (between consecutive `bounds`) in the order `order` (a permutation of their indices)."""
    pieces = [tokens[bounds[i] : bounds[i + 1]] for i in order]
    return np.concatenate(pieces) if pieces else tokens[:0]


def infilling_plan(
    length: int, mask_ratio: float, poisson_lambda: float, rng: np.random.Generator, max_spans: Optional[int] = None
) -> list[tuple[int, int]]:
    """BART's text-infilling spans for `length` tokens: sorted, non-overlapping (start, span length) pairs.

    Span lengths are drawn from Poisson(poisson_lambda) until they cover round(length * mask_ratio)
    tokens (the last one is cut to fit, as in fairseq). A span of length 0 inserts a mask; insertions
    beyond `max_spans` spans in all are dropped, so the corrupted text fits its row. The spans are placed
    uniformly at random among the unmasked tokens, in the order drawn.
    """
    budget = int(round(length * mask_ratio))
    if budget == 0:
        return []
    lengths: list[int] = []
    covered = 0
    while covered < budget:  # draw a budget's worth at a time: a small lambda gives many empty spans
        for draw in rng.poisson(poisson_lambda, size=budget):
            lengths.append(min(int(draw), budget - covered))
            covered += lengths[-1]
            if covered == budget:
                break
    if max_spans is not None:
        insertions = np.flatnonzero(np.asarray(lengths) == 0)
        dropped = set(insertions[max(max_spans - (len(lengths) - len(insertions)), 0) :].tolist())
        lengths = [n for i, n in enumerate(lengths) if i not in dropped]
    # Stars and bars: the kept tokens and the spans in one line, spans at k random places of kept + k.
    kept, k = length - budget, len(lengths)
    places = np.sort(rng.choice(kept + k, size=k, replace=False))
    masked_before = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    starts = places - np.arange(k) + masked_before
    return [(int(s), int(n)) for s, n in zip(starts, lengths)]


def bart_plan(
    length: int, num_sentences: int, permute: bool, mask_ratio: float, poisson_lambda: float,
    rng: np.random.Generator, max_spans: Optional[int] = None,
) -> tuple[np.ndarray, list[tuple[int, int]]]:  # fmt: skip
    """BART's noise for `length` tokens: (sentence order, infilling spans), applied in that order as
    fairseq does: permute the sentences, then infill the permuted text."""
    order = rng.permutation(num_sentences) if permute else np.arange(num_sentences)
    return order, infilling_plan(length, mask_ratio, poisson_lambda, rng, max_spans)


def infill(tokens: np.ndarray, spans: list[tuple[int, int]], mask_id: int) -> np.ndarray:
    """Each (start, length) span replaced by one `mask_id`; a length-0 span inserts one before `start`."""
    pieces, at = [], 0
    mask = np.asarray([mask_id], tokens.dtype)
    for start, n in spans:
        pieces += [tokens[at:start], mask]
        at = start + n
    pieces.append(tokens[at:])
    return np.concatenate(pieces)


# ------------------------------------------------------------------------------------------- prefix LM


def prefix_split(length: int, rng: np.random.Generator) -> int:
    """A split point uniform in [1, length - 1], so both prefix and suffix are non-empty (0 for one token)."""
    return int(rng.integers(1, length)) if length >= 2 else 0


def prefix_lm_lengths(length: int) -> tuple[int, int]:
    """The longest (encoder, decoder) a prefix-LM split of `length` tokens can make, with a mode token
    before the prefix and EOS after both sides."""
    if length == 1:
        return 2, 2  # [mode, EOS] and [t, EOS]
    return length + 1, length
