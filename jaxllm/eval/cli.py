"""`jaxllm eval`: harness tasks on a model, the harness's table and files; `--bench-hf` times jaxllm against the
harness's Hugging Face backend on the same model and tasks, in one run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax

from jaxllm.config import JaxllmError


def run_eval_command(args) -> int:
    from lm_eval.utils import make_table

    from jaxllm.eval.harness import load_lm
    from jaxllm.eval.tasks import run_tasks, task_manager

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    task_manager(tasks, args.include_path)  # unknown tasks fail before the model loads
    if args.bench_hf:
        result = bench_against_hf(args.model, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                                  batch_size=args.batch_size, include_path=args.include_path)
        print(json.dumps(result, indent=2))
        return 0
    if args.max_gen_toks < 1:
        raise JaxllmError(f"--max-gen-toks must be >= 1, got {args.max_gen_toks}")
    lm = load_lm(args.model, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks, seed=args.seed)
    tracker = None
    if args.output_path:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=args.output_path)
    results = run_tasks(lm, tasks, num_fewshot=args.num_fewshot, limit=args.limit, include_path=args.include_path,
                        log_samples=args.log_samples, seed=args.seed, tracker=tracker, model_name=str(args.model))
    if results is None:  # not process 0
        return 0
    samples = results.pop("samples", None)
    if tracker is not None:
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples is not None:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    print(f"{args.model}: limit {args.limit}, num_fewshot {args.num_fewshot}, batch_size {lm.batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    return 0


def bench_against_hf(model: str, tasks: list[str], *, limit: float | None, num_fewshot: int | None,
                     batch_size: int, include_path: str | None) -> dict[str, Any]:
    """Requests/s of jaxllm's backend (first run: with compilation; second: compiled) and of the harness's
    HFLM (torch, on CPU, or the GPU when torch sees one) on the same Hugging Face directory and tasks, the
    largest log-likelihood difference between them, and whether the task metrics agree."""
    if not (Path(model) / "config.json").is_file():
        raise JaxllmError(f"--bench-hf needs a Hugging Face model directory (config.json + safetensors), which both "
                          f"backends read; {model} is not one (jaxllm convert jaxllm-to-hf writes one)")
    import torch
    from lm_eval.models.huggingface import HFLM

    from jaxllm.eval.harness import load_lm
    from jaxllm.eval.tasks import flat_metrics, run_tasks, task_manager

    task_manager(tasks, include_path)  # the task index is built once, outside the timed runs

    def timed(lm) -> tuple[float, dict]:
        start = time.perf_counter()
        results = run_tasks(lm, tasks, num_fewshot=num_fewshot, limit=limit, include_path=include_path,
                            log_samples=True, bootstrap_iters=0)
        return time.perf_counter() - start, results

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_seconds, hf_results = timed(HFLM(pretrained=model, device=device, batch_size=batch_size))
    lm = load_lm(model, batch_size=batch_size)
    cold, _ = timed(lm)
    warm, ours = timed(lm)
    requests = sum(len(s["arguments"]) for task in ours["samples"].values() for s in task)
    scores = [(a, b) for task in ours["samples"] for x, y in zip(ours["samples"][task], hf_results["samples"][task])
              for a, b in zip(x["resps"], y["resps"]) if isinstance(a[0], (tuple, list, float))]
    gap = max((abs(_logp(a) - _logp(b)) for a, b in scores), default=0.0)
    ours_metrics, hf_metrics = flat_metrics(ours, ""), flat_metrics(hf_results, "")
    return {
        "model": model, "tasks": tasks, "limit": limit, "requests": requests, "batch_size": lm.batch_size,
        "jaxllm": {"devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                   "seconds_first_run": cold, "seconds": warm, "requests_per_sec": requests / warm,
                   "requests_per_sec_first_run": requests / cold},
        "hf": {"device": device, "seconds": hf_seconds, "requests_per_sec": requests / hf_seconds},
        "speedup": hf_seconds / warm,
        "max_abs_loglikelihood_difference": gap,
        "metrics": {"jaxllm": ours_metrics, "hf": hf_metrics},
    }


def _logp(response) -> float:
    value = response[0]
    return float(value[0] if isinstance(value, (tuple, list)) else value)
