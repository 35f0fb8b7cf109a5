"""`jaxllm data ref-logps`: a DPO reference's log-probs computed once and stored with the dataset.

Each record of the config's one data source is encoded as training encodes it (data/preference.py: the same
tokenizer, chat template, truncation), scored by the reference the config names (preference.reference, else
train.init_from's model: with model.lora that is also the base the adapters start from), and written back with
TRL's columns `ref_chosen_logps` and `ref_rejected_logps` (summed response log-probs). Training on the written
file with `data.objective.precomputed_reference=true` loads no reference model: the objective reads the
columns (`preference.reference_pairs`). The numbers come from the loss's own code path on rows of one pair,
so they equal what the frozen reference gives during training.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm import sharding
from jaxllm.config import Config, JaxllmError, MeshConfig
from jaxllm.data.objectives import special_ids
from jaxllm.data.preference import REF_FIELDS, EncodePair, UnitToExample, _pad, finish_unit_row
from jaxllm.data.sft import ExampleCounts
from jaxllm.data.sources import make_source
from jaxllm.models.vocab import grown_vocab_size
from jaxllm.train.frozen import load_frozen
from jaxllm.train.preference import _reference_source, reference_pairs
from jaxllm.train.preview import run_tokenizer
from jaxllm.utils import atomic_write_text


def _check(cfg: Config) -> None:
    if cfg.data.objective.name != "dpo":
        raise JaxllmError(f"jaxllm data ref-logps precomputes a DPO reference; data.objective.name is "
                          f"{cfg.data.objective.name} (KTO's KL term pairs records only when batches are made, so "
                          "its reference runs beside the policy)")
    if len(cfg.data.sources) != 1:
        raise JaxllmError(f"jaxllm data ref-logps reads one source, the config has {len(cfg.data.sources)}; run it "
                          "once per source with data.sources=[{path: FILE}]")


def precompute(cfg: Config, out: str | Path, batch_size: int = 8, progress: Any = None) -> dict[str, int]:
    """Writes `out` (jsonl): every usable record of the config's source with the reference's log-probs added.
    Returns counts (records written, skipped)."""
    _check(cfg)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, objective=dataclasses.replace(cfg.data.objective, precomputed_reference=False)))
    tokenizer = run_tokenizer(cfg)
    # The reference training would use; with model.lora (adapters off) that is the base, train.init_from's model.
    source = _reference_source(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, lora=None)))["reference"]
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    rules = sharding.make_rules(cfg.mesh.rules)
    needed = grown_vocab_size(special_ids(cfg.data, tokenizer).vocab_size)
    reference = load_frozen(source.path, mesh, rules, source.param_dtype, needed if source.match_vocab else None)
    encode = EncodePair(cfg.data, tokenizer, cfg.data.sources[0])
    to_example = UnitToExample(cfg.data, ExampleCounts(), with_ref=False)
    finish = finish_unit_row(2)
    L = cfg.data.seq_len
    dp = mesh.devices.size
    rows_per_batch = -(-batch_size // dp) * dp
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
    score = jax.jit(lambda batch, frozen: reference_pairs(None, None, batch, frozen, cfg))

    def keep_record(record: dict) -> dict:
        return {"record": record, "unit": encode(record)}

    records = make_source(cfg.data.sources[0], num_epochs=1, on_bad_record=cfg.data.on_bad_record,
                          convert=keep_record)
    lines, pending, skipped = [], [], 0

    def flush():
        rows = [finish(_pad(example, L)) for _, example in pending]
        rows += [{k: np.zeros_like(v) for k, v in rows[0].items()}] * (rows_per_batch - len(rows))
        batch = {k: jax.device_put(np.stack([r[k] for r in rows]), batch_sharding) for k in rows[0]}
        chosen, rejected = jax.device_get(score(batch, {"reference": reference}))
        for i, (record, _) in enumerate(pending):
            values = dict(zip(REF_FIELDS, (float(chosen[i, 0]), float(rejected[i, 0]))))
            lines.append(json.dumps({**record, **values}, ensure_ascii=False))
        if progress is not None:
            progress(len(pending))
        pending.clear()

    for item in records:
        example = to_example(item["unit"])
        if example is None:
            skipped += 1
            continue
        pending.append((item["record"], example))
        if len(pending) == rows_per_batch:
            flush()
    if pending:
        flush()
    if not lines:
        raise JaxllmError(f"no usable record in {cfg.data.sources[0].path}; nothing written")
    atomic_write_text(Path(out), "\n".join(lines) + "\n")
    return {"written": len(lines), "skipped": skipped}
