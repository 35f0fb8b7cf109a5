"""The trainer: builds mesh, model, optimizer and data from a Config, then steps, logs and checkpoints.

Restarting with the same `run_dir` resumes from the newest complete checkpoint that passes its
checksums: parameters, optimizer state, step and the data iterator's position, so the continued run
equals an uninterrupted one, however often it was killed. SIGTERM (preemption) makes the loop save a
checkpoint after the current step and return. Before any work, the run_dir must be writable and its
disk must hold a checkpoint. NaN/Inf steps and loss spikes are handled by `monitor.StepMonitor`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from jaxllm import models, sharding
from jaxllm.models.attention import MAX_SEGMENTS, resolve_impl
from jaxllm.models.layers import DTYPES
from jaxllm.config import Config, ConfigError, DataConfig, JaxllmError, ModelConfig, SourceConfig, dump_yaml, validate
from jaxllm.data.objectives import check_vocab_size, special_ids, tokens_to_add
from jaxllm.data.pipeline import Pipeline, process_pipeline
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, load_tokenizer_from_files
from jaxllm.models import lora
from jaxllm.models.heads import change_head
from jaxllm.models.vocab import grown_vocab_size, resize_vocab
from jaxllm.train.checkpoint import Checkpointer, Meta
from jaxllm.train.frozen import FrozenModel, Pretrained, frozen_shardings, load_frozen, open_pretrained
from jaxllm.train.metrics import MetricsWriter, truncate_metrics
from jaxllm.train.monitor import StepMonitor
from jaxllm.train.objective import check_trainable, step_batch_spec
from jaxllm.train.step import (TrainState, bound_loss, eval_step, init_train_state, jit_train_step,
                               train_state_spec)
from jaxllm.utils import atomic_write_text, ensure_writable_dir

log = logging.getLogger("jaxllm")
DEFAULT_TOKENIZER = "builtin:kjv-sp4k"


class Trainer:
    """One trainer for every objective (train/objective.py): pretraining and post-training methods differ
    in their batch format, loss and frozen models, never in the loop, checkpoints or meshes.

    The constructor runs named setup steps, in order: `_start_from` (train.init_from), `_make_mesh`,
    `_open_run_dir` (checkpoints, the step to resume), `_choose_tokenizer`, `_add_tokens` (added special
    tokens; a model from init_from grows to fit), the objective's checks and the state's spec, `_pipeline`
    (this process's batches), `_build_state` (restored or initialised), `_load_frozen_models`, `_compile`.
    """

    def __init__(self, cfg: Config, devices: Sequence[jax.Device] | None = None):
        self.cfg = self._start_from(cfg)
        self.run_dir = Path(self.cfg.run_dir)
        self._make_mesh(devices)
        self._open_run_dir()
        self.tokenizer = self._choose_tokenizer()
        self._added_tokens: list[str] = []
        self._add_tokens([*self.cfg.tokenizer.add_special_tokens, *tokens_to_add(self.cfg.data, self.tokenizer)])
        self.objective = check_trainable(self.cfg)
        self.cfg = self.objective.prepare(self.cfg, self.tokenizer)
        if self._resume is not None:  # after _add_tokens (a grown vocabulary) and prepare (ppo's value head)
            _check_same_model(self.cfg, self._resume.config, self.run_dir)
        check_vocab_size(self.cfg.model.vocab_size, self.cfg.data, self.tokenizer)
        self.spec = train_state_spec(self.cfg, self.mesh, self.rules)
        self.graphdef, self.state_shardings = self.spec.graphdef, self.spec.shardings
        self.checkpointer.check_free_space(_nbytes(self.spec.abstract), self.cfg.checkpoint.keep)
        # Online methods (jaxllm/rl) train on rollouts the trainer makes, not on a data pipeline's batches.
        self.data = self.objective.online(self) if self.objective.online else self._pipeline(self.cfg.data)
        self._build_state()
        self.frozen = self._load_frozen_models()
        self._compile()
        if self.cfg.eval.tasks:  # an unknown task or task directory fails now, not at the first evaluation
            from jaxllm.eval.tasks import task_manager

            task_manager(self.cfg.eval.tasks, self.cfg.eval.include_path)
        if jax.process_index() == 0:
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(self.cfg))
        self._stop = threading.Event()
        self._saved_step: int | None = self._resume.step if self._resume is not None else None

    # ------------------------------------------------------------------------------------ setup steps

    def _start_from(self, cfg: Config) -> Config:
        """With train.init_from, the starting checkpoint decides the architecture (TrainConfig.init_from):
        its model config, with this config's dtype, remat, attention kernel, LoRA/quant policies and value head."""
        self._init_from: Pretrained | None = None
        if not cfg.train.init_from:
            return cfg
        # Config and tokenizer only: the data position belongs to that run (and its process count).
        self._init_from = open_pretrained(cfg.train.init_from)
        saved = self._init_from.config
        # model.head=reward on an LM: the backbone is loaded and a fresh reward head added (models/heads.py).
        head = "reward" if cfg.model.head == "reward" else saved.head
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            saved, dtype=cfg.model.dtype, remat=cfg.model.remat, attention_impl=cfg.model.attention_impl,
            lora=cfg.model.lora, quant=cfg.model.quant, head=head, value_head=cfg.model.value_head))
        validate(cfg)
        return cfg

    def _make_mesh(self, devices: Sequence[jax.Device] | None) -> None:
        cfg = self.cfg
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        self.rules = sharding.make_rules(cfg.mesh.rules)
        sharding.check_batch_divides(cfg.train.batch_size, cfg.train.grad_accum, self.mesh, self.rules)
        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules, 2)

    def _open_run_dir(self) -> None:
        """Checks run_dir is writable, opens its checkpoints and reads the small items of the newest good
        one (`self._resume`, None for a fresh run)."""
        ensure_writable_dir(self.run_dir, "run_dir")
        ensure_writable_dir(self.run_dir / "checkpoints", "checkpoint directory")
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", self.cfg.checkpoint)
        step = self.checkpointer.newest_good_step(self.cfg.checkpoint.on_corrupt)
        self._resume: Meta | None = self.checkpointer.restore_meta(step) if step is not None else None

    def _choose_tokenizer(self) -> Tokenizer:
        """A resumed run's own tokenizer; else tokenizer.path; else init_from's; else the default."""
        cfg = self.cfg
        if self._resume is not None:
            tokenizer = load_tokenizer_from_files(self._resume.tokenizer_files)
            _check_same_tokenizer(cfg, self._resume.config, tokenizer, self.run_dir)
            return tokenizer
        if cfg.tokenizer.path is None and self._init_from is not None and self._init_from.tokenizer_files:
            return load_tokenizer_from_files(self._init_from.tokenizer_files)
        return load_tokenizer(cfg.tokenizer.path or DEFAULT_TOKENIZER)

    def _add_tokens(self, tokens: Sequence[str]) -> None:
        """Adds `tokens` (tokenizer.add_special_tokens, a chat template's) to the tokenizer, before the state's
        spec is made. With train.init_from, a model with fewer ids than the tokenizer (and an objective's ids
        above it) needs grows to a multiple of 128 (`cfg.model.vocab_size`; `_build_state` resizes the
        parameters); a fresh model whose model.vocab_size is too small is an error naming the added tokens."""
        added = self.tokenizer.add_special_tokens(tokens)
        if added and self._resume is not None:
            raise JaxllmError(f"run_dir {self.run_dir} holds checkpoints whose tokenizer lacks the special tokens "
                              f"{added}; tokens are added when a run starts: use a new run_dir")  # fmt: skip
        if added:
            self._added_tokens += added
            log.info("added %d special tokens to the tokenizer: %s (ids %d-%d)", len(added), ", ".join(added),
                     self.tokenizer.vocab_size - len(added), self.tokenizer.vocab_size - 1)
        needed, model = special_ids(self.cfg.data, self.tokenizer).vocab_size, self.cfg.model
        if needed <= model.vocab_size:
            return
        if self._init_from is not None:
            grown = dataclasses.replace(model, vocab_size=grown_vocab_size(needed))
            self.cfg = dataclasses.replace(self.cfg, model=grown)
        elif self._added_tokens:
            raise ConfigError(
                f"model.vocab_size={model.vocab_size} is too small for the tokenizer's {self.tokenizer.vocab_size} ids "
                f"with the added tokens {', '.join(self._added_tokens)} ({needed} ids in all); set model.vocab_size >= "
                f"{needed} (e.g. {grown_vocab_size(needed)}), or start from a trained model (train.init_from), whose "
                "vocabulary grows to fit"
            )

    def _pipeline(self, data: DataConfig, num_epochs: int | None = None) -> Pipeline:
        """This process's share of `data`'s batches."""
        return process_pipeline(data, self.tokenizer, self.cfg.train.batch_size, num_epochs)

    def _build_state(self) -> None:
        """The train state: restored from the resumed checkpoint (with the data position), or step 0 of
        init_from's parameters or a fresh initialisation. Metrics rows after the checkpoint are dropped."""
        cfg, resume = self.cfg, self._resume
        if resume is not None:
            self.state = TrainState(**self.checkpointer.restore_state(resume.step, _state_dict(self.spec.abstract)))
            if resume.data_state is not None:
                self.data.set_state(resume.data_state)
            log.info("resumed from %s at step %d", self.checkpointer.directory / str(resume.step), resume.step)
        else:
            if self._init_from is not None:
                base = self._init_from.params(self.mesh, self.rules, self._init_from.config.param_dtype)
                base = self._resize_vocab(base, self._init_from.config)
                base = change_head(base, self._init_from.config, cfg.model, self.state_shardings.params, cfg.train.seed)
                # This run's policies (model.lora, model.quant) apply to that base.
                params = lora.adapt(base, cfg.model, self.state_shardings.params, cfg.train.seed)
                log.info("parameters from %s", self._init_from.where)
            else:
                _, params, _ = models.init_params(cfg.model, self.mesh, self.rules, cfg.train.seed)
            self.state = init_train_state(self.spec, params)
            log.info("no checkpoint in %s: starting at step 0", self.checkpointer.directory)
        # Rows a killed run logged after its last checkpoint (or a line it cut short) would repeat.
        truncate_metrics(self.run_dir, resume.step if resume is not None else 0)
        self.data_state = self.data.get_state()

    def _resize_vocab(self, base: Any, base_cfg: ModelConfig) -> Any:
        """init_from's parameters with this run's vocabulary (grown by `_add_tokens`), logged."""
        old, new = base_cfg.vocab_size, self.cfg.model.vocab_size
        if old == new:
            return base
        base, _ = resize_vocab(base, base_cfg, new)
        added = self._added_tokens
        why = f"{len(added)} added tokens ({', '.join(added)})" if added else f"{self.tokenizer.vocab_size} ids needed"
        log.info("model vocabulary %d -> %d: %s; new embedding rows are the mean of the old", old, new, why)
        if self.cfg.model.lora is not None:
            log.warning("model.lora: the embedding is not an adapter target, so the new rows stay the mean and the "
                        "added tokens are not learned; fine-tune fully to train them")
        return base

    def _load_frozen_models(self) -> dict[str, FrozenModel]:
        """The objective's frozen models (reference, teacher, ...), on this mesh; none for pretraining."""
        return {name: load_frozen(source.path, self.mesh, self.rules, source.param_dtype,
                                  self.cfg.model.vocab_size if source.match_vocab else None)
                for name, source in self.objective.frozen_models(self.cfg).items()}

    def _compile(self) -> None:
        cfg = self.cfg
        self.batch_spec = step_batch_spec(cfg, cfg.train.batch_size)  # global shapes and dtypes
        # cuDNN's packed attention holds a fixed number of documents per row (see attention.MAX_SEGMENTS).
        uses_cudnn = resolve_impl(cfg.model.attention_impl, DTYPES[cfg.model.dtype], False, False) == "cudnn"
        self._segment_limit = MAX_SEGMENTS if uses_cudnn and cfg.model.positions not in ("alibi", "relative") else None
        frozen = frozen_shardings(self.frozen)
        with sharding.activate(self.mesh, self.rules):
            self._step_fn = jit_train_step(cfg, self.spec, self.batch_sharding, frozen)
        self._eval_fn = jax.jit(
            functools.partial(eval_step, graphdef=self.graphdef, loss=bound_loss(cfg),
                              metrics=self.objective.eval_metrics, loss_count=self.objective.loss_count),
            in_shardings=(self.state_shardings.params, self.batch_sharding, frozen),
        )

    # ------------------------------------------------------------------------------------ training

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def next_batch(self) -> dict[str, jax.Array]:
        """The next global batch, assembled from this process's share of the data."""
        local = next(self.data)
        self.data_state = self.data.get_state()
        if self._segment_limit is not None:
            _check_segments(local, self._segment_limit)
        return self._global_batch(local)

    def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """The global arrays of this process's rows: the spec's batch dimension, the rows' own widths (an online
        objective's rows are as wide as their rollout, jaxllm/rl/objectives.py)."""
        return {
            k: jax.make_array_from_process_local_data(
                self.batch_sharding, np.asarray(v), (self.batch_spec[k][0][0], *np.shape(v)[1:]))
            for k, v in local.items()
        }

    def train_step(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        with sharding.activate(self.mesh, self.rules):
            self.state, metrics = self._step_fn(self.state, batch, self.frozen)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Mean token loss (eval_loss), perplexity and token count over all eval sources, each read once
        from its start (at most eval.batches batches each), and the objective's eval metrics (eval_<metric>,
        e.g. sft's eval_exact_match); with more than one source also each source's own loss, tokens and
        metrics as eval_loss/NAME, eval_tokens/NAME, eval_<metric>/NAME (NAME: the source's path, with #INDEX
        after a path that two sources share); and with eval.tasks the harness tasks' metrics as
        eval/TASK/METRIC (jaxllm.eval.tasks.evaluate_tasks)."""
        metrics = {}
        if self.cfg.eval.tasks:
            from jaxllm.eval.tasks import evaluate_tasks

            metrics.update(evaluate_tasks(self))
        if not self.cfg.eval.sources:
            return metrics
        if self.objective.online:  # eval.sources hold prompts: the held-out reward (jaxllm/rl/online.py)
            return {**metrics, **self.data.evaluate()}
        paths = [source.path for source in self.cfg.eval.sources]
        names = [p if paths.count(p) == 1 else f"{p}#{i}" for i, p in enumerate(paths)]
        per_source = {name: self._eval_sums(source) for name, source in zip(names, self.cfg.eval.sources)}
        total = {k: sum(sums[k] for sums in per_source.values()) for k in next(iter(per_source.values()))}
        if total["tokens"] == 0:
            raise JaxllmError(f"eval.sources {paths} produced no tokens")
        metrics.update(self._eval_metrics(total, ""))
        if self.objective.loss_count == "tokens":  # a token loss: its perplexity
            metrics["eval_ppl"] = float(np.exp(min(metrics["eval_loss"], 50.0)))
        if len(per_source) > 1:
            for name, sums in per_source.items():
                metrics.update(self._eval_metrics(sums, f"/{name}"))
        return metrics

    def _eval_metrics(self, sums: dict[str, float], suffix: str) -> dict[str, float]:
        count = sums["loss_count"]
        out = {f"eval_loss{suffix}": sums["nll_sum"] / count if count else float("nan"),
               f"eval_tokens{suffix}": sums["tokens"]}
        for name, count in self.objective.eval_metrics:
            denominator = sums[f"count/{count}"]
            out[f"eval_{name}{suffix}"] = sums[f"sum/{name}"] / denominator if denominator else float("nan")
        return out

    def _eval_sums(self, source: SourceConfig) -> dict[str, float]:
        """The eval step's sums (token loss, tokens, the objective's metrics) over one pass of `source` (at
        most eval.batches batches)."""
        cfg = self.cfg
        data_cfg = dataclasses.replace(cfg.data, sources=[source], shuffle_window=0, prefetch=0)
        pipeline = self._pipeline(data_cfg, num_epochs=1)
        per_process = cfg.train.batch_size // jax.process_count()
        sums, count = None, 0  # summed on the device: one transfer after the loop, not one per batch
        try:
            while cfg.eval.batches == 0 or count < cfg.eval.batches:
                local = next(pipeline, None)
                if cfg.eval.batches == 0 and not _any_process(local is not None):
                    break
                if local is None:
                    # Every process must run the same number of steps: pad with batches that carry no loss.
                    local = {k: np.zeros((per_process, *shape[1:]), dtype) for k, (shape, dtype) in self.batch_spec.items()}
                batch = self._global_batch(local)
                with sharding.activate(self.mesh, self.rules):
                    out = self._eval_fn(self.state.params, batch, self.frozen)
                sums, count = out if sums is None else jax.tree.map(jnp.add, sums, out), count + 1
        finally:
            pipeline.close()
        if sums is None:
            return {"nll_sum": 0.0, "tokens": 0.0, "loss_count": 0.0, **{k: 0.0 for name, c in self.objective.eval_metrics
                                                       for k in (f"sum/{name}", f"count/{c}")}}
        return {k: float(v) for k, v in jax.device_get(sums).items()}

    def save(self) -> None:
        self._saved_step = self.step
        self.checkpointer.save(
            self._saved_step,
            _state_dict(self.state),
            self.data_state,
            dump_yaml(self.cfg),
            self.tokenizer.files(),
        )

    def request_stop(self) -> None:
        self._stop.set()

    def run(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Trains until train.steps (or `stop_at_step`, or SIGTERM); returns a summary of the run."""
        cfg = self.cfg
        end = cfg.train.steps if stop_at_step is None else min(stop_at_step, cfg.train.steps)
        start = self.step
        writer = MetricsWriter(self.run_dir)
        monitor = StepMonitor(cfg.train, self.run_dir, writer)
        previous = _install_sigterm(self._stop)
        bar = tqdm(
            total=cfg.train.steps, initial=start, desc="train", unit="step",
            disable=not cfg.train.progress_bar or jax.process_index() != 0, dynamic_ncols=True,
        )
        summary: dict[str, Any] = {"start_step": start, "losses": {}}
        tokens_per_step = sum(  # input tokens a step reads (encoder and decoder for seq2seq)
            int(np.prod(shape)) for k, (shape, _) in self.batch_spec.items() if k.endswith("inputs"))
        evaluates = bool(cfg.eval.sources or cfg.eval.tasks)
        if evaluates and cfg.eval.at_start and start == 0:
            m = self.evaluate()
            writer.write(0, m)
            if "eval_loss" in m:
                summary["start_eval_loss"] = m["eval_loss"]
        t_last, since_log, step = time.perf_counter(), 0, start
        try:
            # Online methods stop between rollouts only (their updates' batches cannot be replayed).
            while step < end and not (self._stop.is_set() and getattr(self.data, "at_boundary", lambda: True)()):
                before = self.data_state  # where this step's batch starts: a bad batch can be replayed
                metrics = self.train_step(self.next_batch())
                step += 1
                since_log += 1
                monitor.add(step, before, metrics)
                do_eval = evaluates and (
                    (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps
                )
                if step % cfg.train.log_every == 0 or step == end or do_eval:
                    m = {k: float(v) for k, v in monitor.check(metrics).items() if k != "finite"}
                    m["skipped_updates"] = int(m["skipped_updates"])
                    now = time.perf_counter()
                    # The first interval after start includes compilation.
                    m["step_time"] = (now - t_last) / since_log
                    m["tokens_per_sec"] = tokens_per_step * since_log / (now - t_last)
                    if self.objective.online:  # the rollouts' metrics and time (jaxllm/rl/online.py)
                        m.update(self.data.step_metrics(now - t_last))
                    if do_eval:
                        m.update(self.evaluate())
                        if "eval_loss" in m:
                            summary["eval_loss"] = m["eval_loss"]
                    t_last, since_log = time.perf_counter(), 0
                    writer.write(step, m)
                    summary["losses"][step] = m["loss"]
                    bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
                bar.update(1)
                if step % cfg.checkpoint.every == 0 and step < end:
                    monitor.check()  # under on_nonfinite=stop no checkpoint may hold a state past a bad step
                    self.save()
            monitor.check()
            if self._stop.is_set():
                log.warning("stop requested (SIGTERM): saving a checkpoint at step %d", step)
            if self._saved_step != step:
                self.save()
            self.checkpointer.wait()
        finally:
            bar.close()
            writer.close()
            _restore_sigterm(previous)
        summary["end_step"] = step
        summary["stopped_early"] = step < cfg.train.steps
        return summary

    def close(self) -> None:
        self.checkpointer.close()
        self.data.close()


def _any_process(flag: bool) -> bool:
    """True when `flag` holds on any process (processes' shares of a held-out set differ in length)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _state_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "skipped": state.skipped}


def _nbytes(tree: Any) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def _check_same_model(cfg: Config, saved: Config, run_dir: Path) -> None:
    if saved.model != cfg.model:
        diffs = [
            f"model.{f.name}: checkpoint {getattr(saved.model, f.name)!r} vs config {getattr(cfg.model, f.name)!r}"
            for f in dataclasses.fields(cfg.model)
            if getattr(saved.model, f.name) != getattr(cfg.model, f.name)
        ]
        raise JaxllmError(
            f"run_dir {run_dir} holds checkpoints of a different model ({'; '.join(diffs)}); "
            "use a new run_dir or the original model settings"
        )


def _check_segments(batch: dict[str, np.ndarray], limit: int) -> None:
    segments = batch.get("segment_ids", batch.get("encoder_segment_ids"))
    # online RL's pretraining rows (rl.ptx_coef) are packed clm rows too
    most = max(int(s.max()) if s.size else 0 for s in (segments, batch.get("ptx_segment_ids", segments)))
    if most > limit:
        raise JaxllmError(
            f"a packed row holds {most} documents, more than the {limit} cuDNN's packed attention takes; "
            "lower data.seq_len, or set model.attention_impl=xla"
        )


def _check_same_tokenizer(cfg: Config, saved_cfg: Config, saved: Tokenizer, run_dir: Path) -> None:
    """A resumed run uses the tokenizer stored in its checkpoint; a config naming another one is an error,
    not silently ignored (the same files under a new path are fine; no tokenizer.path means the run's)."""
    saved_path = saved_cfg.tokenizer.path
    if cfg.tokenizer.path in (None, saved_path):
        return
    named = load_tokenizer(cfg.tokenizer.path)
    extra = range(named.vocab_size, saved.vocab_size)  # tokens the run added: add them to compare
    if extra and set(extra) <= saved.special_ids():
        named.add_special_tokens([saved.id_to_token(i) for i in extra])
    if named.files() == saved.files():
        return
    raise JaxllmError(
        f"run_dir {run_dir} holds checkpoints trained with tokenizer {saved_path}, but tokenizer.path is "
        f"{cfg.tokenizer.path} (a different tokenizer); use a new run_dir or tokenizer.path={saved_path}"
    )


def _install_sigterm(stop: threading.Event):
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
