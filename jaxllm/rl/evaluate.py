"""Held-out reward: the mean reward of a model's completions of held-out prompts, greedy and sampled.

`held_out_reward(model, records, funcs)` renders each record's prompt as the model was trained (a
conversational prompt with its chat template and generation prompt, data.objective.chat_template or the
tokenizer's; a string prompt after BOS when the run adds one), generates greedy completions, and with
`samples=n` also n sampled ones per prompt, and scores them with the reward functions
(jaxllm.rl.rewards.compute_rewards: the records' fields reach them). Completions end at EOS or a chat
template's end-of-turn token (not kept); a conversational prompt's completion is passed as
[{"role": "assistant", "content": text}], as TRL does.

Fast: prompts are sorted by length and generated `batch_size` rows at a time (batch_size // n prompts when
sampling), each batch padded to full size and its prompts to a power-of-two width, so the whole set compiles
a few decode loops (jaxllm.infer.generate, one jitted while-loop per batch).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from typing import Any, Sequence

import numpy as np

from jaxllm.config import GenerateConfig, JaxllmError
from jaxllm.data import ASSETS
from jaxllm.data.readers import json_objects
from jaxllm.data.sft import chat_template_for
from jaxllm.data.sources import BUILTIN_CORPORA
from jaxllm.infer.generate import CHAT_STOP_TOKENS, generate
from jaxllm.rl.prompts import prompt_ids
from jaxllm.infer.load import LoadedModel
from jaxllm.rl.rewards import compute_rewards, reward_metrics


def read_records(spec: str, limit: int | None = None) -> list[dict]:
    """The records of `builtin:NAME` (a bundled set, e.g. builtin:kjv-rl-valid) or a jsonl(.gz) file."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            raise JaxllmError(f"--data {spec}: no such bundled set; choose one of "
                              f"{', '.join('builtin:' + n for n in BUILTIN_CORPORA if 'rl' in n)}")
        corpus = BUILTIN_CORPORA[name]
        with gzip.open(ASSETS / corpus.file, "rt", encoding="utf-8") as f:
            lines = f.readlines()[corpus.start:corpus.stop]
        records = [json.loads(line) for line in lines]
    else:
        records = [r for _, r in json_objects(spec, "prompt records ({\"prompt\": ..., \"answer\": ...})")]
    records = records[:limit] if limit else records
    if not records:
        raise JaxllmError(f"--data {spec} holds no records")
    return records


class PromptEncoder:
    """A record's prompt -> the token ids the model continues (as it was trained to see prompts)."""

    def __init__(self, model: LoadedModel, prompt_field: str = "prompt"):
        tok = model.tokenizer
        if tok is None:
            raise JaxllmError("the model carries no tokenizer; give one (--tokenizer)")
        self.tok, self.field = tok, prompt_field
        self.template = chat_template_for(model.config.data, tok)
        self.bos = [tok.bos_id] if model.config.data.add_bos and tok.bos_id is not None else []
        ids = [tok.eos_id] if tok.eos_id is not None else []
        self.stops = ids + [i for i in map(tok.token_to_id, CHAT_STOP_TOKENS) if i is not None]

    def __call__(self, record: dict) -> list[int]:
        return prompt_ids(record.get(self.field), self.tok, self.template, self.bos, self.field)


def _width(n: int, limit: int) -> int:
    return min(max(16, 1 << (n - 1).bit_length()), limit)


def complete(model: LoadedModel, encoded: Sequence[list[int]], gen: GenerateConfig, stops: Sequence[int],
             batch_size: int) -> list[list[int]]:
    """gen.num_return_sequences completions (token ids, stop token cut) of each prompt, one prompt's after
    another: prompts sorted by length, batch_size // n prompts per batch, every batch padded to that size."""
    n = gen.num_return_sequences
    per_batch = max(1, batch_size // n)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    limit = model.config.model.max_seq_len - gen.max_new_tokens
    if limit < 1 or any(len(e) > limit for e in encoded):
        raise JaxllmError(f"a prompt of {max(map(len, encoded))} tokens + {gen.max_new_tokens} new ones exceeds the "
                          f"model's {model.config.model.max_seq_len} positions; lower --max-new-tokens")
    out: list[list[int]] = [[] for _ in range(len(encoded) * n)]
    for b, start in enumerate(range(0, len(order), per_batch)):
        chosen = order[start:start + per_batch]
        batch = [encoded[i] for i in chosen]
        batch += [batch[-1]] * (per_batch - len(batch))  # one shape per width: few compilations
        width = _width(max(map(len, batch)), limit)
        new = generate(model.graphdef, model.params, model.config.model, batch,
                       dataclasses.replace(gen, seed=gen.seed + b), list(stops), model.tokenizer.pad_id, width=width)
        for k, i in enumerate(chosen):
            out[i * n:(i + 1) * n] = new[k * n:(k + 1) * n]
    return out


def _decode(tok, ids: list[int]) -> str:
    return tok.decode([i for i in ids if i < tok.vocab_size])


def held_out_reward(model: LoadedModel, records: Sequence[dict], funcs: Sequence[tuple[str, float, Any]], *,
                    samples: int = 0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    max_new_tokens: int = 32, batch_size: int = 64, seed: int = 0,
                    prompt_field: str = "prompt") -> dict[str, float]:
    """{"greedy/reward", "greedy/rewards/NAME/mean", ..., "greedy/reward/TASK"} (and the same under "sampled/"
    with `samples` > 0: n completions per prompt, plus "sampled/pass@n": the share of prompts with a sample of
    total reward > 0 -- for 0/1 rewards, some sample right). TASK: the records' "task" field, when they have one."""
    if batch_size < 1 or samples < 0 or max_new_tokens < 1:
        raise JaxllmError("batch_size and max_new_tokens must be >= 1 and samples >= 0")
    encode = PromptEncoder(model, prompt_field)
    encoded = [encode(r) for r in records]
    runs = [("greedy", GenerateConfig(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed))]
    if samples:
        runs.append(("sampled", GenerateConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                               top_p=top_p, seed=seed, num_return_sequences=samples)))
    out: dict[str, float] = {"prompts": float(len(records))}
    for label, gen in runs:
        n = gen.num_return_sequences
        ids = complete(model, encoded, gen, encode.stops, batch_size)
        texts = [_decode(model.tokenizer, i) for i in ids]
        prompts = [r[prompt_field] for r in records for _ in range(n)]
        completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t
                       for p, t in zip(prompts, texts)]
        rows = [r for r in records for _ in range(n)]
        total, per = compute_rewards(funcs, prompts, completions, rows, completion_ids=ids)
        out.update({f"{label}/{k}": v for k, v in reward_metrics(total, per).items()})
        tasks = [r.get("task") for r in rows]
        for task in sorted({t for t in tasks if isinstance(t, str)}):
            values = total[[t == task for t in tasks]]
            out[f"{label}/reward/{task}"] = float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")
        if n > 1:
            out[f"{label}/pass@{n}"] = float(np.mean(np.nan_to_num(total.reshape(-1, n), nan=0.0).max(axis=1) > 0))
    return out
