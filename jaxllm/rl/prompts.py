"""Prompts of online RL and the rows of their completions (jaxllm/rl/online.py uses them).

`PromptEncoder` is a source's convert: a record in TRL's prompt format -> the prompt's token ids (a string
encoded as is, BOS first with data.add_bos; a list of messages rendered with the chat template and its
generation prompt), the prompt as the record holds it, and the record (its fields go to the reward functions).
`prompt_pipeline` reads them with the ordinary sources; `rows` lays prompt + completion out as a training row.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain.experimental import WindowShuffleIterDataset

from jaxllm.config import Config, SourceConfig
from jaxllm.data.pipeline import Pipeline
from jaxllm.data.readers import RecordError
from jaxllm.data.sft import chat_template_for
from jaxllm.data.sources import make_source
from jaxllm.rl.rollout import bucket


class PromptEncoder:
    """A source's convert: record -> {"ids": the prompt's tokens, "prompt": as the record holds it, "record"}.
    A string prompt is encoded as is (BOS first with data.add_bos); a list of messages is rendered with the chat
    template and its generation prompt (the assistant's turn begins), as TRL does."""

    def __init__(self, cfg: Config, tokenizer):
        self._tokenizer, self._field = tokenizer, cfg.data.objective.prompt_field
        self._template = chat_template_for(cfg.data, tokenizer)
        self._bos = [tokenizer.bos_id] if cfg.data.add_bos and tokenizer.bos_id is not None else []
        # prompt + completion - 1 inputs fit a row, and prompt + completion the model's context
        self._room = min(cfg.data.seq_len + 1, cfg.model.max_seq_len) - cfg.rl.max_new_tokens

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        prompt = record.get(self._field)
        ids = prompt_ids(prompt, self._tokenizer, self._template, self._bos, self._field)
        if not ids:
            raise RecordError("the prompt has no tokens (an empty prompt needs data.add_bos and a BOS token)")
        if len(ids) > self._room:
            raise RecordError(f"the prompt has {len(ids)} tokens, more than the {self._room} data.seq_len leaves beside "
                              "rl.max_new_tokens; raise data.seq_len or lower rl.max_new_tokens")
        return {"ids": np.asarray(ids, np.int32), "prompt": prompt, "record": record}


def prompt_ids(prompt: Any, tokenizer, template, bos: list[int], field: str = "prompt") -> list[int]:
    """The tokens a model continues for a prompt in TRL's format, as it was trained to see prompts: a string
    encoded as is after `bos`; a list of messages rendered with `template` and its generation prompt, the
    template's special tokens (`</s>`, `<|im_end|>`) as their ids (`Tokenizer.encode_rendered`, as training
    encodes conversations). A RecordError for anything else."""
    if isinstance(prompt, str):
        return bos + tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "role" in m for m in prompt):
        if template is None:
            raise RecordError("prompts in the messages format need a chat template; set data.objective.chat_template "
                              "(e.g. builtin:zephyr) or start from a model that has one")
        return tokenizer.encode_rendered(template.render(prompt, True, tokenizer.special_tokens()))
    raise RecordError(f"field {field!r} must hold the prompt: a string or a list of messages, got {prompt!r:.60}; "
                      "set data.objective.prompt_field to the field that holds it")


def prompt_pipeline(cfg: Config, sources: list[SourceConfig], encode: PromptEncoder, num_epochs: int | None,
                    shuffle: bool) -> Pipeline:
    """The prompts of `sources` (mixed by weight, shuffled in data.shuffle_window), one encoded record at a time."""
    d = cfg.data
    parts = [make_source(s, seed=int(np.random.SeedSequence([d.seed, i]).generate_state(1)[0]),
                         on_bad_record=d.on_bad_record, num_epochs=num_epochs, convert=encode)
             for i, s in enumerate(sources)]
    ds = parts[0] if len(parts) == 1 else grain.IterDataset.mix(parts, [s.weight for s in sources])
    if shuffle and d.shuffle_window > 0:
        ds = WindowShuffleIterDataset(ds, window_size=d.shuffle_window, seed=d.seed)
    layout = {"objective": d.objective.name, "sources": [s.path for s in sources], "process_index": 0,
              "process_count": 1}
    return Pipeline(ds, layout)


def rows(prompts: list[np.ndarray], completions: np.ndarray, completion_mask: np.ndarray, seq_len: int,
         shared_prefix: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """The training rows of completions (objectives.py) and their completion window W, laid out as TRL lays them:
    each prompt left-padded to a shape bucket P (rollout.bucket: the longest prompt's), then its completion's first
    W tokens (the longest completion's bucket, at most the completions' width), shifted by one. Token fields
    [N, P + W - 1] (at most seq_len): the last W positions predict the completion (loss_mask 1 on its tokens, stop
    token included); segment_ids 1 on real tokens, 0 on padding; positions from 0 at each prompt's first token.
    The loss projects only those W positions to the vocabulary.

    `shared_prefix`: the same positions cut in two: `prefix_inputs`, `prefix_positions`, `prefix_segment_ids`
    [N, P - 1] (the prompt but its last token, which the model runs once per group: online.window_logps) and the
    token fields [N, W] of the window alone (inputs: the prompt's last token, then the completion's)."""
    N, T = completions.shape
    lengths = completion_mask.sum(1).astype(int)
    window = min(bucket(max(int(lengths.max()), 1)), T)
    longest = max(len(p) for p in prompts)
    P = max(min(bucket(longest), seq_len + 1 - window), longest)
    full = np.zeros((N, P + window), np.int32)
    real = np.zeros((N, P + window), np.int32)
    for i, (p, c, n) in enumerate(zip(prompts, completions, lengths)):
        full[i, P - len(p):P], real[i, P - len(p):P] = p, 1
        full[i, P:P + n], real[i, P:P + n] = c[:n], 1
    positions = np.maximum(np.cumsum(real, axis=1) - 1, 0).astype(np.int32)
    loss_mask = np.zeros((N, P + window - 1), np.float32)
    loss_mask[:, P - 1:] = completion_mask[:, :window]
    out = {"inputs": full[:, :-1], "targets": full[:, 1:], "segment_ids": real[:, :-1],
           "positions": positions[:, :-1], "loss_mask": loss_mask}
    if not shared_prefix:
        return out, window
    prefix = {f"prefix_{k}": out[k][:, :P - 1] for k in ("inputs", "positions", "segment_ids")}
    return {**prefix, **{k: v[:, P - 1:] for k, v in out.items()}}, window
