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


def rows(prompts: list[np.ndarray], completions: np.ndarray, completion_mask: np.ndarray, seq_len: int
         ) -> dict[str, np.ndarray]:
    """One row per completion (objectives.py): prompt + completion tokens (those under the mask), shifted,
    right-padded to seq_len; loss_mask 1 on the completion's targets."""
    N = len(prompts)
    out = {k: np.zeros((N, seq_len), np.float32 if k == "loss_mask" else np.int32)
           for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    for i, (p, c, m) in enumerate(zip(prompts, completions, completion_mask)):
        seq = np.concatenate([p, c[: int(m.sum())]])
        n = len(seq) - 1
        out["inputs"][i, :n], out["targets"][i, :n] = seq[:-1], seq[1:]
        out["segment_ids"][i, :n], out["positions"][i, :n] = 1, np.arange(n)
        out["loss_mask"][i, len(p) - 1 : n] = 1.0
    return out
