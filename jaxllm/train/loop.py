"""The trainer: builds mesh, model, optimizer and data from a Config, then steps, logs and checkpoints.

Restarting with the same `run_dir` resumes from the newest complete checkpoint: parameters, optimizer
state, step and the data iterator's position, so the continued run equals an uninterrupted one.
SIGTERM (preemption) makes the loop save a checkpoint after the current step and return.
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
import numpy as np
from tqdm.auto import tqdm

from jaxllm import models, sharding
from jaxllm.config import Config, JaxllmError, config_from_yaml_text, dump_yaml, validate
from jaxllm.data.objectives import batch_spec, check_vocab_size
from jaxllm.data.pipeline import make_pipeline
from jaxllm.data.tokenizer import load_tokenizer, load_tokenizer_from_files
from jaxllm.models import lora
from jaxllm.train.checkpoint import Checkpointer, find_checkpoint
from jaxllm.train.metrics import MetricsWriter, truncate_metrics
from jaxllm.train.optim import make_optimizer, make_schedule, opt_state_shardings
from jaxllm.train.step import TrainState, eval_step, jit_train_step
from jaxllm.utils import atomic_write_text

log = logging.getLogger("jaxllm")
DEFAULT_TOKENIZER = "builtin:kjv-sp4k"


class Trainer:
    def __init__(self, cfg: Config, devices: Sequence[jax.Device] | None = None):
        init = None
        if cfg.train.init_from:
            # The starting checkpoint decides the architecture (see TrainConfig.init_from).
            init_checkpointer, init_step = find_checkpoint(cfg.train.init_from)
            init = (init_checkpointer, init_step, init_checkpointer.restore(init_step, None))
            saved = config_from_yaml_text(init[2].config_yaml).model
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(
                saved, dtype=cfg.model.dtype, remat=cfg.model.remat, attention_impl=cfg.model.attention_impl,
                lora=cfg.model.lora, quant=cfg.model.quant))
            validate(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        self.rules = sharding.make_rules(cfg.mesh.rules)
        sharding.check_batch_divides(cfg.train.batch_size, cfg.train.grad_accum, self.mesh, self.rules)
        if cfg.eval.sources and cfg.eval.batches == 0 and jax.process_count() > 1:
            raise JaxllmError(
                "eval.batches=0 (the whole held-out set) needs one process: processes may hold different "
                "numbers of batches; set eval.batches to a fixed count"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpointer = Checkpointer(self.run_dir / "checkpoints", cfg.checkpoint)
        resume_step = self.checkpointer.latest_step()
        restored_meta = self.checkpointer.restore(resume_step, None) if resume_step is not None else None
        if restored_meta is not None:
            _check_same_model(cfg, restored_meta.config_yaml, self.run_dir)
            self.tokenizer = load_tokenizer_from_files(restored_meta.tokenizer_files)
        elif cfg.tokenizer.path is None and init is not None and init[2].tokenizer_files:
            self.tokenizer = load_tokenizer_from_files(init[2].tokenizer_files)
        else:
            self.tokenizer = load_tokenizer(cfg.tokenizer.path or DEFAULT_TOKENIZER)
        _check_trainable(cfg)
        check_vocab_size(cfg.model.vocab_size, cfg.data, self.tokenizer)

        # Model, optimizer and their shardings, all derived from abstract shapes.
        self.graphdef, abstract_params, logical = models.model_spec(cfg.model)
        param_shardings = sharding.tree_shardings(abstract_params, logical, self.mesh, self.rules)
        self.schedule = make_schedule(cfg.optim, cfg.train.steps)
        self.tx = make_optimizer(cfg.optim, cfg.train.steps)
        abstract_opt = jax.eval_shape(self.tx.init, lora.trainable(abstract_params))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.state_shardings = TrainState(
            step=replicated,
            params=param_shardings,
            opt_state=opt_state_shardings(abstract_opt, abstract_params, param_shardings, self.mesh),
        )

        per_process_batch = cfg.train.batch_size // jax.process_count()
        self.data = make_pipeline(cfg.data, self.tokenizer, per_process_batch, jax.process_index(), jax.process_count())
        if restored_meta is not None:
            abstract_state = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                _state_dict(TrainState(step=jax.ShapeDtypeStruct((), np.int32), params=abstract_params, opt_state=abstract_opt)),
                _state_dict(self.state_shardings),
            )
            restored = self.checkpointer.restore(resume_step, abstract_state)
            self.state = TrainState(**restored.state)
            if restored.data_state is not None:
                self.data.set_state(restored.data_state)
            truncate_metrics(self.run_dir, resume_step)
            log.info("resumed from %s at step %d", self.checkpointer.directory / str(resume_step), resume_step)
        else:
            if init is not None:
                params = _init_params_from(init, saved, cfg.model, self.mesh, self.rules, param_shardings,
                                           cfg.train.seed)
                log.info("parameters from %s (step %d)", init[0].directory / str(init[1]), init[1])
            else:
                _, params, _ = models.init_params(cfg.model, self.mesh, self.rules, cfg.train.seed)
            opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(lora.trainable(params))
            step = jax.device_put(np.int32(0), replicated)
            self.state = TrainState(step=step, params=params, opt_state=opt_state)
        self.data_state = self.data.get_state()

        self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules, 2)
        self.batch_spec = batch_spec(cfg.data, cfg.train.batch_size)  # global shapes and dtypes
        with sharding.activate(self.mesh, self.rules):
            self._step_fn = jit_train_step(
                self.graphdef,
                self.tx,
                self.schedule,
                cfg.train.grad_accum,
                cfg.train.z_loss,
                cfg.train.seed,
                self.state_shardings,
                self.batch_sharding,
            )
        self._eval_fn = jax.jit(
            functools.partial(eval_step, graphdef=self.graphdef),
            in_shardings=(self.state_shardings.params, self.batch_sharding),
        )
        if jax.process_index() == 0:
            atomic_write_text(self.run_dir / "config.yaml", dump_yaml(cfg))
        self._stop = threading.Event()

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def next_batch(self) -> dict[str, jax.Array]:
        """The next global batch, assembled from this process's share of the data."""
        local = next(self.data)
        self.data_state = self.data.get_state()
        return self._global_batch(local)

    def _global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v), self.batch_spec[k][0])
            for k, v in local.items()
        }

    def train_step(self, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        with sharding.activate(self.mesh, self.rules):
            self.state, metrics = self._step_fn(self.state, batch)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Mean token loss and perplexity on the eval sources (a fresh pass from their start)."""
        cfg = self.cfg
        data_cfg = dataclasses.replace(cfg.data, sources=cfg.eval.sources, shuffle_window=0, prefetch=0)
        per_process = cfg.train.batch_size // jax.process_count()
        pipeline = make_pipeline(data_cfg, self.tokenizer, per_process, jax.process_index(), jax.process_count(),
                                 num_epochs=1)
        nll, tokens, count = 0.0, 0.0, 0
        try:
            while cfg.eval.batches == 0 or count < cfg.eval.batches:
                local = next(pipeline, None)
                if local is None:
                    if cfg.eval.batches == 0:
                        break
                    # Every process must run the same number of steps: pad with batches that carry no loss.
                    local = {k: np.zeros((per_process, *shape[1:]), dtype) for k, (shape, dtype) in self.batch_spec.items()}
                batch = self._global_batch(local)
                with sharding.activate(self.mesh, self.rules):
                    out = jax.device_get(self._eval_fn(self.state.params, batch))
                nll, tokens, count = nll + float(out["nll_sum"]), tokens + float(out["tokens"]), count + 1
        finally:
            pipeline.close()
        if tokens == 0:
            raise JaxllmError(f"eval.sources {[s.path for s in cfg.eval.sources]} produced no tokens")
        loss = nll / tokens
        return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 50.0))), "eval_tokens": tokens}

    def save(self) -> None:
        self.checkpointer.save(
            self.step,
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
        previous = _install_sigterm(self._stop)
        bar = tqdm(
            total=cfg.train.steps, initial=start, desc="train", unit="step",
            disable=not cfg.train.progress_bar or jax.process_index() != 0, dynamic_ncols=True,
        )
        summary: dict[str, Any] = {"start_step": start, "losses": {}}
        tokens_per_step = sum(  # input tokens a step reads (encoder and decoder for seq2seq)
            int(np.prod(shape)) for k, (shape, _) in self.batch_spec.items() if k.endswith("inputs"))
        t_last, since_log, step = time.perf_counter(), 0, start
        try:
            while step < end and not self._stop.is_set():
                metrics = self.train_step(self.next_batch())
                step += 1
                since_log += 1
                do_eval = bool(cfg.eval.sources) and (
                    (cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps
                )
                if step % cfg.train.log_every == 0 or step == end or do_eval:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    # The first interval after start includes compilation.
                    m["step_time"] = (now - t_last) / since_log
                    m["tokens_per_sec"] = tokens_per_step * since_log / (now - t_last)
                    if do_eval:
                        m.update(self.evaluate())
                        summary["eval_loss"] = m["eval_loss"]
                    t_last, since_log = time.perf_counter(), 0
                    writer.write(step, m)
                    summary["losses"][step] = m["loss"]
                    bar.set_postfix(loss=f"{m['loss']:.3f}", refresh=False)
                    if not np.isfinite(m["loss"]):
                        raise JaxllmError(f"loss became {m['loss']} at step {step}; lower optim.lr or check the data")
                bar.update(1)
                if step % cfg.checkpoint.every == 0 and step < end:
                    self.save()
            if self._stop.is_set():
                log.warning("stop requested (SIGTERM): saving a checkpoint at step %d", step)
            if self.checkpointer.latest_step() != step:
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
        if hasattr(self.data, "close"):
            self.data.close()


def _init_params_from(init, saved, model_cfg, mesh, rules, shardings, seed):
    """The starting parameters from a checkpoint of the `saved` model: a LoRA run's adapters are merged
    into its base first; this run's policies (model.lora, model.quant) then apply to that base."""
    params = init[0].restore_params(init[1], _abstract_params(saved, mesh, rules))
    if saved.lora is not None or saved.quant is not None:
        base = _abstract_params(lora.base_config(saved), mesh, rules)
        params = lora.merge(params, saved, jax.tree.map(lambda a: a.sharding, base))
    return lora.adapt(params, model_cfg, shardings, seed)


def _abstract_params(model_cfg, mesh, rules):
    _, abstract, logical = models.model_spec(model_cfg)
    shardings = sharding.tree_shardings(abstract, logical, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _state_dict(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _check_same_model(cfg: Config, saved_yaml: str, run_dir: Path) -> None:
    saved = config_from_yaml_text(saved_yaml)
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


OBJECTIVE_ARCH = {"clm": "decoder", "mlm": "encoder", "span": "encoder_decoder", "bart": "encoder_decoder",
                  "ul2": "encoder_decoder"}


def _check_trainable(cfg: Config) -> None:
    """The objective must fit the model: next-token for decoders, masked LM for encoders, denoising for
    encoder-decoders."""
    objective, arch = cfg.data.objective.name, cfg.model.arch
    if OBJECTIVE_ARCH[objective] != arch:
        fits = [name for name, a in OBJECTIVE_ARCH.items() if a == arch]
        raise JaxllmError(
            f"data.objective.name={objective} trains a model.arch={OBJECTIVE_ARCH[objective]}, but this model is "
            f"arch={arch}; use data.objective.name={' or '.join(fits)}, or a config of the other kind under configs/"
        )
    if cfg.model.quant is not None and cfg.model.lora is None:
        raise JaxllmError("model.quant stores the base quantised and frozen; to train, add adapters with "
                          "model.lora (QLoRA), or drop model.quant")
    if arch == "encoder" and cfg.model.head != "mlm" and cfg.model.electra_generator is None:
        raise JaxllmError(
            f"an encoder with model.head={cfg.model.head} cannot be pre-trained: use head=mlm, or head=discriminator "
            "with model.electra_generator (ELECTRA)"
        )


def _install_sigterm(stop: threading.Event):
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())


def _restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
