"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling, and the
logits processors before it (repetition penalty, no-repeat n-grams, minimum new tokens)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Next tokens [B]. temperature 0 = greedy; top_k 0 and top_p 1 switch those filters off.

    Filters apply to the temperature-scaled distribution: keep the k most likely tokens, then the
    smallest set whose probability reaches top_p (the most likely token is always kept).
    """
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth_BV = jax.lax.top_k(logits_BV, min(top_k, logits_BV.shape[-1]))[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_BV, neg_inf, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Probability mass strictly before each sorted token; keep tokens whose preceding mass < top_p.
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < top_p
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, neg_inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


class Penalties(NamedTuple):
    """Logits processors of greedy, sampled and beam decoding, defined as transformers' (static: each
    setting compiles its own loop; the defaults switch them all off).

    repetition_penalty: RepetitionPenaltyLogitsProcessor: a logit of a token already in the sequence
        (prompt included) is divided by it when positive and multiplied by it when negative.
    no_repeat_ngram_size: NoRepeatNGramLogitsProcessor: no n-gram of this size occurs twice (prompt included).
    min_new_tokens: MinNewTokensLengthLogitsProcessor: the stop ids are banned until this many new tokens.
    """

    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0

    def apply(self, logits_BV, tokens_BL, valid_BL, end, t, stop_ids) -> jax.Array:
        """logits_BV with the penalties applied, in transformers' order. tokens_BL: each row's sequence so
        far (prompt and new tokens), valid_BL marking its real slots (not padding, not yet written), which
        end at `end` (the same slot for every row); t: new tokens so far; stop_ids: the ids that end a row."""
        if self.repetition_penalty != 1.0:
            logits_BV = repetition_penalty(logits_BV, tokens_BL, valid_BL, self.repetition_penalty)
        if self.no_repeat_ngram_size > 0:
            logits_BV = no_repeat_ngram(logits_BV, tokens_BL, valid_BL, end, self.no_repeat_ngram_size)
        if self.min_new_tokens > 0:
            logits_BV = suppress_stops(logits_BV, stop_ids, t < self.min_new_tokens)
        return logits_BV


def _token_mask(ids_BN: jax.Array, keep_BN: jax.Array, vocab: int) -> jax.Array:
    """[B, vocab] booleans: True at the ids of each row that `keep_BN` marks."""
    rows_B1 = jnp.arange(ids_BN.shape[0])[:, None]
    mask = jnp.zeros((ids_BN.shape[0], vocab + 1), bool)  # a spare column takes the ids not kept
    return mask.at[rows_B1, jnp.where(keep_BN, ids_BN, vocab)].set(True)[:, :vocab]


def repetition_penalty(logits_BV, tokens_BL, valid_BL, penalty: float) -> jax.Array:
    """CTRL's repetition penalty as transformers applies it: seen tokens' logits / penalty when > 0,
    * penalty when < 0 (penalty > 1 discourages repeats)."""
    seen_BV = _token_mask(tokens_BL, valid_BL, logits_BV.shape[-1])
    penalised = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    return jnp.where(seen_BV, penalised, logits_BV)


def no_repeat_ngram(logits_BV, tokens_BL, valid_BL, end, n: int) -> jax.Array:
    """Bans every token that would complete an n-gram already in the row: each window of n real tokens
    whose first n-1 match the row's last n-1 tokens bans its last token."""
    L = tokens_BL.shape[1]
    if L < n:
        return logits_BV
    windows_BWN = jnp.stack([tokens_BL[:, i:L - n + 1 + i] for i in range(n)], axis=-1)
    real_BW = jnp.all(jnp.stack([valid_BL[:, i:L - n + 1 + i] for i in range(n)], axis=-1), axis=-1)
    # The last n-1 tokens end at `end`; a row with fewer real tokens has no real window either.
    suffix_BN = jax.lax.dynamic_slice_in_dim(tokens_BL, jnp.maximum(end - (n - 1), 0), n - 1, axis=1)
    match_BW = jnp.all(windows_BWN[:, :, :-1] == suffix_BN[:, None, :], axis=-1) & real_BW
    banned_BV = _token_mask(windows_BWN[:, :, -1], match_BW, logits_BV.shape[-1])
    return jnp.where(banned_BV, -jnp.inf, logits_BV)


def suppress_stops(logits_BV, stop_ids, active) -> jax.Array:
    """The stop ids' logits at -inf while `active` (min_new_tokens not reached)."""
    stop_V = jnp.isin(jnp.arange(logits_BV.shape[-1]), stop_ids)
    return jnp.where(stop_V & active, -jnp.inf, logits_BV)
