"""Metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard, from process 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

from jaxllm.utils import atomic_write_text


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _to_python(v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": step, **clean}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _to_python(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drops rows logged after `last_step` (by a run that died after its last checkpoint), so a resumed
    run logs each step once."""
    path = Path(run_dir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
