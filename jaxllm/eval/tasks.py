"""Running lm-evaluation-harness tasks on a `JaxLM`: the `jaxllm eval` command and evaluation during training.

The harness's own evaluator (`lm_eval.simple_evaluate`) builds the requests, few-shot contexts and metrics;
results and per-sample logs are written in its format by its `EvaluationTracker`.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Sequence

from jaxllm.config import ConfigError, JaxllmError

log = logging.getLogger("jaxllm")


def task_manager(tasks: Sequence[str], include_path: str | Sequence[str] | None = None):
    """lm_eval's TaskManager for `tasks`, after checking every name is a task or group it knows (a ConfigError
    naming the unknown ones otherwise). When the user's task directories hold every task, the harness's own
    ~15,000 task files are not indexed (tens of seconds); managers are reused across calls (evaluation during
    training asks for the same tasks every time)."""
    import os

    paths = (include_path,) if isinstance(include_path, str) else tuple(include_path or ())
    for path in paths:
        if not os.path.isdir(path):
            raise ConfigError(f"task directory {path} does not exist (--include-path / eval.include_path: a "
                              "directory of task YAML files)")
    if not tasks:
        raise ConfigError("no tasks given; name lm-evaluation-harness tasks, e.g. --tasks hellaswag,arc_easy")
    if paths:
        local = _manager(paths, False)
        if not _unknown(local, tasks):
            return local
    manager = _manager(paths, True)
    unknown = _unknown(manager, tasks)
    if unknown:
        raise ConfigError(f"unknown lm-evaluation-harness task(s) {', '.join(unknown)}; list them with "
                          "lm-eval ls tasks, or give the directory of your own task YAML with --include-path")
    return manager


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths) or None, include_defaults=defaults)


def _unknown(manager, tasks: Sequence[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known and not manager.match_tasks([t])]


def run_tasks(lm, tasks: Sequence[str], *, num_fewshot: int | None = None, limit: float | None = None,
              include_path: str | Sequence[str] | None = None, log_samples: bool = False, seed: int = 0,
              tracker=None, model_name: str = "jaxllm", bootstrap_iters: int = 100000) -> dict[str, Any] | None:
    """`lm_eval.simple_evaluate` of `tasks` on `lm`: the harness's results dict on process 0 (with
    "samples" when `log_samples`), None on the other processes."""
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"the number of few-shot examples must be >= 0, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise ConfigError(f"the example limit must be > 0 (a count, or below 1 a fraction), got {limit}")
    try:
        return simple_evaluate(
            model=lm, model_args={"pretrained": model_name}, tasks=list(tasks), num_fewshot=num_fewshot,
            limit=limit, task_manager=manager, log_samples=log_samples, evaluation_tracker=tracker,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=bootstrap_iters, batch_size=lm.batch_size,
        )
    except (FileNotFoundError, ValueError) as e:
        # A task whose data files are missing, or a malformed task YAML: the harness's message, on one line.
        raise JaxllmError(f"lm-evaluation-harness could not run {', '.join(tasks)}: {e}".replace("\n", " ")) from e


def flat_metrics(results: dict[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """The tasks' metrics as {prefix + TASK/METRIC: value} (a filter other than "none" appended as
    /FILTER, e.g. eval/gsm8k/exact_match/strict-match); standard errors and non-numbers left out."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            name = f"{prefix}{task}/{metric}" + ("" if filter_name == "none" else f"/{filter_name}")
            out[name] = float(value) if math.isfinite(value) else float("nan")
    return out


def evaluate_tasks(trainer) -> dict[str, float]:
    """The trainer's eval.tasks scored on its live parameters (on its mesh: no checkpoint round trip; the
    scoring programs are compiled once per shape, so later evaluations reuse them), as flat_metrics on
    process 0 (which alone writes metrics), {} on the others."""
    from jaxllm.eval.harness import JaxLM

    cfg = trainer.cfg
    lm = JaxLM(trainer.graphdef, trainer.state.params, cfg.model, trainer.tokenizer, trainer.mesh, trainer.rules,
               add_bos=cfg.data.add_bos, batch_size=cfg.train.batch_size, seed=cfg.train.seed, name=cfg.run_dir)
    limit = cfg.eval.tasks_limit
    results = run_tasks(lm, cfg.eval.tasks, num_fewshot=cfg.eval.tasks_num_fewshot,
                        limit=int(limit) if limit is not None and limit >= 1 else limit,
                        include_path=cfg.eval.include_path, seed=cfg.train.seed, model_name=cfg.run_dir,
                        bootstrap_iters=0)
    return flat_metrics(results) if results is not None else {}
