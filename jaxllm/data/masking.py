"""BERT's masked language modelling with RoBERTa's dynamic masking, on packed rows.

A plan picks round(mask_prob * maskable tokens) positions of a row (at least one when any is maskable)
and, for each, an action: the mask token (mask_token_prob), a random ordinary token (random_token_prob),
or the token unchanged (the rest): BERT's 80/10/10. `MaskRows` draws the plan of row `index` of the
stream from (seed, process, index), so a document gets new masks in every epoch (it lands in another
row) while a resumed run makes exactly the masks it would have made.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

NOT_SELECTED, MASK, RANDOM, KEEP = 0, 1, 2, 3  # the action for each position
_SALT = 0x6D6C6D  # separates these random streams from the other users of data.seed


def mlm_plan(
    maskable: np.ndarray, mask_prob: float, mask_token_prob: float, random_token_prob: float,
    rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """int8 [L] of actions (NOT_SELECTED, MASK, RANDOM, KEEP) for a row whose bool [L] `maskable` says which
    positions may be predicted (not padding, not BOS/EOS or other specials)."""
    candidates = np.flatnonzero(maskable)
    count = max(int(round(len(candidates) * mask_prob)), 1) if len(candidates) else 0
    chosen = rng.choice(candidates, size=count, replace=False)
    u = rng.random(count)
    actions = np.zeros(len(maskable), np.int8)
    kept_or_random = np.where(u < mask_token_prob + random_token_prob, RANDOM, KEEP)
    actions[chosen] = np.where(u < mask_token_prob, MASK, kept_or_random)
    return actions


def apply_mlm(tokens: np.ndarray, actions: np.ndarray, random_tokens: np.ndarray, mask_id: int) -> np.ndarray:
    """The encoder input: tokens with MASK positions set to `mask_id` and RANDOM ones to `random_tokens`
    (same shape as tokens, only read there)."""
    out = np.where(actions == MASK, mask_id, tokens)
    return np.where(actions == RANDOM, random_tokens, out).astype(tokens.dtype)


class MaskRows:
    """map_with_index transform: a packed row {tokens, tokens_segment_ids, tokens_positions} [L] ->
    {inputs, targets, segment_ids, positions: int32 [L], loss_mask: float32 [L]}.

    `targets` is the original token everywhere; `loss_mask` is 1 exactly at the selected positions.
    `no_predict` are the ids never selected (BOS, EOS, pad, other specials); random tokens are drawn
    uniformly from `ordinary_ids`.
    """

    def __init__(
        self, seed: int, process_index: int, mask_id: int, ordinary_ids: np.ndarray, no_predict: Sequence[int],
        mask_prob: float, mask_token_prob: float, random_token_prob: float,
    ):  # fmt: skip
        self._seed, self._process = seed, process_index
        self._mask_id, self._ordinary = mask_id, ordinary_ids
        self._no_predict = np.asarray(sorted(no_predict), np.int32)
        self._probs = (mask_prob, mask_token_prob, random_token_prob)

    def __call__(self, index: int, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self._seed, _SALT, self._process, index])
        tokens, segment_ids = row["tokens"], row["tokens_segment_ids"]
        maskable = (segment_ids > 0) & ~np.isin(tokens, self._no_predict)
        actions = mlm_plan(maskable, *self._probs, rng)
        random_tokens = self._ordinary[rng.integers(len(self._ordinary), size=len(tokens))]
        return {
            "inputs": apply_mlm(tokens, actions, random_tokens, self._mask_id),
            "targets": tokens,
            "segment_ids": segment_ids,
            "positions": row["tokens_positions"],
            "loss_mask": (actions != NOT_SELECTED).astype(np.float32),
        }
