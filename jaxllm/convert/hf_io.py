"""Reading and writing Hugging Face checkpoint files: config.json and (sharded) safetensors.

Only safetensors is read: it holds raw tensors, so loading a checkpoint never executes code
(PyTorch `.bin` files are pickles and are refused with a message saying how to convert them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxllm.config import JaxllmError
from jaxllm.utils import atomic_write_text


class ConversionError(JaxllmError):
    pass


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise ConversionError(f"{directory} has no config.json; pass a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from None


class SafetensorsReader:
    """Lazy access to the tensors of `model.safetensors` or of the shards listed in
    `model.safetensors.index.json`; each tensor is read only when asked for (memory-mapped)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / shard for name, shard in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="numpy") as f:
                self.files = {name: single for name in f.keys()}
        else:
            pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
            hint = (
                f" It has {', '.join(pickles)}: PyTorch pickles, which jaxllm never loads (unpickling runs code). "
                "Convert them with `transformers`: AutoModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True)."
                if pickles
                else ""
            )
            raise ConversionError(f"{directory} has no model.safetensors or model.safetensors.index.json.{hint}")
        self._handles: dict[Path, Any] = {}

    def names(self) -> set[str]:
        return set(self.files)

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> np.ndarray:
        path = self.files.get(name)
        if path is None:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint (files: {sorted(set(map(str, self.files.values())))[:3]}...)")
        if path not in self._handles:
            if not path.is_file():
                raise ConversionError(f"shard {path} listed in the index does not exist")
            self._handles[path] = safe_open(path, framework="numpy")
        return self._handles[path].get_tensor(name)


class ShardedWriter:
    """Writes tensors to `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` each,
    plus `model.safetensors.index.json`; a single shard is written as `model.safetensors`."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, np.ndarray] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total = 0

    def add(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        if self._pending and self._pending_bytes + array.nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = array
        self._pending_bytes += array.nbytes
        self._total += array.nbytes

    def _flush(self) -> None:
        index = len(self._shards)
        save_file(self._pending, self.directory / f".shard-{index}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Renames the shards into place and writes the index; returns the file names."""
        if self._pending:
            self._flush()
        n = len(self._shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.directory / f".shard-{i}.tmp").replace(self.directory / name)
        if n > 1:
            weight_map = {t: names[i] for i, tensors in enumerate(self._shards) for t in tensors}
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(self.directory / "model.safetensors.index.json", json.dumps(index, indent=2))
        return names
