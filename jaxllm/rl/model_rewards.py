"""Rewards from models, with TRL's reward-function signature: a reward model's score, or a judge's verdict.

- `reward_model` (args: path, batch_size=16): the score of a `model.head: reward` model (a jaxllm run or
  checkpoint, or a Hugging Face *ForSequenceClassification directory) of prompt + completion, rendered as
  the reward model was trained and as `jaxllm score` renders a {prompt, completion} row (jaxllm.infer.score:
  its chat template for conversational prompts, BOS/EOS as its run's data settings), read at the last
  token. Sequences are sorted by length and scored `batch_size` at a time, each batch padded to a power of
  two, so a rollout compiles a few programs once.
- `judge` (args: path, reference_field="answer", template, labels=["A", "B"], batch_size=8): RLAIF with a
  pairwise judge (jaxllm.infer.judge) used pointwise: the judge compares the completion with the record's
  reference answer in both orders, and the reward is the order-averaged probability that the completion is
  the better one (Verdict.prob_a, in [0, 1]; 0.5 for a judge that cannot tell them apart). A record without
  a reference, or a comparison longer than the judge's context, is not scored (None).

Both load their model once (on the training mesh when the trainer passes one), and run on all devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxllm.config import ConfigError, JaxllmError
from jaxllm.data.readers import RecordError
from jaxllm.infer.judge import DEFAULT_LABELS, Judge, load_template, open_model
from jaxllm.infer.score import RecordEncoder, load_reward_model, score_sequences
from jaxllm.rl.verifiable import END_OF_TURN, cut, text_of


class RewardModelReward:
    """f(prompts, completions, **fields) -> the reward model's score of each prompt + completion."""

    __name__ = "reward_model"

    def __init__(self, path: str | Path, mesh=None, rules=None, batch_size: int = 16):
        self.model = load_reward_model(path, mesh, rules)
        self.encode = RecordEncoder(self.model)
        self.batch_size, self.path = batch_size, path

    def sequences(self, prompts: Sequence, completions: Sequence) -> list[list[int]]:
        """The token ids the reward model scores: each prompt + completion as `jaxllm score` encodes the row."""
        fields = self.encode.fields
        out = []
        for prompt, completion in zip(prompts, completions):
            try:
                out.append(self.encode.encoder.encode({fields.prompt: prompt, fields.completion: completion})[0])
            except RecordError as e:
                raise JaxllmError(f"reward model {self.path}: {e}") from None
        return out

    def __call__(self, prompts: list, completions: list, **fields) -> list[float]:
        sequences = self.sequences(prompts, completions)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # batches of similar lengths
        scores = score_sequences(self.model, [sequences[i] for i in order], self.batch_size, progress=False)
        out = np.empty(len(sequences), np.float32)
        out[order] = scores
        return out.tolist()


def prompt_text(prompt: Any) -> str:
    """The instruction a judge reads: a string as is; a conversation's only message's content, or its messages
    as "role: content" paragraphs."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], dict):
        return str(prompt[0].get("content", ""))
    if isinstance(prompt, list):
        return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)
    raise JaxllmError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")


class JudgeReward:
    """f(prompts, completions, **fields) -> P(completion better than the record's reference), from a judge."""

    __name__ = "judge"

    def __init__(self, path: str | Path, mesh=None, rules=None, reference_field: str = "answer",
                 template: str | None = None, labels: Sequence[str] = DEFAULT_LABELS, batch_size: int = 8,
                 stop: Sequence[str] = END_OF_TURN):
        del rules  # the judge shards as `jaxllm judge` does (its run's mesh.rules)
        self.judge = Judge(open_model(path, mesh=mesh), load_template(template), tuple(labels), batch_size,
                           progress=False)
        self.reference_field, self.stop = reference_field, tuple(stop)

    def __call__(self, prompts: list, completions: list, **fields) -> list[float | None]:
        if self.reference_field not in fields:
            raise JaxllmError(f"reward judge: the records have no field {self.reference_field!r} (they have "
                              f"{', '.join(map(repr, fields)) or 'none'}); set args.reference_field to the field "
                              "holding the reference answer")
        references = fields[self.reference_field]
        asked = [i for i, r in enumerate(references) if r is not None]
        verdicts = self.judge.compare([(prompt_text(prompts[i]), cut(text_of(completions[i]), self.stop),
                                        text_of(references[i])) for i in asked])
        out: list[float | None] = [None] * len(completions)
        for i, verdict in zip(asked, verdicts):
            out[i] = None if verdict is None else verdict.prob_a
        return out


ARGS = {"reward_model": ("path", "batch_size"),
        "judge": ("path", "reference_field", "template", "labels", "batch_size", "stop")}


def make(kind: str, args: dict, where: str, *, mesh=None, rules=None):
    """The reward `kind` (reward_model | judge) built from a spec's args; one-line ConfigErrors for bad ones."""
    check(kind, args, where)
    rest = {k: v for k, v in args.items() if k != "path"}
    if kind == "reward_model":
        return RewardModelReward(args["path"], mesh, rules, **rest)
    return JudgeReward(args["path"], mesh, rules, **rest)


def check(kind: str, args: dict, where: str) -> None:
    """A model reward's args checked (their names, the path exists, the batch size) without loading the model."""
    unknown = [k for k in args if k not in ARGS[kind]]
    if unknown:
        raise ConfigError(f"{where}.args: {kind} takes no argument {unknown[0]!r}; its arguments: "
                          f"{', '.join(ARGS[kind])}")
    path = args.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(f"{where}.args.path is missing: the {kind} reward needs the model's directory (a jaxllm "
                          "run or checkpoint, or a Hugging Face model directory)")
    if not Path(path).exists():
        raise ConfigError(f"{where}.args.path {path} does not exist; give the {kind}'s run, checkpoint or Hugging "
                          "Face directory")
    size = args.get("batch_size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f"{where}.args.batch_size must be a positive integer, got {size!r}")
