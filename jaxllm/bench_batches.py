"""Synthetic batches for `jaxllm bench`: any objective's batch from its batch spec, the packed rows of
prompt + completion examples that SFT-like steps train on, and the rows of preference pairs that DPO-like steps
train on (the examples and pairs TRL's peers get too)."""

from __future__ import annotations

import numpy as np

from jaxllm.config import Config, JaxllmError, ModelConfig


def synthetic_batch(cfg: ModelConfig, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One unpacked document per row of random tokens (a decoder's CLM batch)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "segment_ids": np.ones((batch, seq), np.int32),
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
        "loss_mask": np.ones((batch, seq), np.float32),
    }


# Objectives whose rows are packed prompt + completion examples with the loss on the completions (assistant
# turns): their synthetic batch is `packed_batch`. The others get random tokens in their batch spec's arrays.
PACKED_EXAMPLE_OBJECTIVES = ("sft", "distill")
# Objectives whose rows are preference pairs side by side (jaxllm/data/preference.py): their batch is `pair_batch`.
PAIR_OBJECTIVES = ("dpo", "orpo", "simpo")


def _fill_row(rng: np.random.Generator, seq: int, segments: int, minimum: int) -> list[int]:
    """`segments` lengths of at least `minimum`, each 0.5-1.5x their mean, summing to `seq` exactly."""
    mean = seq / segments
    lengths = [max(minimum, round(mean * rng.uniform(0.5, 1.5))) for _ in range(segments - 1)]
    while sum(lengths) > seq - minimum:  # leave the last one at least `minimum` tokens
        lengths[int(np.argmax(lengths))] -= 1
    lengths.append(seq - sum(lengths))
    return lengths


def synthetic_examples(vocab_size: int, rows: int, seq: int, segments: int = 4,
                       seed: int = 0) -> list[list[tuple[np.ndarray, int]]]:
    """For each of `rows` rows, `segments` examples (random tokens, prompt length) whose lengths vary by up
    to half the mean either way and fill the row exactly; each example's prompt is 30-70% of it, so about
    half the row's tokens are completion tokens (the loss of an SFT batch)."""
    check_segments(segments, seq)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        lengths = _fill_row(rng, seq, segments, 2)
        out.append([(rng.integers(0, vocab_size, n + 1).astype(np.int32),
                     int(np.clip(round(n * rng.uniform(0.3, 0.7)), 1, n - 1))) for n in lengths])
    return out


def check_segments(segments: int, seq: int, pairs: bool = False) -> None:
    """A row of `seq` tokens holds `segments` examples of at least 2 tokens (with `pairs`: pairs of two
    sequences of at least 2 tokens each, a prompt token and a response token)."""
    least, what = (4, "pairs") if pairs else (2, "examples")
    if not 1 <= segments <= seq // least:
        raise JaxllmError(f"--segments {segments}: rows of data.seq_len={seq} tokens hold 1 to {seq // least} {what} "
                          f"(at least {least} tokens each); choose a count in that range")


Pair = tuple[np.ndarray, np.ndarray, np.ndarray]


def synthetic_pairs(vocab_size: int, rows: int, seq: int, segments: int = 4, seed: int = 0) -> list[list[Pair]]:
    """For each of `rows` rows, `segments` preference pairs (prompt, chosen, rejected) of random tokens: a pair's
    two sequences, prompt + chosen and prompt + rejected, take the room of one SFT example
    (`synthetic_examples`: 0.5-1.5x the mean, the pairs filling the row exactly), split 40-60% between them;
    the prompt is 30-70% of the shorter one (at least one token, and one response token each)."""
    check_segments(segments, seq, pairs=True)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        row = []
        for m in _fill_row(rng, seq, segments, 4):
            a = int(np.clip(round(m * rng.uniform(0.4, 0.6)), 2, m - 2))  # prompt + chosen; m - a: prompt + rejected
            prompt = int(np.clip(round(min(a, m - a) * rng.uniform(0.3, 0.7)), 1, min(a, m - a) - 1))
            tokens = rng.integers(0, vocab_size, m - prompt).astype(np.int32)
            row.append((tokens[:prompt], tokens[prompt:a], tokens[a:]))
        out.append(row)
    return out


def pair_batch(pairs: list[list[Pair]], seq: int) -> dict[str, np.ndarray]:
    """A batch of preference rows as jaxllm/data/preference.py makes them from `synthetic_pairs`: the k-th pair
    of a row is segments 2k - 1 (prompt + chosen) and 2k (prompt + rejected); inputs every token of a sequence
    (not shifted), targets the next token within the segment (0 at its last position), positions from 0 in
    each, the loss on the targets that are response tokens."""
    batch = {k: np.zeros((len(pairs), seq), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((len(pairs), seq), np.float32)
    for r, row in enumerate(pairs):
        start, segment = 0, 0
        for prompt, chosen, rejected in row:
            for response in (chosen, rejected):
                tokens, segment = np.concatenate([prompt, response]), segment + 1
                n = len(tokens)
                batch["inputs"][r, start:start + n] = tokens
                batch["targets"][r, start:start + n - 1] = tokens[1:]
                batch["segment_ids"][r, start:start + n], batch["positions"][r, start:start + n] = segment, np.arange(n)
                batch["loss_mask"][r, start + len(prompt) - 1:start + n - 1] = 1.0  # targets len(prompt) .. n - 1
                start += n
    return batch


def packed_batch(examples: list[list[tuple[np.ndarray, int]]], seq: int) -> dict[str, np.ndarray]:
    """A clm-keyed batch of packed examples (`synthetic_examples`): one segment per example, positions from 0
    in each, the loss on the targets that are completion tokens. An example of n + 1 tokens t gives n
    positions: inputs t[:-1], targets t[1:] (its last target stands for the end-of-turn token)."""
    batch = {k: np.zeros((len(examples), seq), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((len(examples), seq), np.float32)
    for r, row in enumerate(examples):
        start = 0
        for s, (tokens, prompt) in enumerate(row):
            n, span = len(tokens) - 1, slice(start, start + len(tokens) - 1)
            batch["inputs"][r, span], batch["targets"][r, span] = tokens[:-1], tokens[1:]
            batch["segment_ids"][r, span], batch["positions"][r, span] = s + 1, np.arange(n)
            batch["loss_mask"][r, start + prompt - 1:start + n] = 1.0  # targets prompt .. n: the completion
            start += n
    return batch


def objective_batch(cfg: Config, batch_size: int, seed: int = 0, packed: bool | None = None,
                    segments: int = 4) -> dict[str, np.ndarray]:
    """A synthetic batch of `cfg`'s objective, shaped by its step's batch spec (`train.objective.step_batch_spec`): packed
    prompt + completion examples for the objectives in PACKED_EXAMPLE_OBJECTIVES (or when `packed`), `segments`
    preference pairs per row for those in PAIR_OBJECTIVES (unless `packed` is False), one
    random document per row for clm (`synthetic_batch`), otherwise random tokens, one segment per row and
    the loss everywhere (encoder and encoder-decoder objectives: their masking does not change the cost)."""
    from jaxllm.train.objective import step_batch_spec

    name, seq = cfg.data.objective.name, cfg.data.seq_len
    spec = step_batch_spec(cfg, batch_size)
    if packed if packed is not None else name in PACKED_EXAMPLE_OBJECTIVES:
        batch = packed_batch(synthetic_examples(cfg.model.vocab_size, batch_size, seq, segments, seed), seq)
    elif name in PAIR_OBJECTIVES and packed is None:
        batch = pair_batch(synthetic_pairs(cfg.model.vocab_size, batch_size, seq, segments, seed), seq)
    elif name == "clm":
        batch = synthetic_batch(cfg.model, batch_size, seq, seed)
    else:
        rng, batch = np.random.default_rng(seed), {}
        for key, (shape, dtype) in spec.items():
            if key.endswith("positions"):
                batch[key] = np.broadcast_to(np.arange(shape[-1]), shape)
            elif key.endswith(("segment_ids", "loss_mask")):
                batch[key] = np.ones(shape)
            else:
                batch[key] = rng.integers(0, cfg.model.vocab_size, shape)
    if set(batch) != set(spec):
        raise ValueError(f"the synthetic batch has {sorted(batch)}, data.objective.name={name} needs {sorted(spec)}")
    return {k: np.asarray(batch[k], spec[k][1]).reshape(spec[k][0]) for k in spec}
