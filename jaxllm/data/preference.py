"""The batch formats of preference optimisation: records -> rows of paired sequences.

`data.objective.name: dpo | orpo | simpo | reward` read TRL's preference records: `prompt` + `chosen` +
`rejected` (strings, or lists of chat messages rendered with the chat template), or `chosen` + `rejected`
alone, whose shared beginning is the prompt (TRL's implicit prompt). `kto` reads TRL's unpaired records,
`prompt` + `completion` + boolean `label` (field names: data.objective.*_field).

Each example becomes a *unit* of sequences, each prompt + response tokenized as SFT does it (jaxllm/data/chat.py:
string prompts get BOS when data.add_bos and the response EOS; messages the chat template), with a mask on the
response's tokens:

    pair (dpo, orpo, simpo, reward):  [prompt + chosen] [prompt + rejected]
    kto, two records a and b:         [prompt_a + completion_a] [prompt_a + completion_b]
                                      [prompt_b + completion_b] [prompt_b + completion_a]

(KTO's second sequence of each record is its KL term: the prompt with another record's completion, as TRL
cycles completions within a batch.) A unit is packed whole into a row (first fit, never split) and its
sequences are consecutive segments: segment 2k-1 is an example's sequence, 2k its partner (the rejected one, or
the KL one). Row fields, each [seq_len]:

- `inputs`: every token of each sequence (not shifted: the last token of a segment is an input too, where a
  reward head reads);
- `targets[i] = inputs[i+1]` within a segment; `loss_mask` 1 where that target is a response token (0 at a
  segment's last position, on prompts and on padding);
- `segment_ids` (0 = padding), `positions` (0, 1, ... within each sequence);
- kto: `kto_label`, 1 on the positions of a desirable example's two segments, 0 on an undesirable one's;
- reward: `margin`, a record's optional `margin` (TRL's column; 0 without) on every position of both segments;
- dpo with precomputed reference log-probs (data.objective.precomputed_reference: records carrying TRL's
  `ref_chosen_logps` / `ref_rejected_logps`, which `jaxllm data ref-logps` writes): `ref_logps`, the
  reference's summed response log-prob of each segment on every position of it.

A unit longer than data.seq_len is cut (the longest sequences first, to a common cap, keeping their start:
TRL's `keep_start`), or dropped with data.objective.overlong=drop; a unit in which a sequence keeps no response
token is skipped. Both are counted in the log.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import grain
import numpy as np
from grain.experimental import FirstFitPackIterDataset

from jaxllm.config import DataConfig, SourceConfig
from jaxllm.data.chat import ChatEncoder, ChatFields
from jaxllm.data.objectives import BatchFormat, register_format
from jaxllm.data.readers import RecordError
from jaxllm.data.sft import ExampleCounts, _template_tokens, chat_template_for
from jaxllm.data.tokenizer import Tokenizer

PAIRED = ("dpo", "orpo", "simpo", "reward")
OBJECTIVES = (*PAIRED, "kto")
# Per-record reference log-probs of (chosen, rejected), TRL's column names.
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


def implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected) from two full responses: the prompt is their longest common beginning (whole
    messages of two conversations, or characters of two strings, backing off before a space), as TRL's
    `extract_prompt`."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


class Sequences:
    """Tokenizes prompt + response into `(ids, response mask)` with the SFT encoder's rules."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, source: SourceConfig):
        o = cfg.objective
        template = chat_template_for(cfg, tokenizer)
        fields = ChatFields(o.messages_field, "prompt", "completion", source.text_field)
        self.encoder = ChatEncoder(tokenizer, template, fields, False,
                                   bos_id=tokenizer.bos_id if cfg.add_bos else None)

    def encode(self, prompt: Any, response: Any, what: str) -> tuple[list[int], list[int]]:
        if isinstance(prompt, str) and isinstance(response, str):
            return self.encoder.encode({"prompt": prompt, "completion": response})
        if isinstance(prompt, list) and isinstance(response, list):
            return self.encoder.encode({"prompt": prompt, "completion": response})
        raise RecordError(f"the prompt and {what} must both be strings or both lists of messages, got "
                          f"{type(prompt).__name__} and {type(response).__name__}")


def _field(record: dict, name: str, option: str) -> Any:
    if name not in record:
        raise RecordError(f"the record has no field {name!r} (it has {', '.join(map(repr, record)) or 'none'}); "
                          f"set data.objective.{option} to the field that holds it")
    return record[name]


def _ref_logps(record: dict) -> Optional[tuple[float, float]]:
    names = REF_FIELDS
    if not any(n in record for n in names):
        return None
    values = tuple(record.get(n) for n in names)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise RecordError(f"fields {' and '.join(names)} must both be finite numbers (precomputed reference "
                          f"log-probs), got {values!r:.80}")
    return values  # type: ignore[return-value]


class EncodePair:
    """A source's `convert` for paired objectives: record -> the encoded pair (module docstring)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, source: SourceConfig):
        self.sequences, self.o = Sequences(cfg, tokenizer, source), cfg.objective

    def __call__(self, record: dict[str, Any]) -> Optional[dict[str, Any]]:
        o = self.o
        chosen = _field(record, o.chosen_field, "chosen_field")
        rejected = _field(record, o.rejected_field, "rejected_field")
        if o.prompt_field in record:
            prompt = record[o.prompt_field]
        else:
            if type(chosen) is not type(rejected) or not isinstance(chosen, (str, list)):
                raise RecordError(f"fields {o.chosen_field!r} and {o.rejected_field!r} must both be strings or both "
                                  f"lists of messages")
            prompt, chosen, rejected = implicit_prompt(chosen, rejected)
        seqs = [self.sequences.encode(prompt, chosen, o.chosen_field),
                self.sequences.encode(prompt, rejected, o.rejected_field)]
        unit = {"sequences": seqs}
        if o.name == "reward":
            margin = record.get("margin", 0.0)
            if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
                raise RecordError(f"field 'margin' must be a finite number (how much chosen should beat rejected by), "
                                  f"got {margin!r:.40}")
            unit["margin"] = float(margin)
        ref = _ref_logps(record)
        if ref is not None:
            unit["ref"] = list(ref)
        return unit


class EncodeUnpaired:
    """A source's `convert` for kto: record -> `{"sequence", "prompt_len", "label"}` (the KL partner is added
    when two records are joined into a unit)."""

    def __init__(self, cfg: DataConfig, tokenizer: Tokenizer, source: SourceConfig):
        self.sequences, self.o = Sequences(cfg, tokenizer, source), cfg.objective

    def __call__(self, record: dict[str, Any]) -> Optional[dict[str, Any]]:
        o = self.o
        prompt = _field(record, o.prompt_field, "prompt_field")
        completion = _field(record, o.completion_field, "completion_field")
        label = _field(record, o.label_field, "label_field")
        if not isinstance(label, bool):
            raise RecordError(f"field {o.label_field!r} must be true (a desirable completion) or false, got "
                              f"{label!r:.40}")
        ids, mask = self.sequences.encode(prompt, completion, o.completion_field)
        start = mask.index(1) if 1 in mask else len(mask)
        return {"ids": ids, "mask": mask, "start": start, "label": label}


def kto_unit(a: dict, b: dict) -> dict[str, Any]:
    """Two encoded kto records -> a unit of four sequences: each record's, then its prompt with the other's
    completion (the KL term)."""
    def kl(x, y):  # x's prompt, y's completion
        return x["ids"][: x["start"]] + y["ids"][y["start"]:], [0] * x["start"] + y["mask"][y["start"]:]

    return {"sequences": [(a["ids"], a["mask"]), kl(a, b), (b["ids"], b["mask"]), kl(b, a)],
            "labels": [a["label"], b["label"]]}


def fit(lengths: list[int], limit: int) -> list[int]:
    """Lengths cut to a common cap, the longest first, so that they sum to at most `limit`."""
    if sum(lengths) <= limit:
        return list(lengths)
    lo, hi = 0, max(lengths)
    while lo < hi:  # the largest cap that fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(n, mid) for n in lengths) <= limit else (lo, mid - 1)
    return [min(n, lo) for n in lengths]


class UnitToExample:
    """A unit of sequences -> one packable example: the sequences joined, with `part` (1, 2, ...: which sequence
    of the unit) and `pos` (positions within a sequence) per token (module docstring)."""

    def __init__(self, cfg: DataConfig, counts: ExampleCounts, with_ref: bool):
        self.seq_len, self.overlong, self.counts, self.with_ref = cfg.seq_len, cfg.objective.overlong, counts, with_ref

    def __call__(self, unit: dict[str, Any]) -> Optional[dict[str, np.ndarray]]:
        seqs = unit["sequences"]
        lengths = [len(ids) for ids, _ in seqs]
        if sum(lengths) > self.seq_len:
            if self.overlong == "drop":
                self.counts.add("examples dropped: longer than data.seq_len",
                                f"data.seq_len={self.seq_len} holds all sequences of an example; "
                                "data.objective.overlong=drop")
                return None
            self.counts.add("examples truncated to data.seq_len",
                            f"data.seq_len={self.seq_len} holds all sequences of an example; "
                            "data.objective.overlong=drop drops them instead")
            lengths = fit(lengths, self.seq_len)
        parts = []
        for k, ((ids, mask), n) in enumerate(zip(seqs, lengths)):
            ids_a, mask_a = np.asarray(ids[:n], np.int32), np.asarray(mask[:n], np.float32)
            targets = np.append(ids_a[1:], 0).astype(np.int32)
            loss_mask = np.append(mask_a[1:], 0).astype(np.float32)
            if not loss_mask.any():
                self.counts.add("examples skipped: a sequence has no response token within data.seq_len",
                                "check the records and data.seq_len")
                return None
            part = {"inputs": ids_a, "targets": targets, "loss_mask": loss_mask,
                    "part": np.full(n, k + 1, np.int32), "pos": np.arange(n, dtype=np.int32)}
            if "margin" in unit:
                part["margin"] = np.full(n, unit["margin"], np.float32)
            if "labels" in unit:
                part["kto_label"] = np.full(n, float(unit["labels"][k // 2]), np.float32)
            if self.with_ref:
                if "ref" not in unit:
                    raise RecordError(f"the record has no precomputed reference log-probs ({' and '.join(REF_FIELDS)}) "
                                      "but data.objective.precomputed_reference is true; write them with "
                                      "`jaxllm data ref-logps`")
                part["ref_logps"] = np.full(n, unit["ref"][k], np.float32)
            parts.append(part)
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def finish_unit_row(units_per_example: int):
    """Packed row (grain's names) -> the batch fields: segment `units_per_example * (e - 1) + part` for the
    part-th sequence of the e-th packed example."""
    def finish(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        example = packed["inputs_segment_ids"]
        real = example > 0
        row = {
            "inputs": packed["inputs"],
            "targets": packed["targets"],
            "segment_ids": np.where(real, units_per_example * (example - 1) + packed["part"], 0).astype(np.int32),
            "positions": np.where(real, packed["pos"], 0).astype(np.int32),
            "loss_mask": (packed["loss_mask"] * real).astype(np.float32),
        }
        for key in ("kto_label", "ref_logps", "margin"):
            if key in packed:
                row[key] = (packed[key] * real).astype(np.float32)
        return row

    return finish


def _with_ref(cfg: DataConfig) -> bool:
    return cfg.objective.name == "dpo" and cfg.objective.precomputed_reference


def _rows(docs: grain.IterDataset, cfg: DataConfig, tokenizer: Tokenizer, batch_size: int,
          process_index: int) -> grain.IterDataset:
    """Encoded records (from the sources' convert) -> units -> packed rows (module docstring)."""
    kto = cfg.objective.name == "kto"
    if kto:  # consecutive records make a unit; an odd last record of the stream is left out
        docs = docs.batch(2, drop_remainder=True, batch_fn=lambda pair: kto_unit(*pair))
    examples = docs.map(UnitToExample(cfg, ExampleCounts(), _with_ref(cfg))).filter(lambda e: e is not None)
    spec = _spec(cfg, 1)
    finish = finish_unit_row(4 if kto else 2)
    if not cfg.objective.packing:
        return examples.map(lambda e: finish(_pad(e, cfg.seq_len)))
    length_struct = {k: cfg.seq_len for k in ("inputs", "targets", "loss_mask", "part", "pos", *_extra(spec))}
    packed = FirstFitPackIterDataset(examples, length_struct=length_struct, num_packing_bins=batch_size,
                                     shuffle_bins=False)
    return packed.map(finish)


def _extra(spec: dict) -> list[str]:
    return [k for k in ("kto_label", "ref_logps", "margin") if k in spec]


def _pad(example: dict[str, np.ndarray], L: int) -> dict[str, np.ndarray]:
    n = len(example["inputs"])
    packed = {k: np.zeros(L, v.dtype) for k, v in example.items()}
    for k, v in example.items():
        packed[k][:n] = v
    packed["inputs_segment_ids"] = np.zeros(L, np.int32)
    packed["inputs_segment_ids"][:n] = 1
    return packed


def _spec(cfg: DataConfig, batch_size: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    row = (batch_size, cfg.seq_len)
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    spec = {k: (row, i32) for k in ("inputs", "targets", "segment_ids", "positions")}
    spec["loss_mask"] = (row, f32)
    if cfg.objective.name == "kto":
        spec["kto_label"] = (row, f32)
    if cfg.objective.name == "reward":
        spec["margin"] = (row, f32)
    if _with_ref(cfg):
        spec["ref_logps"] = (row, f32)
    return spec


def _convert(cfg: DataConfig, tokenizer: Tokenizer, source: SourceConfig):
    return (EncodeUnpaired if cfg.objective.name == "kto" else EncodePair)(cfg, tokenizer, source)


FORMAT = BatchFormat(_rows, _spec, convert=_convert, tokens=_template_tokens)
for _name in OBJECTIVES:
    register_format(_name, FORMAT)
