"""Metrics to `metrics.jsonl` and TensorBoard, from process 0 only.

`metrics.jsonl` holds one JSON object per logged step (`step`, `loss`, ...) and event rows, which
carry an `event` key (`nonfinite`, `loss_spike`: see `monitor.py`) and go to TensorBoard as nothing.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import jax

from jaxllm.utils import atomic_write_text


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, filename: str = "metrics.jsonl"):
        self.enabled = jax.process_index() == 0
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(run_dir / filename, "a", buffering=1)
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
                    self._tb.add_scalar(_tag(k), v, step)

    def event(self, step: int, name: str, fields: dict[str, Any]) -> None:
        """An event row: {"step", "event": name, **fields}, in metrics.jsonl only."""
        if self.enabled:
            clean = {k: _to_python(v) for k, v in fields.items()}
            self._file.write(json.dumps({"step": step, "event": name, **clean}) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _tag(name: str) -> str:
    """A TensorBoard tag for a metric name: characters TensorBoard refuses (e.g. the `:` of
    `eval_loss/builtin:kjv-valid`) become `_`, as it would do itself with a warning per write."""
    return re.sub(r"[^-/\w.]", "_", name)


def _to_python(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drops rows logged after `last_step` (by a run that died after its last checkpoint), so a resumed
    run logs each step once; also a last line cut short by a kill."""
    path = Path(run_dir) / "metrics.jsonl"
    if jax.process_index() != 0 or not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (row := _parse(line)) is not None and row.get("step", 0) <= last_step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def read_metrics(run_dir: str | Path, events: bool = False, filename: str = "metrics.jsonl") -> list[dict[str, Any]]:
    """The step rows of `run_dir/metrics.jsonl` (or `filename`), or with `events=True` the event rows."""
    path = Path(run_dir) / filename
    if not path.exists():
        return []
    rows = [row for line in path.read_text().splitlines() if (row := _parse(line)) is not None]
    return [row for row in rows if ("event" in row) == events]


def _parse(line: str) -> dict[str, Any] | None:
    """A row, or None for a blank line or one a kill cut short."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None
