"""Sources from dataset hubs: Hugging Face `datasets` (`hf:NAME_OR_DIR`) and TensorFlow Datasets (`tfds:NAME`).

Both are imported only when such a source is used, so neither is a hard dependency.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from grain.experimental import index_shuffle

from jaxllm.config import JaxllmError, SourceConfig
from jaxllm.data import readers
from jaxllm.data.epochs import BadRecordPolicy, EpochIterator


def load_hf_dataset(target: str, cfg: SourceConfig, process_index: int, process_count: int,
                    records: bool = False) -> Any:
    """A streaming `datasets.IterableDataset` of this process's share of `target` (hub name or local directory).

    A directory written by `Dataset.save_to_disk` is read with `load_from_disk`; anything else with
    `load_dataset(target, name=cfg.hf_config, split=cfg.split, streaming=True)`, which also reads a
    local directory of jsonl/parquet/csv files. Offline use (HF_DATASETS_OFFLINE=1) is the caller's choice.
    """
    try:
        import datasets
        from datasets.distributed import split_dataset_by_node
    except ImportError:
        raise JaxllmError(f"hf:{target} needs the `datasets` library; pip install 'jaxllm[data]'") from None
    saved = any(os.path.isfile(os.path.join(target, f)) for f in ("state.json", "dataset_dict.json"))
    try:
        if saved:
            ds = datasets.load_from_disk(target)
            if isinstance(ds, datasets.DatasetDict):
                if cfg.split not in ds:
                    raise JaxllmError(f"hf:{target} has no split {cfg.split!r} (splits: {', '.join(ds)}); set split")
                ds = ds[cfg.split]
            ds = ds.to_iterable_dataset()
        else:
            ds = datasets.load_dataset(target, name=cfg.hf_config, split=cfg.split, streaming=True)
    except JaxllmError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError, ...)
        raise JaxllmError(
            f"hf:{target}: cannot load split {cfg.split!r} ({type(e).__name__}: {e}); check the name, "
            "hf_config and split, or give a local directory of jsonl/parquet files"
        ) from None
    if not records and ds.column_names is not None and cfg.text_field not in ds.column_names:
        raise JaxllmError(
            f"hf:{target} has no column {cfg.text_field!r} (columns: {', '.join(ds.column_names)}); set text_field"
        )
    return split_dataset_by_node(ds, rank=process_index, world_size=process_count)


class HFIterator(EpochIterator):
    """Streams a Hugging Face dataset; resumes with the IterableDataset's own `state_dict()`.

    No shuffle here: a streaming shuffle buffer is lost on resume; the pipeline's window shuffle mixes.
    """

    def __init__(self, target: str, cfg: SourceConfig, *, bad: BadRecordPolicy, seed: int, name: str,
                 process_index: int, process_count: int, num_epochs: Optional[int], convert=None):  # fmt: skip
        super().__init__(name, process_index, process_count, num_epochs, convert)
        del seed  # the order is the dataset's own; see the class docstring
        self._ds = load_hf_dataset(target, cfg, process_index, process_count, records=convert is not None)
        self._field, self._bad = cfg.text_field, bad
        self._restart()

    def _restart(self) -> None:
        self._iterator: Any = None
        self._resume: Optional[dict] = None  # a state_dict to load before iterating again
        self._example = 0  # examples read this epoch, for messages

    def _read(self) -> Optional[dict[str, str]]:
        if self._iterator is None:
            # `datasets` applies a loaded state only to the epoch it was saved in, so set ours first.
            self._ds.set_epoch(self.epoch)
            if self._resume is not None:
                self._ds.load_state_dict(self._resume)
            self._iterator = iter(self._ds)
        for example in self._iterator:
            self._example += 1
            try:
                if self._convert is not None:
                    doc = self._convert_record(example, self._example)
                    if doc is None:
                        continue
                    return doc
                text = readers.text_value(example.get(self._field), self._field, self._example, "field")
            except readers.BadRecord as e:
                self._bad(f"{self.name}: example {self._example}", e.problem)
                continue
            if text:
                return {"text": text}
        self._restart()
        return None

    def _position(self) -> dict[str, Any]:
        hf_state = self._ds.state_dict() if self._iterator is not None else self._resume
        return {"hf_state": hf_state, "example": self._example}

    def _seek(self, state: dict[str, Any]) -> None:
        self._restart()
        self._resume, self._example = state["hf_state"], state["example"]


class TfdsIterator(EpochIterator):
    """Reads a TFDS random-access data source (`tfds.data_source`: a dataset built in ArrayRecord
    format; TensorFlow is not needed). This process takes indices i, i+P, ..., in an order shuffled
    per epoch; the state is the count read this epoch."""

    def __init__(self, target: str, cfg: SourceConfig, *, bad: BadRecordPolicy, seed: int, name: str,
                 process_index: int, process_count: int, num_epochs: Optional[int], convert=None):  # fmt: skip
        super().__init__(name, process_index, process_count, num_epochs, convert)
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise JaxllmError(f"tfds:{target} needs tensorflow_datasets; pip install 'jaxllm[data]'") from None
        try:
            self._data = tfds.data_source(target, split=cfg.split, data_dir=cfg.data_dir)
        except Exception as e:  # TFDS raises DatasetNotFoundError, ValueError, ... for a missing dataset or split
            reason = str(e).strip().split("\n")[0]  # a missing dataset's message goes on to list the whole catalog
            where = f"data_dir {cfg.data_dir}" if cfg.data_dir else "TFDS's default data_dir"
            raise JaxllmError(
                f"tfds:{target}: cannot open split {cfg.split!r} in {where} ({type(e).__name__}: {reason}); "
                "build the dataset with file_format='array_record' and set data_dir to where it was built"
            ) from None
        features = sorted(self._data.dataset_info.features.keys())
        if convert is None and cfg.text_field not in features:
            raise JaxllmError(f"tfds:{target} has no feature {cfg.text_field!r} (features: {', '.join(features)}); "
                              "set text_field")  # fmt: skip
        self._count = len(range(process_index, len(self._data), process_count))
        self._field, self._bad, self._seed = cfg.text_field, bad, seed
        self._k = 0

    def _read(self) -> Optional[dict[str, str]]:
        while self._k < self._count:
            self._k += 1
            seed = (self._seed + self.epoch) % 2**32
            shuffled = index_shuffle(self._k - 1, max_index=self._count - 1, seed=seed, rounds=4)
            index = self.process_index + self.process_count * shuffled
            try:  # TFDS decodes text features to bytes
                if self._convert is not None:
                    doc = self._convert_record(_decoded(self._data[index]), index)
                    if doc is None:
                        continue
                    return doc
                text = readers.text_value(self._data[index][self._field], self._field, index, "feature")
            except readers.BadRecord as e:
                self._bad(f"{self.name}: example {index}", e.problem)
                continue
            if text:
                return {"text": text}
        return None

    def _restart(self) -> None:
        self._k = 0

    def _position(self) -> dict[str, Any]:
        return {"index": self._k}

    def _seek(self, state: dict[str, Any]) -> None:
        self._k = state["index"]


def _decoded(value: Any) -> Any:
    """A TFDS example with its byte strings (text features) decoded as UTF-8 and arrays as lists."""
    if isinstance(value, dict):
        return {k: _decoded(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "tolist"):
        return _decoded(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_decoded(v) for v in value]
    return value
