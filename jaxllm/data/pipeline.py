"""The training data pipeline: documents -> shuffled -> tokens -> packed rows -> batches, resumable exactly.

    sources (mixed by weight) -> window shuffle -> tokenize (+BOS/EOS; inputs = t[:-1], targets = t[1:])
    -> pack into rows of seq_len (ConcatThenSplit: long documents continue on the next row)
    -> batch -> background prefetch

That is the clm objective's path, described below. Each objective's batch format (objectives.py:
`BatchFormat`, registered by data.objective.name) supplies the stages from documents to rows and the
batch fields; mlm, span, bart and ul2 are described in docs/objectives.md. A source of pre-tokenised shards
(`jaxllm data tokenize`; jaxllm.data.shard_source) skips the stages up to the packed rows: rows -> batch ->
prefetch, shuffled over the whole corpus, with a resume position that is a global row index (any process
count may resume it).

Targets are shifted inside each document before packing, so no target ever crosses into another
document; packing is then free to place documents side by side. Each batch is a dict of numpy arrays
shaped [batch_size, seq_len]: inputs, targets, segment_ids (1, 2, ... per document in the row,
0 = padding), positions (0, 1, ... within each segment, also for the part of a document continued
from the previous row) int32, and loss_mask float32 (1 on real targets, 0 on padding).
"""

from __future__ import annotations

import atexit
import json
import weakref
from typing import Any, Optional

import grain
import numpy as np
from grain.experimental import ThreadPrefetchIterDataset, WindowShuffleIterDataset

from jaxllm.config import DataConfig, JaxllmError
from jaxllm.data import preference, sft  # noqa: F401 (register the sft and preference batch formats)
from jaxllm.data.objectives import BatchFormat, batch_format
from jaxllm.data.shard_source import is_shard_source, shard_rows
from jaxllm.data.sources import make_source
from jaxllm.data.tokenizer import Tokenizer

_STATE_VERSION = 1
_OPEN_PIPELINES: weakref.WeakSet = weakref.WeakSet()


class Pipeline:
    """An iterator of batches with `get_state()` / `set_state()`; see `make_pipeline`."""

    def __init__(self, dataset: grain.IterDataset, layout: dict[str, Any]):
        self._iterator = iter(dataset)
        self._layout = layout
        _OPEN_PIPELINES.add(self)

    def __iter__(self) -> Pipeline:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            raise JaxllmError("this data pipeline was closed; make a new one with make_pipeline")
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `set_state` of it makes the next batch the one that followed here."""
        state = {"version": _STATE_VERSION, "layout": self._layout, "iterator": self._iterator.get_state()}
        # A JSON round trip gives exactly what a checkpoint will hand back (lists for tuples), and a copy.
        return json.loads(json.dumps(state))

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise JaxllmError(
                f"data state version {state.get('version')} is not {_STATE_VERSION}: another jaxllm saved it; "
                "resume with that version, or train in a new run_dir"
            )
        saved, now = {"objective": "clm", **state["layout"]}, self._layout  # states before objectives were clm's
        # A global row position (shard sources) resumes on any process count; a document position does not.
        processes = () if now.get("position") == "global" else ("process_index", "process_count")
        for key in ("objective", "sources", *processes):
            if saved[key] != now[key]:
                raise JaxllmError(
                    f"the data state was saved with {key}={saved[key]}, but this run has {key}={now[key]}; "
                    "resume with the same data.sources, objective and process count, or train in a new run_dir"
                )
        self._iterator.set_state(_restore_tuples(state["iterator"]))

    def close(self) -> None:
        """Stops the prefetch thread; the pipeline cannot be used afterwards."""
        if self._iterator is not None:
            self._iterator.close()
            # Dropped now, while Python is whole: grain's prefetch iterator closes again when deleted.
            self._iterator = None
        _OPEN_PIPELINES.discard(self)


@atexit.register
def _close_open_pipelines() -> None:
    # A prefetch thread still inside the tokenizer's C++ code when Python finalises aborts the
    # process ("terminate called without an active exception"); stop the threads first.
    for pipeline in list(_OPEN_PIPELINES):
        pipeline.close()


def make_pipeline(
    cfg: DataConfig,
    tokenizer: Tokenizer,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: Optional[int] = None,
) -> Pipeline:
    """Batches for this process: dict of [batch_size, seq_len] arrays (see the module docstring), or the
    arrays of `cfg.objective` (`objectives.batch_spec` gives their shapes).

    `batch_size` is this process's share of the global batch. `num_epochs=None` repeats the sources
    forever; with a number (e.g. 1 for evaluation) iteration stops when the first source is used up,
    and the last batch is padded with rows of segment 0.
    """
    if batch_size < 1:
        raise JaxllmError(f"batch_size must be >= 1, got {batch_size}")
    for flag, token_id in (("add_bos", tokenizer.bos_id), ("add_eos", tokenizer.eos_id)):
        if getattr(cfg, flag) and token_id is None:
            raise JaxllmError(
                f"data.{flag} is true but the tokenizer has no {flag[4:].upper()} token; set data.{flag}=false"
            )
    fmt = batch_format(cfg.objective.name)
    shards = any(is_shard_source(s) for s in cfg.sources)
    if shards:
        if fmt is not batch_format("clm"):
            raise JaxllmError(f"data.sources holds pre-tokenised clm rows, which the {cfg.objective.name} objective "
                              "cannot use; train it from the documents (jsonl, parquet, text), or use objective clm")
        ds = shard_rows(cfg, tokenizer, batch_size, process_index, process_count, num_epochs)
    else:
        ds = _document_rows(cfg, tokenizer, fmt, batch_size, process_index, process_count, num_epochs)
    ds = ds.batch(batch_size, drop_remainder=False).map(_Pad(batch_size))
    if cfg.prefetch > 0:
        ds = ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
    layout = {
        "objective": cfg.objective.name,
        "sources": [s.path for s in cfg.sources],
        "process_index": process_index,
        "process_count": process_count,
        "seq_len": cfg.seq_len,
        "batch_size": batch_size,
        **({"position": "global"} if shards else {}),
    }
    return Pipeline(ds, layout)


def _document_rows(cfg: DataConfig, tokenizer: Tokenizer, fmt: BatchFormat, batch_size: int, process_index: int,
                   process_count: int, num_epochs: Optional[int]) -> grain.IterDataset:
    """Rows from documents: sources mixed by weight -> window shuffle -> the objective's stages to rows."""
    sources = [
        make_source(
            source,
            seed=int(np.random.SeedSequence([cfg.seed, i]).generate_state(1)[0]),
            on_bad_record=cfg.on_bad_record,
            process_index=process_index,
            process_count=process_count,
            num_epochs=num_epochs,
            convert=fmt.convert(cfg, tokenizer, source) if fmt.convert is not None else None,
        )
        for i, source in enumerate(cfg.sources)
    ]
    ds = sources[0] if len(sources) == 1 else grain.IterDataset.mix(sources, [s.weight for s in cfg.sources])
    if cfg.shuffle_window > 0:
        ds = WindowShuffleIterDataset(ds, window_size=cfg.shuffle_window, seed=cfg.seed)
    return fmt.rows(ds, cfg, tokenizer, batch_size, process_index)


def process_pipeline(cfg: DataConfig, tokenizer: Tokenizer, global_batch_size: int,
                     num_epochs: Optional[int] = None) -> Pipeline:
    """This process's share of a global batch of `global_batch_size` rows (the trainer's, evaluation's and
    a replayed batch's pipeline)."""
    import jax

    return make_pipeline(cfg, tokenizer, global_batch_size // jax.process_count(), jax.process_index(),
                         jax.process_count(), num_epochs=num_epochs)


class _Pad:
    """Pads a short last batch (finite epochs only) with all-zero rows: segment 0, loss_mask 0."""

    def __init__(self, batch_size: int):
        self._batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = self._batch_size - len(next(iter(batch.values())))
        if missing == 0:
            return batch
        return {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}


def _restore_tuples(state: Any) -> Any:
    """Undoes JSON's tuple -> list for grain's packing state, whose slices are compared with tuples."""
    if isinstance(state, dict):
        return {
            k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _restore_tuples(v)
            for k, v in state.items()
        }
    if isinstance(state, list):
        return [_restore_tuples(v) for v in state]
    return state
