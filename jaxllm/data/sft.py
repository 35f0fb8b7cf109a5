"""The batch format of supervised fine-tuning (`data.objective.name: sft`): records -> packed rows.

    record (messages | prompt + completion | text)
    -> ChatEncoder: token ids of the rendered conversation (chat template) and a loss mask on the assistant's
       tokens (jaxllm/data/chat.py)              [in the source, so a bad record is reported with file and line]
    -> shift (inputs = t[:-1], targets = t[1:], loss_mask = mask[1:]); longer than seq_len: truncate or drop
    -> first-fit packing of whole examples into rows of seq_len (never split: segment ids 1, 2, ... keep them
       apart in attention and loss), or one example per row (`packing: false`)

A row has the clm batch fields (`inputs`, `targets`, `segment_ids`, `positions`, `loss_mask`), so the loss is
next-token cross-entropy where loss_mask is 1, divided by the batch's count of such tokens (TRL's
`completion_only_loss` / `assistant_only_loss`, averaged over the batch's loss tokens).

Records without a chat template (plain `text`, string `prompt` + `completion`) get the tokenizer's BOS
first when data.add_bos (the chat templates write their own) and its EOS last (ChatEncoder).
Examples whose loss mask is empty (e.g. no assistant turn, or a prompt longer than the row) train nothing and
are skipped; they and the overlong ones are counted in the log.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from jaxllm.config import DataConfig, SourceConfig
from jaxllm.data.chat import ChatEncoder, ChatFields
from jaxllm.data.chat_template import ChatTemplate, load_chat_template
from jaxllm.data.objectives import BatchFormat, finish_token_row, register_format, token_rows_spec
from jaxllm.data.tokenizer import Tokenizer

log = logging.getLogger("jaxllm.data.sft")


def chat_template_for(cfg: DataConfig, tokenizer: Tokenizer) -> Optional[ChatTemplate]:
    """data.objective.chat_template when set, else the tokenizer's own template, else None."""
    spec = cfg.objective.chat_template
    if spec:
        return load_chat_template(spec)
    if tokenizer.chat_template is not None:
        return ChatTemplate(tokenizer.chat_template, "the tokenizer's chat template")
    return None


class ExampleCounts:
    """Counts of examples changed or skipped on the way to rows, logged at 1, 10, 100, ... of each kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}

    def add(self, kind: str, message: str) -> None:
        with self._lock:
            n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n in (1, 10, 100, 1000) or n % 10000 == 0:
            log.warning("%d %s%s (%s)", n, kind, " so far" if n > 1 else "", message)


class EncodeExample:
    """A source's `convert`: record -> {inputs, targets, loss_mask} of one example (module docstring)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, source: SourceConfig,
                 template: Optional[ChatTemplate], counts: ExampleCounts):  # fmt: skip
        o = cfg.objective
        fields = ChatFields(o.messages_field, o.prompt_field, o.completion_field, source.text_field)
        self._encoder = ChatEncoder(tokenizer, template, fields, o.train_on_all,
                                    bos_id=tokenizer.bos_id if cfg.add_bos else None)
        self._seq_len, self._overlong, self._counts = cfg.seq_len, o.overlong, counts

    def __call__(self, record: dict[str, Any]) -> Optional[dict[str, np.ndarray]]:
        ids, mask = self._encoder.encode(record)
        ids_a, mask_a = np.asarray(ids, np.int32), np.asarray(mask, np.float32)
        inputs, targets, loss_mask = ids_a[:-1], ids_a[1:], mask_a[1:]
        if len(inputs) > self._seq_len:
            if self._overlong == "drop":
                self._counts.add("examples dropped: longer than data.seq_len",
                                 f"data.seq_len={self._seq_len}, data.objective.overlong=drop")
                return None
            self._counts.add("examples truncated to data.seq_len",
                             f"data.seq_len={self._seq_len}; data.objective.overlong=drop drops them instead")
            inputs, targets, loss_mask = inputs[: self._seq_len], targets[: self._seq_len], loss_mask[: self._seq_len]
        if not loss_mask.any():
            self._counts.add("examples skipped: no token to train on (no assistant turn or completion within "
                             "data.seq_len)", "check the records' roles and data.seq_len")
            return None
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask}


def _sft_convert(cfg: DataConfig, tokenizer: Tokenizer, source: SourceConfig):
    return EncodeExample(cfg, tokenizer, source, chat_template_for(cfg, tokenizer), ExampleCounts())


def _sft_rows(docs: grain.IterDataset, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int,
              process_index: int) -> grain.IterDataset:
    """Encoded examples (from the sources' convert) -> rows of seq_len: first-fit packed, or one per row."""
    L = cfg.seq_len
    if not cfg.objective.packing:
        return docs.map(_pad_row(L))
    length_struct = {"inputs": L, "targets": L, "loss_mask": L}
    ds = FirstFitPackIterDataset(docs, length_struct=length_struct, num_packing_bins=batch_size, shuffle_bins=False)
    return ds.map(finish_token_row)


def _pad_row(L: int):
    def pad(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(example["inputs"])
        row = {k: np.zeros(L, np.float32 if k == "loss_mask" else np.int32) for k in
               ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
        row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = (example["inputs"], example["targets"],
                                                                       example["loss_mask"])
        row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
        return row

    return pad


def _template_tokens(cfg: DataConfig, tokenizer: Tokenizer) -> list[str]:
    """The chat template's special tokens the tokenizer lacks (a built-in template on another model's
    tokenizer); the template becomes the tokenizer's, so checkpoints and exports carry it."""
    template = chat_template_for(cfg, tokenizer)
    if template is None:
        return []
    tokenizer.chat_template = template.source
    return template.missing_tokens(tokenizer.token_to_id)


register_format("sft", BatchFormat(_sft_rows, token_rows_spec, convert=_sft_convert, tokens=_template_tokens))
