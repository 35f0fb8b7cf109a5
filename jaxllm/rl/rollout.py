"""Rollouts for online RL: n sampled completions of each prompt from the live training parameters, with
the per-token log-probabilities of the sampled tokens.

Sampling is `jaxllm.infer.generate`'s KV-cache decode loop (one jitted prefill + `lax.while_loop`), asked
for log-probs and given one key per row. The parameters are used as passed: the training state's arrays,
sharded on the training mesh (no host copy, no second copy on the devices); LoRA/QLoRA parameters sample
from the adapted model, as the forward pass computes it.

Shapes are bucketed so the loop compiles once per bucket, not once per batch: prompts are left-padded to
a bucket width (`bucket`: at least `MIN_WIDTH`, four steps per power of two; at most the context minus
max_new_tokens: `bucket_width`),
and the rows to a caller's fixed count (`rows=`), rounded up to whole groups of n (times the data-parallel
size under a mesh). Each prompt is prefilled once and its KV cache repeated to its n rows (vLLM's prefix
sharing, for the one case a rollout always has: n samples of the same prompt). Filler rows start finished and
are dropped from the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm import sharding
from jaxllm.config import JaxllmError, ModelConfig
from jaxllm.infer.generate import decode, left_pad

MIN_WIDTH = 16  # the narrowest prompt bucket


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn (hashable: static under jit)."""

    num_generations: int = 4  # n samples per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    stop_ids: tuple[int, ...] = ()  # ids that end a completion (EOS, a chat template's end-of-turn), kept in it

    def __post_init__(self):  # a list of stop ids (from YAML) or numpy scalars would not hash
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        for name, kind in (("num_generations", int), ("max_new_tokens", int), ("top_k", int), ("temperature", float),
                           ("top_p", float)):
            object.__setattr__(self, name, kind(getattr(self, name)))


@dataclasses.dataclass
class Rollout:
    """Every array [N, ...] with N = prompts * n, the n rows of one prompt consecutive."""

    prompt_tokens: np.ndarray  # [N, P] int32, left-padded (P: the bucket width)
    prompt_mask: np.ndarray  # [N, P] int32, 1 on prompt tokens
    completion_tokens: np.ndarray  # [N, T] int32, pad after the stop token
    completion_mask: np.ndarray  # [N, T] int32, 1 on generated tokens up to and including the stop token
    logps: np.ndarray  # [N, T] float32, log_softmax(logits / temperature)[token] (greedy: of the logits), 0 on pad
    truncated: np.ndarray  # [N] bool: max_new_tokens reached without a stop token


def bucket(n: int, least: int = MIN_WIDTH) -> int:
    """`n` rounded up to a shape bucket: `least`, then four steps per power of two (16, 20, 24, 28, 32, 40, 48, 56,
    64, 80, 96, ...): at most a quarter of the width is padding, and any range of lengths compiles a few shapes."""
    if n <= least:
        return least
    step = max((1 << ((n - 1).bit_length() - 1)) // 4, 1)
    return -(-n // step) * step


def bucket_width(longest: int, model_cfg: ModelConfig, max_new_tokens: int, limit: int | None = None) -> int:
    """The padded prompt width for a batch whose longest prompt has `longest` tokens: its `bucket`, capped by the
    room the context leaves for the completion (and by `limit`, a caller's widest prompt)."""
    room = model_cfg.max_seq_len - max_new_tokens
    if longest > room:
        raise JaxllmError(
            f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's context of "
            f"{model_cfg.max_seq_len}; drop or truncate prompts longer than {room} tokens, or sample fewer new tokens"
        )
    return max(min(bucket(longest), room, limit or room), longest)


def rollout(
    graphdef: nnx.GraphDef,
    params: Any,
    model_cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    settings: SamplingSettings,
    key: jax.Array,
    pad_id: int,
    *,
    mesh: Mesh | None = None,
    rules: sharding.Rules | None = None,
    rows: int = 0,
) -> Rollout:
    """`settings.num_generations` completions of each prompt (token-id lists), sampled with the KV cache
    from `params` as given. `key`: a typed key (jax.random.key); row i samples from fold_in(key, i), so a
    row's completion does not depend on the batch around it. With `mesh` (and its `rules`) the rows are
    split over the batch axes of the rules, as a train step's batch is, and the cache with them; the
    results are gathered to every process. `rows`: pad the batch to this many rows (prompts * n at most),
    so batches of different sizes share one compiled loop."""
    _check(model_cfg, prompts, settings)
    n = settings.num_generations
    G, N = len(prompts), len(prompts) * n
    if rows and rows < N:
        raise JaxllmError(f"rollout rows={rows} is fewer than the {G} prompts x {n} generations = {N}")
    unit = n  # whole groups: each prompt is prefilled once, then its cache serves its n rows
    if mesh is not None:
        rules = sharding.make_rules() if rules is None else rules
        unit *= sharding.data_parallel_size(mesh, rules)  # the prefill's prompts split over the batch axes too
    R = -(-max(rows, N) // unit) * unit
    width = bucket_width(max(len(p) for p in prompts), model_cfg, settings.max_new_tokens)
    tokens, mask = left_pad([list(p) for p in prompts] + [list(prompts[0])] * (R // n - G), pad_id, width)
    live = np.arange(R) < N
    stops = np.asarray(settings.stop_ids or (-1,), np.int32)
    inputs = (tokens, mask, np.asarray(jax.random.key_data(key)), stops, np.int32(pad_id), live)
    if mesh is not None:
        inputs = tuple(_place(a, mesh, rules, batched=i in (0, 1, 5)) for i, a in enumerate(inputs))
    out, logps = _sample(params, *inputs, graphdef=graphdef, model_cfg=model_cfg, settings=settings,
                         key_impl=str(jax.random.key_impl(key)), mesh=mesh, rules=rules if mesh is not None else None)
    out, logps = np.asarray(out)[:N], np.asarray(logps)[:N]
    return _assemble(np.repeat(tokens[:G], n, 0), np.repeat(mask[:G], n, 0), out, logps, settings.stop_ids)


def _check(model_cfg: ModelConfig, prompts: Sequence[Sequence[int]], settings: SamplingSettings) -> None:
    if model_cfg.arch != "decoder" or model_cfg.head == "reward":
        raise JaxllmError("rollouts sample from a decoder language model (model.arch=decoder, a language-model "
                          f"head); this model is arch={model_cfg.arch}, head={model_cfg.head}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise JaxllmError("rollout needs at least one prompt, each of at least one token (an empty prompt needs a BOS)")
    if settings.num_generations < 1 or settings.max_new_tokens < 1:
        raise JaxllmError(f"rollout needs num_generations >= 1 and max_new_tokens >= 1, got "
                          f"{settings.num_generations} and {settings.max_new_tokens}")
    if settings.temperature < 0 or settings.top_k < 0 or not 0 < settings.top_p <= 1:
        raise JaxllmError(f"rollout sampling needs temperature >= 0 (0: greedy), top_k >= 0 (0: off) and top_p in "
                          f"(0, 1] (1: off), got {settings.temperature}, {settings.top_k} and {settings.top_p}")


def _place(array: np.ndarray, mesh: Mesh, rules: sharding.Rules, batched: bool) -> jax.Array:
    """A global array from the same host value on every process: rows split over the batch axes, or replicated."""
    array = np.asarray(array)
    spec = sharding.batch_sharding(mesh, rules, array.ndim) if batched else NamedSharding(mesh, PartitionSpec())
    return jax.make_array_from_callback(array.shape, spec, lambda index: array[index])


@functools.partial(jax.jit, static_argnames=("graphdef", "model_cfg", "settings", "key_impl", "mesh", "rules"))
def _sample(params, tokens_BP, mask_BP, key_data, stops, pad_id, live_B, *, graphdef, model_cfg, settings, key_impl,
            mesh, rules):
    """The decode loop on the batch's shapes: tokens_BP and mask_BP hold each prompt once (prefilled once), the
    results [B * n, T] n rows per prompt (new tokens, their log-probs); under a mesh the activations (cache
    included) are placed by the rules and the results replicated. Row i samples from fold_in(key, i); the decode
    loop folds in the step."""
    key = jax.random.wrap_key_data(key_data, impl=key_impl)
    keys_B = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(live_B.shape[0]))
    placed = sharding.activate(mesh, rules) if mesh is not None else contextlib.nullcontext()
    with placed:
        out_BT, logps_BT = decode(
            params, tokens_BP, mask_BP, keys_B, stops, pad_id, live_B=live_B, graphdef=graphdef, model_cfg=model_cfg,
            max_new_tokens=settings.max_new_tokens, temperature=float(settings.temperature),
            top_k=int(settings.top_k), top_p=float(settings.top_p), with_logps=True, group=settings.num_generations,
        )
    if mesh is not None:
        everywhere = NamedSharding(mesh, PartitionSpec())
        out_BT, logps_BT = (jax.lax.with_sharding_constraint(a, everywhere) for a in (out_BT, logps_BT))
    return out_BT, logps_BT


def _assemble(tokens, mask, out, logps, stop_ids: Sequence[int]) -> Rollout:
    """The Rollout of the decode loop's rows: each completion ends at (and includes) its first stop id; a
    row without one ran to max_new_tokens (the loop only ends early once every row has stopped)."""
    N, T = out.shape
    is_stop = np.isin(out, np.asarray(stop_ids, np.int32)) if stop_ids else np.zeros_like(out, bool)
    stopped = is_stop.any(axis=1)
    length = np.where(stopped, is_stop.argmax(axis=1) + 1, T)
    completion_mask = (np.arange(T)[None, :] < length[:, None]).astype(np.int32)
    return Rollout(
        prompt_tokens=tokens.astype(np.int32),
        prompt_mask=mask.astype(np.int32),
        completion_tokens=out.astype(np.int32),
        completion_mask=completion_mask,
        logps=np.where(completion_mask > 0, logps, 0.0).astype(np.float32),
        truncated=~stopped,
    )
