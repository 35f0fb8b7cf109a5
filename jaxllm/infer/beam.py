"""Beam search with the KV cache, as transformers' `generate(num_beams=N, do_sample=False)`.

The search follows transformers' vectorised `_beam_search` step for step, so the same model gives the
same tokens and scores: every step extends each of the N running beams of a prompt by every token,
keeps the best K = max(2, 1 + number of stop ids) * N continuations, moves those that end (a stop id,
or the last allowed token) among the top N into the prompt's N finished hypotheses (score = sum of
log-probabilities / new_tokens ** length_penalty, the stop token counted), and continues the best N
that did not end. `early_stopping`: True ends a prompt as soon as N hypotheses are finished; False
(transformers' default) when no running beam, scored at its current length, can beat the worst
finished one; "never" as False but, with length_penalty > 0, scoring the running beams at the longest
allowed length (the canonical beam search).

The beams of B prompts are a batch of B * N rows: the prompt is run once (prefill) and its cache copied
to its N rows, and each step gathers the cache rows of the beams that continue. Rows of one prompt
share positions, segment ids and the encoder memory's keys/values, so only the self-attention keys
and values move.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.infer.sampling import Penalties

NEG = -1.0e9  # transformers' "never chosen" score offset


class BeamSettings(NamedTuple):
    num_beams: int
    length_penalty: float = 1.0
    early_stopping: Any = False  # True | False | "never"
    num_return_sequences: int = 1


def expand_rows(tree: Any, n: int, axis: int = 0) -> Any:
    """Each row repeated n times, consecutively (prompt b's beams are rows b*n .. b*n+n-1)."""
    return jax.tree.map(lambda a: jnp.repeat(a, n, axis=axis), tree)


def expand_cache(cache, n: int):
    """A prefilled cache of B rows as B * n rows (k, v and the cross k, v have the layers first)."""
    layered = {"k": cache.k, "v": cache.v}
    if cache.cross_k is not None:
        layered.update(cross_k=cache.cross_k, cross_v=cache.cross_v)
    return cache._replace(**expand_rows(layered, n, axis=1), segment_ids=expand_rows(cache.segment_ids, n),
                          positions=expand_rows(cache.positions, n))


def _take(a_BK, idx_BN):
    """a[b, idx[b, n]] over the beam axis (1), for arrays [B, K, ...]."""
    idx = idx_BN.reshape(idx_BN.shape + (1,) * (a_BK.ndim - 2))
    return jnp.take_along_axis(a_BK, idx, axis=1)


def search(
    step: Callable,
    cache,
    logits_BV: jax.Array,
    next_pos_B: jax.Array,
    prompt_BP: jax.Array,
    prompt_mask_BP: jax.Array,
    stop_ids: jax.Array,
    pad_id: jax.Array,
    *,
    max_new_tokens: int,
    beams: BeamSettings,
    penalties: Penalties,
) -> tuple[jax.Array, jax.Array]:
    """The best `num_return_sequences` hypotheses of each prompt: tokens [B, R, T] (padded after the
    stop token with pad_id) and their scores [B, R] (transformers' sequences_scores), best first.

    step(tokens [B*N, 1], positions [B*N, 1], segment ids, cache) -> (logits [B*N, 1, V], cache) runs the
    model on the B * N rows; `cache`, `logits_BV` and `next_pos_B` are the prefill's (B rows). stop_ids:
    the ids that end a hypothesis (a never-written id such as -1 when there are none: the K kept is the
    same for none and for one stop id).
    """
    N, T = beams.num_beams, max_new_tokens
    B, P = prompt_BP.shape
    K = max(2, 1 + stop_ids.shape[0]) * N
    lp, early = beams.length_penalty, beams.early_stopping
    cache = expand_cache(cache, N)
    logits_RV = expand_rows(logits_BV, N)
    pos_R = expand_rows(next_pos_B, N)
    prompt_RP, prompt_mask_RP = expand_rows(prompt_BP, N), expand_rows(prompt_mask_BP, N)
    top_n = jnp.arange(K) < N

    def select(s, logits_RV):
        """One step of transformers' beam search on the running beams' next-token logits."""
        t = s["t"]
        logp_RV = jax.nn.log_softmax(logits_RV.astype(jnp.float32), axis=-1)
        if penalties != Penalties():
            seq_RL = jnp.concatenate([prompt_RP, s["run_seq"].reshape(B * N, T)], axis=1)
            valid_RL = jnp.concatenate([prompt_mask_RP > 0, jnp.broadcast_to(jnp.arange(T) < t, (B * N, T))], 1)
            logp_RV = penalties.apply(logp_RV, seq_RL, valid_RL, P + t, t, stop_ids)
        V = logp_RV.shape[-1]
        acc_BX = (logp_RV.reshape(B, N, V) + s["run_score"][:, :, None]).reshape(B, N * V)
        top_logp_BK, top_idx_BK = jax.lax.top_k(acc_BX, K)
        src_BK, token_BK = top_idx_BK // V, (top_idx_BK % V).astype(jnp.int32)
        top_seq_BKT = _take(s["run_seq"], src_BK).at[:, :, t].set(token_BK)
        ends_BK = jnp.isin(token_BK, stop_ids) | (t + 1 >= T)

        # The best N continuations that did not end keep running.
        running_BK = top_logp_BK + ends_BK.astype(jnp.float32) * NEG
        keep_BN = jax.lax.top_k(running_BK, N)[1]
        run_seq, run_score, run_src = _take(top_seq_BKT, keep_BN), _take(running_BK, keep_BN), _take(src_BK, keep_BN)

        # Those among the top N that ended compete for the N finished places.
        ended_BK = ends_BK & top_n[None]
        cand_BK = top_logp_BK / ((t + 1).astype(jnp.float32) ** lp)
        if early is True:
            cand_BK += jnp.all(s["fin"], axis=-1, keepdims=True).astype(jnp.float32) * NEG
        cand_BK += (~s["improvable"]).astype(jnp.float32) * NEG
        cand_BK += (~ended_BK).astype(jnp.float32) * NEG
        best_BN = jax.lax.top_k(jnp.concatenate([s["fin_score"], cand_BK], axis=1), N)[1]
        fin_seq = _take(jnp.concatenate([s["fin_seq"], top_seq_BKT], axis=1), best_BN)
        fin_score = _take(jnp.concatenate([s["fin_score"], cand_BK], axis=1), best_BN)
        fin = _take(jnp.concatenate([s["fin"], ended_BK], axis=1), best_BN)

        # Could a running beam still beat the worst finished hypothesis?
        best_length = T if early == "never" and lp > 0.0 else t + 1
        best_running_B1 = run_score[:, :1] / (jnp.asarray(best_length, jnp.float32) ** lp)
        worst_BN = jnp.where(fin, jnp.min(fin_score, axis=1, keepdims=True), NEG)
        improvable = s["improvable"] & jnp.any(best_running_B1 > worst_BN, axis=-1, keepdims=True)
        go_on = jnp.any(improvable) & ~jnp.all(ends_BK)
        if early is True:
            go_on &= ~jnp.all(fin)
        rows_R = (jnp.arange(B)[:, None] * N + run_src).reshape(-1)
        return dict(s, run_seq=run_seq, run_score=run_score, fin_seq=fin_seq, fin_score=fin_score, fin=fin,
                    improvable=improvable, go_on=go_on, t=t + 1), rows_R

    def reorder(cache, rows_R):
        return cache._replace(k=jnp.take(cache.k, rows_R, axis=1), v=jnp.take(cache.v, rows_R, axis=1))

    state = dict(
        run_seq=jnp.full((B, N, T), pad_id, jnp.int32),
        run_score=jnp.zeros((B, N), jnp.float32).at[:, 1:].set(NEG),
        fin_seq=jnp.full((B, N, T), pad_id, jnp.int32),
        fin_score=jnp.full((B, N), NEG, jnp.float32),
        fin=jnp.zeros((B, N), bool),
        improvable=jnp.ones((B, 1), bool),
        go_on=jnp.array(True),
        t=jnp.array(0, jnp.int32),
    )
    state, rows_R = select(state, logits_RV)
    state.update(cache=reorder(cache, rows_R), pos_R=pos_R)

    def body(s):
        tokens_R1 = s["run_seq"].reshape(B * N, T)[:, s["t"] - 1][:, None]
        logits_R1V, cache = step(tokens_R1, s["pos_R"][:, None], jnp.ones((B * N, 1), jnp.int32), s["cache"])
        s, rows_R = select(s, logits_R1V[:, 0])
        return dict(s, cache=reorder(cache, rows_R), pos_R=s["pos_R"] + 1)

    state = jax.lax.while_loop(lambda s: s["go_on"] & (s["t"] < T), body, state)
    R = beams.num_return_sequences
    return state["fin_seq"][:, :R], state["fin_score"][:, :R]
