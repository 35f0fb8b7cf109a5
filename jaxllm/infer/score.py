"""`jaxllm score`: a reward model's scores of a jsonl file, written beside every field of each row.

Rows are one response to score (`prompt` + `completion`, or `messages`, or `text`) or a preference pair
(`prompt` + `chosen` + `rejected`; or `chosen` + `rejected` alone, whole conversations), strings or chat
message lists rendered with the model's chat template as training renders them (data/chat.py, with the
run's `data` settings). A row gets `score`, a pair `score_chosen` and `score_rejected`; on pairs the
accuracy (the share with score_chosen > score_rejected) is returned and printed.

The model is a jaxllm run or checkpoint trained with `model.head: reward`, or a Hugging Face
`*ForSequenceClassification` directory (num_labels=1). A sequence's reward is read at its last token, as
training reads it; for a Hugging Face model with a `pad_token_id`, at the last token that is not padding,
as transformers does (the same unless the tokenizer pads with the EOS that ends every sequence).
Sequences are scored `batch_size` at a time, one per row, padded to a few lengths (powers of two) so that
a file compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxllm import models, sharding
from jaxllm.config import DataConfig, JaxllmError, MeshConfig, ModelConfig
from jaxllm.convert.hf_io import read_hf_config
from jaxllm.data.chat import ChatEncoder, ChatFields
from jaxllm.data.readers import RecordError, json_objects
from jaxllm.data.sft import chat_template_for
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer_from_files
from jaxllm.train.checkpoint import find_checkpoint
from jaxllm.train.frozen import open_pretrained
from jaxllm.utils import atomic_write_text

log = logging.getLogger("jaxllm")

MIN_BUCKET = 16


@dataclasses.dataclass
class RewardModel:
    cfg: ModelConfig
    graphdef: Any
    params: Any
    tokenizer: Tokenizer
    data: DataConfig  # how the run rendered records (chat template, BOS)
    pad_token_id: int | None  # a Hugging Face model's: rewards are read at the last token that is not it


def load_reward_model(path: str | Path, mesh=None, rules=None) -> RewardModel:
    """A reward model from a jaxllm run or checkpoint, or a Hugging Face directory, on all devices (fsdp), or
    sharded on `mesh` by `rules` (e.g. the training mesh, for rewards in online RL)."""
    pretrained = open_pretrained(path)
    if pretrained.config.head != "reward":
        raise JaxllmError(f"--model {path} is not a reward model (model.head={pretrained.config.head}); train one with "
                          "data.objective.name=reward and model.head=reward, or give a *ForSequenceClassification "
                          "directory")
    if not pretrained.tokenizer_files:
        raise JaxllmError(f"--model {path} carries no tokenizer files; a reward model needs its tokenizer")
    mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    params = pretrained.params(mesh, rules if rules is not None else sharding.make_rules())
    if (Path(path) / "config.json").is_file():
        data, pad = DataConfig(), read_hf_config(Path(path)).get("pad_token_id")
    else:
        checkpointer, step = find_checkpoint(path)
        data, pad = checkpointer.restore_meta(step, with_data=False).config.data, None
    return RewardModel(pretrained.config, models.model_spec(pretrained.config)[0], params,
                       load_tokenizer_from_files(pretrained.tokenizer_files), data, pad)


class RecordEncoder:
    """A jsonl row -> the token ids of its one sequence or its two (chosen, rejected)."""

    def __init__(self, model: RewardModel):
        o = model.data.objective
        self.fields = ChatFields(o.messages_field, o.prompt_field, o.completion_field)
        tok = model.tokenizer
        self.encoder = ChatEncoder(tok, chat_template_for(model.data, tok), self.fields,
                                   bos_id=tok.bos_id if model.data.add_bos else None)

    def __call__(self, record: dict) -> tuple[bool, list[list[int]]]:
        """(is a pair, sequences)."""
        if "chosen" in record and "rejected" in record:
            if self.fields.prompt in record:
                prompt = record[self.fields.prompt]
                return True, [self.encoder.encode({self.fields.prompt: prompt, self.fields.completion: record[k]})[0]
                              for k in ("chosen", "rejected")]
            return True, [self._whole(record[k]) for k in ("chosen", "rejected")]
        return False, [self.encoder.encode(record)[0]]

    def _whole(self, value) -> list[int]:
        if isinstance(value, list):
            return self.encoder.encode({self.fields.messages: value})[0]
        return self.encoder.encode({self.fields.prompt: "", self.fields.completion: value})[0]


def reward_position(ids: list[int], pad_token_id: int | None) -> int:
    """Where a sequence's reward is read: its last token, or (a Hugging Face model) its last non-pad token."""
    if pad_token_id is not None:
        real = [i for i, t in enumerate(ids) if t != pad_token_id]
        return real[-1] if real else 0
    return len(ids) - 1


def bucket(length: int, limit: int) -> int:
    """The padded length of a batch whose longest sequence has `length` tokens: a power of two (>= 16)."""
    return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), limit)


def score_sequences(model: RewardModel, sequences: list[list[int]], batch_size: int,
                    progress: bool = True) -> np.ndarray:
    """float32 [N]: the reward of each sequence (longer than the model's context: its last tokens)."""
    limit = model.cfg.max_seq_len
    if any(len(s) > limit for s in sequences):
        log.warning("%d sequences are longer than the model's %d tokens: their last %d are scored",
                    sum(len(s) > limit for s in sequences), limit, limit)
    sequences = [s[-limit:] for s in sequences]

    out = np.zeros(len(sequences), np.float32)
    bar = tqdm(total=len(sequences), desc="scoring", unit="seq", disable=not progress)
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        L = bucket(max(map(len, chunk)), limit)
        tokens, segments = np.zeros((batch_size, L), np.int32), np.zeros((batch_size, L), np.int32)
        for i, s in enumerate(chunk):
            tokens[i, :len(s)], segments[i, :len(s)] = s, 1
        positions = np.broadcast_to(np.arange(L, dtype=np.int32), (batch_size, L))
        r = np.asarray(_rewards(model.params, tokens, positions, segments, graphdef=model.graphdef))
        at = [reward_position(s, model.pad_token_id) for s in chunk]
        out[start:start + len(chunk)] = r[np.arange(len(chunk)), at]
        bar.update(len(chunk))
    bar.close()
    return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _rewards(params, tokens, positions, segments, *, graphdef):
    """The reward head's output [B, L] (compiled once per shape and model, not once per call)."""
    return models.bind(graphdef, params)(tokens, positions, segments)[0]


def read_jsonl(path: str | Path) -> list[dict]:
    rows = [row for _, row in json_objects(path, "prompt/completion, messages or prompt/chosen/rejected rows")]
    if not rows:
        raise JaxllmError(f"--data {path} holds no rows")
    return rows


def score_file(model_path: str | Path, data: str | Path, out: str | Path, batch_size: int = 16,
               progress: bool = True) -> dict[str, float]:
    """Scores every row of `data` and writes them with their scores to `out` (atomically). Returns
    {"rows", "pairs", and on pairs "accuracy"}."""
    if batch_size < 1:
        raise JaxllmError(f"--batch-size must be >= 1, got {batch_size}")
    model = load_reward_model(model_path)
    rows, encode = read_jsonl(data), RecordEncoder(model)
    kinds, sequences = [], []
    for n, row in enumerate(rows, 1):
        try:
            is_pair, seqs = encode(row)
        except RecordError as e:
            raise JaxllmError(f"{data}:{n}: {e}") from None
        kinds.append(is_pair)
        sequences += seqs
    scores, at, lines, right = score_sequences(model, sequences, batch_size, progress), 0, [], 0
    for row, is_pair in zip(rows, kinds):
        if is_pair:
            chosen, rejected = float(scores[at]), float(scores[at + 1])
            row = {**row, "score_chosen": chosen, "score_rejected": rejected}
            right, at = right + (chosen > rejected), at + 2
        else:
            row, at = {**row, "score": float(scores[at])}, at + 1
        lines.append(json.dumps(row, ensure_ascii=False))
    if jax.process_index() == 0:
        atomic_write_text(Path(out), "\n".join(lines) + "\n")
    pairs = sum(kinds)
    result: dict[str, float] = {"rows": len(rows), "pairs": pairs}
    if pairs:
        result["accuracy"] = right / pairs
    return result
