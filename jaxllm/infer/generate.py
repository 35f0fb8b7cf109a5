"""Text generation with a KV cache: one prefill of the (left-padded) prompts, then one token per step.

The whole decode loop is a single jitted `lax.while_loop` that stops when every row has produced EOS
or `max_new_tokens` tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.config import Config, GenerateConfig, JaxllmError, ModelConfig
from jaxllm.config.checks import validate_generate
from jaxllm.data.chat_template import ChatTemplate
from jaxllm.infer import beam
from jaxllm.infer.sampling import Penalties, sample_logits
from jaxllm.models import bind, init_cache
from jaxllm.sharding import constrain


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens [B, P] and mask [B, P] (1 on prompt tokens) with prompts aligned to the right edge; P is the
    longest prompt's length, or `width` when that is more (a caller's fixed shape: fewer compilations)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise JaxllmError("every prompt must have at least one token (an empty prompt needs a BOS token)")
    width = max(width, *(len(p) for p in prompts))
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return tokens, mask


def decode(
    params, tokens_BP, mask_BP, key, eos_id, pad_id, encoder_tokens_BS=None, encoder_mask_BS=None, live_B=None, *,
    graphdef, model_cfg, max_new_tokens, temperature, top_k, top_p, penalties=Penalties(), beams=None,
    with_logps=False, group=1
):
    """Decoder-only: tokens_BP is the prompt. Encoder-decoder: the encoder reads encoder_tokens_BS once
    and tokens_BP holds the decoder's start token; the prefill puts the memory's cross-attention keys and
    values in the cache, and every step reads them there.

    New tokens [B, T]; with `beams` (BeamSettings) the best hypotheses [B, R, T] and their scores [B, R].
    `key`: one key for the batch, or typed keys [B] (jax.random.key), one per row (a row's samples then do not
    depend on the other rows: online RL's rollouts, jaxllm/rl/rollout.py). `live_B` (bool [B], default all):
    rows marked False are filler that starts finished (pad tokens; a fixed row count need not run the loop
    longer). `with_logps`:
    also each new token's log-probability [B, T] float32, log_softmax(logits / temperature) at the token
    (log_softmax(logits) when greedy), 0 after a row's stop; read from the logits that chose the token, so no
    second forward pass. `group` > 1: tokens_BP holds each prompt once, prefilled once, and the cache, the
    prompt and the encoder memory are then repeated to `group` consecutive rows (n samples of a prompt, online
    RL's rollouts: the prompt's work is done once, not n times); `key`, `live_B` and the results have B * group
    rows. Unjitted: `_generate` is this jitted; callers that place work on a mesh jit it
    themselves under `sharding.activate` (the cache then follows the batch's sharding)."""
    model = bind(graphdef, params)
    memory = None
    if encoder_tokens_BS is not None:
        memory = model.encode(encoder_tokens_BS, _positions(encoder_mask_BS), encoder_mask_BS)

    def step_with(memory):
        if memory is None:
            return model
        return lambda tokens, positions, segment_ids, cache: model.decode(memory, tokens, positions, segment_ids, cache)

    B, P = tokens_BP.shape
    cache = _constrain_cache(init_cache(model_cfg, B, P + max_new_tokens))
    positions_BP = _positions(mask_BP)
    # The prefill fills the cache and projects only the last position to the vocabulary: the logits of the
    # others would be thrown away (the output projection is a large share of a small model's work).
    if memory is None:
        x_BPD, cache, _ = model.hidden(tokens_BP, positions_BP, mask_BP, cache)
    else:
        x_BPD, cache, _ = model.decode_hidden(memory, tokens_BP, positions_BP, mask_BP, cache)
    last_BV = model.logits(x_BPD[:, -1:])[:, 0]
    if group > 1:
        cache = _constrain_cache(beam.expand_cache(cache, group))
        last_BV, positions_BP, tokens_BP, mask_BP = (beam.expand_rows(a, group) for a in
                                                     (last_BV, positions_BP, tokens_BP, mask_BP))
        memory = None if memory is None else beam.expand_rows(memory, group)
        B = B * group
    if beams is not None:
        step = step_with(None if memory is None else beam.expand_rows(memory, beams.num_beams))
        return beam.search(step, cache, last_BV, positions_BP[:, -1] + 1, tokens_BP, mask_BP, eos_id,
                           pad_id, max_new_tokens=max_new_tokens, beams=beams, penalties=penalties)
    step = step_with(memory)
    T = max_new_tokens
    # Typed keys [B]: row b draws step t's token from fold_in(keys[b], t).
    row_keys = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1

    def choose(logits_BV, out_BT, t, key):
        """The next tokens [B] and their log-probabilities [B] (zeros unless with_logps)."""
        if penalties != Penalties():
            seq_BL = jnp.concatenate([tokens_BP, out_BT], axis=1)
            valid_BL = jnp.concatenate([mask_BP > 0, jnp.broadcast_to(jnp.arange(T) < t, (B, T))], axis=1)
            logits_BV = penalties.apply(logits_BV, seq_BL, valid_BL, P + t, t, eos_id)
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        if row_keys:
            keys_B = jax.vmap(jax.random.fold_in, (0, None))(key, t)
            next_B = jax.vmap(lambda logits_V, k: sample_logits(logits_V[None], k, **settings)[0])(logits_BV, keys_B)
        else:
            next_B = sample_logits(logits_BV, key, **settings)
        logp_B = jnp.zeros((B,), jnp.float32)
        if with_logps:
            scaled_BV = logits_BV.astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
            logp_B = jnp.take_along_axis(jax.nn.log_softmax(scaled_BV, axis=-1), next_B[:, None], axis=-1)[:, 0]
        return next_B, logp_B

    if row_keys:
        key, sub = key, key
    else:
        key, sub = jax.random.split(key)
    out_BT = jnp.full((B, T), pad_id, jnp.int32)
    live_B = jnp.ones((B,), bool) if live_B is None else live_B
    first_B, logp_B = choose(last_BV, out_BT, 0, sub)
    first_B, logp_B = jnp.where(live_B, first_B, pad_id), jnp.where(live_B, logp_B, 0.0)
    logps_BT = jnp.zeros((B, T if with_logps else 0), jnp.float32)
    state = dict(
        cache=cache,
        last_B=first_B,
        pos_B=positions_BP[:, -1] + 1,
        done_B=jnp.isin(first_B, eos_id) | ~live_B,
        out_BT=out_BT.at[:, 0].set(first_B),
        logps_BT=logps_BT.at[:, 0].set(logp_B) if with_logps else logps_BT,
        t=jnp.array(1, jnp.int32),
        key=key,
    )

    def cond(s):
        return (s["t"] < T) & ~jnp.all(s["done_B"])

    def body(s):
        logits_B1V, cache = step(s["last_B"][:, None], s["pos_B"][:, None], jnp.ones((B, 1), jnp.int32), s["cache"])
        key, sub = (s["key"], s["key"]) if row_keys else jax.random.split(s["key"])
        next_B, logp_B = choose(logits_B1V[:, 0], s["out_BT"], s["t"], sub)
        next_B = jnp.where(s["done_B"], pad_id, next_B)
        logps_BT = s["logps_BT"]
        if with_logps:
            logps_BT = logps_BT.at[:, s["t"]].set(jnp.where(s["done_B"], 0.0, logp_B))
        return dict(
            cache=cache,
            last_B=next_B,
            pos_B=s["pos_B"] + 1,
            done_B=s["done_B"] | jnp.isin(next_B, eos_id),
            out_BT=s["out_BT"].at[:, s["t"]].set(next_B),
            logps_BT=logps_BT,
            t=s["t"] + 1,
            key=key,
        )

    final = jax.lax.while_loop(cond, body, state)
    return (final["out_BT"], final["logps_BT"]) if with_logps else final["out_BT"]


_generate = jax.jit(decode, static_argnames=("graphdef", "model_cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "penalties", "beams", "with_logps", "group"))


def _constrain_cache(cache):
    """The KV cache's rows split like the batch's under `sharding.activate` (a no-op outside it)."""
    kv_names = ("layers", "batch", "cache_length", "act_kv_heads", None)
    return cache._replace(k=constrain(cache.k, kv_names), v=constrain(cache.v, kv_names),
                          segment_ids=constrain(cache.segment_ids, ("batch", "cache_length")),
                          positions=constrain(cache.positions, ("batch", "cache_length")))


def _positions(mask_BP: jax.Array) -> jax.Array:
    """0, 1, ... over the real tokens of left-padded rows (padding gets 0, and segment 0)."""
    return jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)


def generate(
    graphdef: nnx.GraphDef,
    params: Any,
    model_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    gen: GenerateConfig,
    eos_id: int | Sequence[int] | None,
    pad_id: int,
    decoder_start_id: int | None = None,
    width: int = 0,
) -> list[list[int]]:
    """New tokens for each prompt (token-id lists), cut before the first EOS (`eos_id`: one id, or several
    that each end a row, e.g. a chat template's end-of-turn token and EOS).

    For an encoder-decoder the prompts are the encoder's input and decoding starts from
    `decoder_start_id` (T5: pad, BART: EOS). `width`: pad the prompts to at least this many tokens (callers
    that generate many batches use a few widths, so the decode loop compiles a few times). With
    gen.num_return_sequences = n > 1 there are n lists per prompt, one prompt's after another (the n best
    beams, best first, or n samples).
    """
    return generate_scored(graphdef, params, model_cfg, prompts, gen, eos_id, pad_id, decoder_start_id, width)[0]


def generate_scored(
    graphdef: nnx.GraphDef,
    params: Any,
    model_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    gen: GenerateConfig,
    eos_id: int | Sequence[int] | None,
    pad_id: int,
    decoder_start_id: int | None = None,
    width: int = 0,
) -> tuple[list[list[int]], list[float] | None]:
    """`generate`'s token lists and, with beam search (gen.num_beams > 1), each one's score as
    transformers' sequences_scores: the sum of its log-probabilities (after the penalties) divided by
    (new tokens, the EOS counted) ** length_penalty. Scores are None without beam search."""
    validate_generate(gen)
    stops = [] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id)
    beams = None
    if gen.num_beams > 1:
        beams = beam.BeamSettings(gen.num_beams, float(gen.length_penalty), gen.early_stopping, gen.num_return_sequences)
    elif gen.num_return_sequences > 1:  # n samples of each prompt: its row n times
        prompts = [p for p in prompts for _ in range(gen.num_return_sequences)]
    tokens, mask = left_pad(prompts, pad_id, width)
    seq2seq = model_cfg.arch == "encoder_decoder"
    if model_cfg.arch == "encoder":
        raise JaxllmError("an encoder model does not generate text; use a decoder or encoder-decoder checkpoint")
    if model_cfg.head == "reward":
        raise JaxllmError("a reward model (model.head=reward) scores text and does not generate it; use `jaxllm score "
                          "--model ...`, or generate with the language model it was trained from")
    longest = gen.max_new_tokens + (1 if seq2seq else tokens.shape[1])
    if max(longest, tokens.shape[1]) > model_cfg.max_seq_len:
        what = "the prompt" if seq2seq and tokens.shape[1] > model_cfg.max_seq_len else (
            f"prompt of {tokens.shape[1]} tokens + {gen.max_new_tokens} new tokens = {longest}")
        raise JaxllmError(
            f"{what} exceeds the model's context of {model_cfg.max_seq_len}; shorten the prompt or ask for fewer "
            "new tokens (--max-new-tokens, generate.max_new_tokens)"
        )
    encoder = {}
    if seq2seq:
        if decoder_start_id is None:
            raise JaxllmError("an encoder-decoder needs decoder_start_id (T5: the pad id, BART: the EOS id)")
        encoder = {"encoder_tokens_BS": jnp.asarray(tokens), "encoder_mask_BS": jnp.asarray(mask)}
        tokens = np.full((len(prompts), 1), decoder_start_id, np.int32)
        mask = np.ones_like(tokens)
    out = _generate(
        params,
        jnp.asarray(tokens),
        jnp.asarray(mask),
        jax.random.key(gen.seed),
        jnp.asarray(stops if stops else [-1], jnp.int32),
        jnp.int32(pad_id),
        **encoder,
        graphdef=graphdef,
        model_cfg=model_cfg,
        max_new_tokens=gen.max_new_tokens,
        temperature=float(gen.temperature),
        top_k=int(gen.top_k),
        top_p=float(gen.top_p),
        penalties=Penalties(float(gen.repetition_penalty), int(gen.no_repeat_ngram_size), int(gen.min_new_tokens)),
        beams=beams,
    )
    scores = None
    if beams is not None:
        out, scores = out
        scores = np.asarray(scores).reshape(-1).tolist()
    result = []
    for row in np.asarray(out).reshape(-1, gen.max_new_tokens).tolist():
        ends = [row.index(i) for i in stops if i in row]
        result.append(row[: min(ends)] if ends else row)
    return result, scores


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to the earliest occurrence of any stop string (the stop string itself not kept)."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


# Tokens that end an assistant's turn in common chat templates (ChatML / Qwen, Llama-3, Gemma, Phi-3).
CHAT_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def chat_template_of(tokenizer) -> ChatTemplate:
    """The chat template a tokenizer carries (a Hugging Face directory's, or the one a run trained with)."""
    if tokenizer.chat_template is None:
        raise JaxllmError("this model's tokenizer carries no chat template (it was not fine-tuned with one, and "
                          "its tokenizer files name none); generate without --chat")
    return ChatTemplate(tokenizer.chat_template, "the tokenizer's chat template")


def generate_text(
    graphdef: nnx.GraphDef,
    params: Any,
    cfg: Config,
    tokenizer,
    prompts: Sequence[str],
    gen: GenerateConfig,
    chat: bool = False,
) -> list[str]:
    """Continuations of text prompts (the prompt itself is not repeated).

    Decoders continue [BOS] + prompt. Encoder-decoders read the prompt framed as in training (T5:
    prompt + EOS; BART: BOS + prompt + EOS; UL2: the [S] mode token first) and write an answer.
    `chat`: each prompt is a user message rendered with the tokenizer's chat template and its generation
    prompt (the assistant's turn begins); the reply ends at EOS or an end-of-turn token (CHAT_STOP_TOKENS).
    Each text ends before the first of the strings gen.stop (checked on the decoded text after
    generation); with gen.num_return_sequences = n, n texts per prompt, one prompt's after another.
    """
    pad = tokenizer.pad_id
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    start = None
    if cfg.model.arch == "encoder_decoder":
        from jaxllm.data.objectives import special_ids

        if chat:
            raise JaxllmError("--chat renders prompts for decoder models; an encoder-decoder reads the plain prompt")

        ids = special_ids(cfg.data, tokenizer)
        start = ids.decoder_start
        prefix = bos if cfg.data.objective.name == "bart" else []
        if cfg.data.objective.name == "ul2":
            prefix = [ids.modes[d.mode_token] for d in cfg.data.objective.denoisers if d.kind == "prefix_lm"][:1]
        encoded = [prefix + tokenizer.encode(p) + eos for p in prompts]
    elif chat:
        template = chat_template_of(tokenizer)
        variables = tokenizer.special_tokens()
        encoded = [tokenizer.encode_rendered(template.render([{"role": "user", "content": p}], True, variables))
                   for p in prompts]
    else:
        encoded = [(bos if cfg.data.add_bos else []) + tokenizer.encode(p) for p in prompts]
    stops: list[int] = eos + ([i for i in map(tokenizer.token_to_id, CHAT_STOP_TOKENS) if i is not None] if chat else [])
    outputs = generate(graphdef, params, cfg.model, encoded, gen, stops, pad, start)
    per_prompt = gen.num_return_sequences
    texts = []
    for row, new_ids in enumerate(outputs):
        prompt_ids = encoded[row // per_prompt]
        new_ids = [i for i in new_ids if i < tokenizer.vocab_size]  # objective ids (sentinels) have no text
        if cfg.model.arch == "encoder_decoder":
            texts.append(cut_at_stop(tokenizer.decode(new_ids), gen.stop))
            continue
        # Decode prompt and continuation together: a token's leading space only survives in context.
        prefix_text, full = tokenizer.decode(prompt_ids), tokenizer.decode(prompt_ids + new_ids)
        text = full[len(prefix_text):] if full.startswith(prefix_text) else tokenizer.decode(new_ids)
        texts.append(cut_at_stop(text, gen.stop))
    return texts
