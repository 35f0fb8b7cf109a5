"""`jaxllm data preview`: the first rows a training run of a config would train on, as its step sees them.

Rows come from the same pipeline, tokenizer and batch size as a fresh run's first steps (process 0 of one).
The text view decodes each segment (each packed example) and marks the tokens the loss is computed on with
⟦ ⟧; special tokens are shown as their text (`</s>`, `<|im_end|>`), ids the objective adds above the
tokenizer's vocabulary as `<id:N>`. The JSON view is one object per row: `input_ids`, `labels` (the targets,
-100 where the loss mask is 0, Hugging Face's convention), `loss_mask`, `segment_ids`, `positions`; for
encoder-decoder objectives `encoder_input_ids`, `encoder_segment_ids`, `encoder_positions` and the decoder's
fields under the plain names.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np

from jaxllm.config import Config
from jaxllm.data.objectives import tokens_to_add
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_from_files
from jaxllm.train.frozen import open_pretrained

DEFAULT_TOKENIZER = "builtin:kjv-sp4k"
OPEN, CLOSE = "⟦", "⟧"


def run_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer a fresh run of `cfg` trains with: tokenizer.path, else train.init_from's, else the default;
    with the special tokens the run adds (tokenizer.add_special_tokens, a chat template's)."""
    tokenizer = None
    if cfg.tokenizer.path is None and cfg.train.init_from:
        files = open_pretrained(cfg.train.init_from).tokenizer_files
        if files:
            tokenizer = load_tokenizer_from_files(files)
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer.path or DEFAULT_TOKENIZER)
    tokenizer.add_special_tokens([*cfg.tokenizer.add_special_tokens, *tokens_to_add(cfg.data, tokenizer)])
    return tokenizer


def first_rows(cfg: Config, tokenizer: Tokenizer, n: int) -> Iterator[dict[str, np.ndarray]]:
    """The first `n` rows of `cfg`'s training data (fewer when one pass over the sources holds fewer)."""
    pipeline = make_pipeline(cfg.data, tokenizer, cfg.train.batch_size, num_epochs=1)
    try:
        count = 0
        for batch in pipeline:
            for r in range(cfg.train.batch_size):
                row = {k: v[r] for k, v in batch.items()}
                if _segments(row).max() == 0:
                    return  # the padding rows of a last, short batch
                yield row
                count += 1
                if count == n:
                    return
    finally:
        pipeline.close()


def _segments(row: dict[str, np.ndarray]) -> np.ndarray:
    return row["segment_ids"] if "segment_ids" in row else row["decoder_segment_ids"]


def row_json(row: dict[str, np.ndarray]) -> str:
    """One row as a JSON object (module docstring)."""
    prefix = "decoder_" if "decoder_inputs" in row else ""
    mask = row[f"{prefix}loss_mask"] > 0
    out = {}
    if prefix:
        out.update(encoder_input_ids=row["encoder_inputs"], encoder_segment_ids=row["encoder_segment_ids"],
                   encoder_positions=row["encoder_positions"])  # fmt: skip
    out.update(input_ids=row[f"{prefix}inputs"], labels=np.where(mask, row[f"{prefix}targets"], -100),
               loss_mask=row[f"{prefix}loss_mask"], segment_ids=row[f"{prefix}segment_ids"],
               positions=row[f"{prefix}positions"])  # fmt: skip
    return json.dumps({k: np.asarray(v).tolist() for k, v in out.items()})


def row_text(row: dict[str, np.ndarray], tokenizer: Tokenizer, index: int, shifted: bool = True) -> str:
    """One row as text: each segment decoded, the trained tokens marked (module docstring). `shifted`: rows
    whose inputs lack each segment's last token (clm, sft); preference rows hold it (data/preference.py)."""
    prefix = "decoder_" if "decoder_inputs" in row else ""
    inputs, targets = row[f"{prefix}inputs"], row[f"{prefix}targets"]
    mask, segments = row[f"{prefix}loss_mask"] > 0, row[f"{prefix}segment_ids"]
    ids = sorted(set(segments.tolist()) - {0})
    used = int((segments > 0).sum())
    lines = [f"row {index}: {len(ids)} example{'s' * (len(ids) != 1)}, {used}/{len(segments)} positions, "
             f"{int(mask.sum())} trained tokens {OPEN}marked{CLOSE}"]  # fmt: skip
    for s in ids:
        at = segments == s
        x, t, m = inputs[at], targets[at], mask[at]
        if prefix:
            source = row["encoder_inputs"][row["encoder_segment_ids"] == s]
            lines.append(f"  [{s}] encoder: {_show(tokenizer, source, np.zeros(len(source), bool))}")
            lines.append(f"      decoder: {_show(tokenizer, t, m)}")
        elif len(x) > 1 and np.array_equal(x[1:], t[:-1]):  # next-token rows: the text once, trained part marked
            if shifted:  # the last target follows the last input
                x, m = np.append(x, t[-1]), np.append(False, m)
            else:  # preference rows: the inputs are the whole sequence
                m = np.append(False, m[:-1])
            lines.append(f"  [{s}] {_show(tokenizer, x, m)}")
        else:  # masked LM: the corrupted input, and the tokens predicted at the masked positions
            lines.append(f"  [{s}] input:  {_show(tokenizer, x, np.zeros(len(x), bool))}")
            lines.append(f"      target: {_show(tokenizer, np.where(m, t, -1), m)}")
    return "\n".join(lines)


def _show(tokenizer: Tokenizer, ids: np.ndarray, trained: np.ndarray) -> str:
    """The text of `ids` with runs of trained tokens in ⟦ ⟧; specials as their text; -1 (not predicted) as ·.

    Text between special tokens is decoded whole and cut where the marking changes (decoding each run
    alone would drop the space a SentencePiece piece carries at a run's start)."""
    out: list[str] = []
    chunk: list[tuple[int, bool]] = []

    def flush():
        if not chunk:
            return
        ids_ = [i for i, _ in chunk]
        bounds = [k for k in range(1, len(chunk)) if chunk[k][1] != chunk[k - 1][1]] + [len(chunk)]
        start, done = 0, 0
        for end in bounds:
            upto = tokenizer.decode(ids_[:end])
            piece, done = upto[done:], len(upto)
            out.append(f"{OPEN}{piece}{CLOSE}" if chunk[start][1] else piece)
            start = end
        chunk.clear()

    specials = tokenizer.special_ids()
    for i, flag in zip(ids.tolist(), trained.tolist()):
        if i < 0 or i in specials or i >= tokenizer.vocab_size:
            flush()
            piece = "·" if i < 0 else _special_text(tokenizer, i)
            out.append(f"{OPEN}{piece}{CLOSE}" if flag else piece)
        else:
            chunk.append((i, flag))
    flush()
    return "".join(out).replace(CLOSE + OPEN, "").replace("\n", "\\n")


def _special_text(tokenizer: Tokenizer, i: int) -> str:
    if i < tokenizer.vocab_size:
        token = tokenizer.id_to_token(i)
        if token is not None:
            return token
    return f"<id:{i}>"
