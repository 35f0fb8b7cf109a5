"""Text generation with a KV cache: one prefill of the (left-padded) prompts, then one token per step.

The whole decode loop is a single jitted `lax.while_loop` that stops when every row has produced EOS
or `max_new_tokens` tokens.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import GenerateConfig, JaxllmError, ModelConfig
from jaxllm.infer.sampling import sample_logits
from jaxllm.models import bind, init_cache


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, P] and mask [B, P] (1 on prompt tokens) with prompts aligned to the right edge."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise JaxllmError("every prompt must have at least one token (an empty prompt needs a BOS token)")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("graphdef", "model_cfg", "max_new_tokens", "temperature", "top_k", "top_p"))
def _generate(
    params, tokens_BP, mask_BP, key, eos_id, pad_id, *, graphdef, model_cfg, max_new_tokens, temperature, top_k, top_p
):
    model = bind(graphdef, params)
    B, P = tokens_BP.shape
    cache = init_cache(model_cfg, B, P + max_new_tokens)
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    logits_BPV, cache = model(tokens_BP, positions_BP, mask_BP, cache)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    key, sub = jax.random.split(key)
    first_B = sample(logits_BPV[:, -1], sub)
    out_BT = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first_B)
    state = dict(
        cache=cache,
        last_B=first_B,
        pos_B=positions_BP[:, -1] + 1,
        done_B=first_B == eos_id,
        out_BT=out_BT,
        t=jnp.array(1, jnp.int32),
        key=key,
    )

    def cond(s):
        return (s["t"] < max_new_tokens) & ~jnp.all(s["done_B"])

    def body(s):
        logits_B1V, cache = model(s["last_B"][:, None], s["pos_B"][:, None], jnp.ones((B, 1), jnp.int32), s["cache"])
        key, sub = jax.random.split(s["key"])
        next_B = sample(logits_B1V[:, 0], sub)
        next_B = jnp.where(s["done_B"], pad_id, next_B)
        return dict(
            cache=cache,
            last_B=next_B,
            pos_B=s["pos_B"] + 1,
            done_B=s["done_B"] | (next_B == eos_id),
            out_BT=s["out_BT"].at[:, s["t"]].set(next_B),
            t=s["t"] + 1,
            key=key,
        )

    return jax.lax.while_loop(cond, body, state)["out_BT"]


def generate(
    graphdef: nnx.GraphDef,
    params: Any,
    model_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    gen: GenerateConfig,
    eos_id: int | None,
    pad_id: int,
) -> list[list[int]]:
    """New tokens for each prompt (token-id lists), cut before the first EOS."""
    tokens, mask = left_pad(prompts, pad_id)
    total = tokens.shape[1] + gen.max_new_tokens
    if total > model_cfg.max_seq_len:
        raise JaxllmError(
            f"prompt of {tokens.shape[1]} tokens + {gen.max_new_tokens} new tokens = {total} exceeds the model's "
            f"context of {model_cfg.max_seq_len}; shorten the prompt or ask for fewer new tokens "
            "(--max-new-tokens, generate.max_new_tokens)"
        )
    out = _generate(
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(gen.seed),
        jnp.int32(-1 if eos_id is None else eos_id),
        jnp.int32(pad_id),
        graphdef=graphdef,
        model_cfg=model_cfg,
        max_new_tokens=gen.max_new_tokens,
        temperature=float(gen.temperature),
        top_k=int(gen.top_k),
        top_p=float(gen.top_p),
    )
    result = []
    for row in np.asarray(out).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        result.append(row)
    return result


def generate_text(
    graphdef: nnx.GraphDef,
    params: Any,
    model_cfg: ModelConfig,
    tokenizer,
    prompts: Sequence[str],
    gen: GenerateConfig,
    add_bos: bool = True,
) -> list[str]:
    """Continuations of text prompts (the prompt itself is not repeated)."""
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    encoded = [bos + tokenizer.encode(p) for p in prompts]
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    outputs = generate(graphdef, params, model_cfg, encoded, gen, tokenizer.eos_id, pad)
    texts = []
    for prompt_ids, new_ids in zip(encoded, outputs):
        # Decode prompt and continuation together: a token's leading space only survives in context.
        prefix, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
        texts.append(full[len(prefix):] if full.startswith(prefix) else tokenizer.decode(new_ids))
    return texts
