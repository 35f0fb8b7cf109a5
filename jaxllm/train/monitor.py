"""Watching each step's loss without a host sync per step: NaN/Inf steps (skip or stop) and loss spikes.

The train step never applies a non-finite update (see `step.train_step`); it reports `finite` per
step. The loop hands every step's metrics and the data-iterator state *before* its batch to
`StepMonitor.add`, and calls `check` when it syncs anyway (logging, saving, the end). `check` fetches
the pending steps in one transfer and, step by step:

- a non-finite step is an event in metrics.jsonl and a warning; with `train.on_nonfinite=stop` it also
  writes `run_dir/nonfinite/step_N.json` (loss, grad norm, the data state to replay the batch) and raises
  `NonfiniteLossError`. The loop checks before every save, so no checkpoint holds a state past a bad step
  under `stop`, and resuming replays it;
- a finite loss above mean + `spike_threshold` * std of the last `spike_window` losses is a
  `loss_spike` event and a warning (the window starts afresh after a resume).
"""

from __future__ import annotations

import collections
import json
import logging
import math
from pathlib import Path
from typing import Any

import jax

from jaxllm.config import Config, JaxllmError, TrainConfig
from jaxllm.data.tokenizer import Tokenizer
from jaxllm.train.metrics import MetricsWriter
from jaxllm.utils import atomic_write_text

log = logging.getLogger("jaxllm")

_MIN_HISTORY = 10  # losses needed before a spike can be called


class NonfiniteLossError(JaxllmError):
    """The loss or a gradient was NaN/Inf and `train.on_nonfinite` is `stop`."""


class LossSpikeDetector:
    """Calls a loss a spike when it exceeds mean + threshold * std of the previous `window` losses."""

    def __init__(self, window: int, threshold: float):
        self._losses: collections.deque[float] = collections.deque(maxlen=window)
        self._threshold = threshold

    def update(self, loss: float) -> dict[str, float] | None:
        """Adds `loss`; returns the window's mean and std if it is a spike, else None."""
        spike = None
        if self._threshold > 0 and len(self._losses) >= _MIN_HISTORY:
            mean = math.fsum(self._losses) / len(self._losses)
            std = math.sqrt(math.fsum((x - mean) ** 2 for x in self._losses) / len(self._losses))
            if loss > mean + self._threshold * std:
                spike = {"window_mean": mean, "window_std": std}
        # Spikes stay in the window: after a lasting jump the statistics adapt instead of warning forever.
        self._losses.append(loss)
        return spike


class StepMonitor:
    """Collects per-step metrics lazily and acts on non-finite steps and loss spikes (module docstring)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, writer: MetricsWriter):
        self._policy = cfg.on_nonfinite
        self._run_dir = Path(run_dir)
        self._writer = writer
        self._spikes = LossSpikeDetector(cfg.spike_window, cfg.spike_threshold)
        self._pending: list[tuple[int, Any, dict[str, jax.Array]]] = []

    def add(self, step: int, data_state_before: Any, metrics: dict[str, jax.Array]) -> None:
        """Remembers step `step` (1-based: the step just taken) without waiting for the device."""
        watched = {k: metrics[k] for k in ("loss", "grad_norm", "finite")}
        self._pending.append((step, data_state_before, watched))

    def check(self, latest: dict[str, jax.Array] | None = None) -> dict[str, Any] | None:
        """Acts on every pending step, oldest first; raises NonfiniteLossError under `stop`. `latest`: the
        metrics of the newest step, fetched in the same transfer and returned as host values (the loop's
        log line), so a log step syncs with the device once."""
        pending, self._pending = self._pending, []
        values, latest = jax.device_get(([m for _, _, m in pending], latest))
        for (step, data_state, _), m in zip(pending, values):
            loss, grad_norm = float(m["loss"]), float(m["grad_norm"])
            if not bool(m["finite"]):
                self._nonfinite(step, data_state, loss, grad_norm)
                continue
            spike = self._spikes.update(loss)
            if spike is not None:
                log.warning("loss spike at step %d: %.4g, window mean %.4g, std %.3g",
                            step, loss, spike["window_mean"], spike["window_std"])
                self._writer.event(step, "loss_spike", {"loss": loss, **spike})
        return latest

    def _nonfinite(self, step: int, data_state: Any, loss: float, grad_norm: float) -> None:
        action = "stopped" if self._policy == "stop" else "skipped"
        self._writer.event(step, "nonfinite", {"loss": loss, "grad_norm": grad_norm, "action": action})
        what = f"loss {loss} and gradient norm {grad_norm} at step {step}"
        if self._policy == "skip":
            log.warning("%s: update skipped (train.on_nonfinite=skip)", what)
            return
        report = self._run_dir / "nonfinite" / f"step_{step}.json"
        if jax.process_index() == 0:
            blob = {"step": step, "loss": str(loss), "grad_norm": str(grad_norm), "data_state_before_batch": data_state}
            atomic_write_text(report, json.dumps(blob, indent=1))
        raise NonfiniteLossError(
            f"{what}; the update was not applied and training stopped. The batch's data position is in {report} "
            "(load it with jaxllm.train.monitor.replay_batch); running the same command resumes from the last "
            "checkpoint and meets it again. Set train.on_nonfinite=skip to skip such updates, or lower optim.lr"
        )


def replay_batch(cfg: Config, tokenizer: Tokenizer, report: str | Path) -> dict[str, Any]:
    """The batch (this process's rows, numpy) that step `report["step"]` trained on, from a report of
    `StepMonitor` under `train.on_nonfinite=stop`; for debugging the data or the loss on it."""
    from jaxllm.data.pipeline import process_pipeline

    state = json.loads(Path(report).read_text())["data_state_before_batch"]
    pipeline = process_pipeline(cfg.data, tokenizer, cfg.train.batch_size)
    try:
        pipeline.set_state(state)
        return next(pipeline)
    finally:
        pipeline.close()
