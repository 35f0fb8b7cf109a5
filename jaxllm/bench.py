"""Benchmarks: training throughput and MFU, the same model in Hugging Face `transformers` side by side,
the data pipeline alone, and generation (prefill and decode).

`jaxllm bench CONFIG [overrides]` or `python tools/bench.py CONFIG`. Prints a table and writes JSON.
Speed is measured here, never in the test suite. The formulas are in docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import models, sharding
from jaxllm.bench_batches import objective_batch, synthetic_batch
from jaxllm.config import Config, JaxllmError
from jaxllm.plan.estimate import flops_per_token, matmul_params
from jaxllm.utils import atomic_write_text

# bf16 dense matrix peak per chip, FLOP/s (vendor datasheets; H100/H200 SXM without sparsity).
PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v5p": 459e12, "tpu v5": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12,
}


@functools.lru_cache(maxsize=None)
def device_peak_flops(device: jax.Device) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for one device; CPUs are measured, once per process, so
    every row of one bench run has the same MFU denominator (a second measurement differs by its noise)."""
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS.items():
        if name in kind:
            return peak, f"datasheet ({device.device_kind}, bf16)"
    if device.platform == "cpu":
        return measure_matmul_peak(), "measured (float32 matmul on this CPU)"
    return float("nan"), f"unknown device kind {device.device_kind!r}"


def measure_matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a jitted n x n float32 matmul on this host's devices (the CPU ceiling for MFU)."""
    a = jnp.ones((n, n), jnp.float32) * 0.5
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def timed(fn: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return times


def summary(times: list[float], tokens_per_step: int) -> dict[str, float]:
    med = statistics.median(times)
    p90 = sorted(times)[max(int(math.ceil(0.9 * len(times))) - 1, 0)]
    return {"step_time_median": med, "step_time_p90": p90, "tokens_per_sec": tokens_per_step / med}


@dataclasses.dataclass
class Setup:
    """A train state of a config (random init) on all devices, a synthetic batch of its objective, the frozen
    models the objective declares (a teacher, a reference), and the train step compiled once: throughput,
    breakdown and profile all run on it. The step donates the state; `run_step` keeps the newest one."""

    cfg: Config
    mesh: Any
    rules: Any
    spec: Any
    state: Any
    batch: dict[str, jax.Array]
    batch_sharding: Any
    step: Callable
    compile_s: float
    frozen: dict[str, Any] = dataclasses.field(default_factory=dict)

    def run_step(self) -> dict[str, jax.Array]:
        """One train step; its metrics (loss, grad_norm, ...)."""
        self.state, metrics = self.step(self.state, self.batch, self.frozen)
        return metrics


_NOTED: set[str] = set()  # missing init_from paths already noted


def start_from(cfg: Config) -> Config:
    """`cfg` with the model the Trainer would train: with train.init_from (when it exists), that model's
    shapes with this config's dtype, remat, attention kernel and adapters (`Trainer._start_from`); the
    weights are not read (the bench initialises at random). A missing init_from leaves the config's model
    section, said once on stderr."""
    import sys

    path = cfg.train.init_from
    if not path:
        return cfg
    if not Path(path).exists():
        if path not in _NOTED:
            _NOTED.add(path)
            print(f"note: train.init_from={path} does not exist: measuring the config's model section instead",
                  file=sys.stderr)
        return cfg
    from jaxllm.train.frozen import open_pretrained

    m = cfg.model
    saved = open_pretrained(path).config
    return dataclasses.replace(cfg, model=dataclasses.replace(
        saved, dtype=m.dtype, remat=m.remat, attention_impl=m.attention_impl, lora=m.lora, quant=m.quant))


def setup(cfg: Config, packed: bool | None = None, segments: int = 4) -> Setup:
    """Initialises `cfg`'s parameters in their shardings, loads the frozen models its objective declares
    (as the Trainer does), and compiles its train step (timed) on a synthetic batch of its objective
    (`objective_batch`; `packed` forces or refuses packed rows of `segments` prompt + completion examples)."""
    from jaxllm.train.frozen import frozen_shardings, load_frozen
    from jaxllm.train.objective import check_trainable
    from jaxllm.train.step import init_train_state, jit_train_step, train_state_spec

    objective = check_trainable(cfg)
    cfg = _prepared(objective, start_from(cfg))
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.make_rules(cfg.mesh.rules)
    sharding.check_batch_divides(cfg.train.batch_size, cfg.train.grad_accum, mesh, rules)
    spec = train_state_spec(cfg, mesh, rules)
    _, params, _ = models.init_params(cfg.model, mesh, rules, seed=0)
    batch_sh = sharding.batch_sharding(mesh, rules, 2)
    batch = {k: jax.device_put(v, batch_sh)
             for k, v in objective_batch(cfg, cfg.train.batch_size, packed=packed, segments=segments).items()}
    frozen = {}
    for name, source in objective.frozen_models(cfg).items():
        if name == REFERENCE:
            frozen[name] = _reference_from_policy(cfg.model, params, source.param_dtype)
            continue
        if not Path(source.path).exists():
            raise JaxllmError(f"the {cfg.data.objective.name} objective's frozen model {name!r} is read from "
                              f"{source.path}, which does not exist: train or convert it first, or point the "
                              "config at one")
        frozen[name] = load_frozen(source.path, mesh, rules, source.param_dtype)
    state = init_train_state(spec, params)
    with sharding.activate(mesh, rules):
        t = time.perf_counter()
        step = jit_train_step(cfg, spec, batch_sh, frozen_shardings(frozen), seed=0)
        step = step.lower(state, batch, frozen).compile()
        compile_s = time.perf_counter() - t
    return Setup(cfg, mesh, rules, spec, state, batch, batch_sh, step, compile_s, frozen)


REFERENCE = "reference"  # a preference objective's frozen reference (jaxllm/train/preference.py)


def _reference_from_policy(m, params, param_dtype: str | None):
    """The bench's reference policy: a copy of the policy's (random) initial parameters, in the reference's
    dtype (`preference.reference_dtype`, else the policy's). In training the reference is the starting
    model (train.init_from) as well, so a first step sees the reference equal to the policy (DPO's loss: ln 2)."""
    from jaxllm.train.frozen import FrozenModel

    cfg = dataclasses.replace(m, param_dtype=param_dtype) if param_dtype else m
    dtype = jnp.dtype(cfg.param_dtype)

    def copied(a):  # a copy in its own buffers, where the policy's are: the train step donates the policy's
        a = a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return jax.device_put(a, a.sharding, may_alias=False)

    copy = jax.tree.map(copied, params)
    return FrozenModel(copy, models.model_spec(cfg)[0], cfg)


def _prepared(objective, cfg: Config) -> Config:
    """`cfg` after the objective's startup checks that need the tokenizer (`Objective.prepare`, e.g. a
    teacher's tokenizer and the ids it compares), as the Trainer runs them; objectives without any (and
    builds whose Objective has no such hook) never load the tokenizer."""
    prepare = getattr(objective, "prepare", None)
    default = {f.name: f.default for f in dataclasses.fields(objective)}.get("prepare")
    if prepare is None or prepare is default:
        return cfg
    from jaxllm.data.tokenizer import load_tokenizer

    return prepare(cfg, load_tokenizer(cfg.tokenizer.path or "builtin:kjv-sp4k"))


def step_flops_per_token(s: Setup, causal: bool = False) -> float:
    """Model FLOPs of one trained token: the trained model's forward and backward (`flops_per_token`) plus a
    forward of each frozen model (a teacher, a reference): a third of its `flops_per_token`, 2 N + 4 L d T."""
    seq = s.cfg.data.seq_len
    return flops_per_token(s.cfg.model, seq, causal=causal) + sum(
        flops_per_token(f.cfg, seq, causal=causal) / 3 for f in s.frozen.values())


def bench_train(s: Setup, warmup: int = 3, steps: int = 10) -> dict[str, Any]:
    """Train-step throughput of the setup's config (random init, synthetic batches) on all devices."""
    cfg, m = s.cfg, s.cfg.model
    losses = []  # each step's loss, left on the device until the end

    def run():
        metrics = s.run_step()
        losses.append(metrics["loss"])
        return metrics

    times = timed(run, warmup, steps)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    out = summary(times, tokens)
    devices = s.mesh.devices.flatten()
    peak, peak_source = device_peak_flops(devices[0])
    fpt, fpt_causal = step_flops_per_token(s), step_flops_per_token(s, causal=True)
    achieved = out["tokens_per_sec"] / (peak * len(devices))
    mask = s.batch.get("loss_mask", s.batch.get("decoder_loss_mask"))
    out.update(
        objective=cfg.data.objective.name, compile_s=s.compile_s, devices=len(devices),
        device_kind=devices[0].device_kind, tokens_per_step=tokens,
        loss_tokens_per_step=None if mask is None else int(jnp.sum(mask)),
        tokens_per_sec_per_device=out["tokens_per_sec"] / len(devices), flops_per_token=fpt,
        flops_per_token_causal=fpt_causal, peak_flops_per_device=peak, peak_source=peak_source,
        mfu=fpt * achieved, mfu_causal=fpt_causal * achieved,
        params={**models.param_counts(m), "matmul": matmul_params(m)},
        frozen_params={name: models.param_counts(f.cfg)["total"] for name, f in s.frozen.items()},
        peak_memory_bytes=_peak_memory(devices[0], s.step), first_loss=float(losses[0]) if losses else None,
        final_loss=float(s.run_step()["loss"]),
    )
    return out


def bench_breakdown(s: Setup, warmup: int = 2, steps: int = 5) -> dict[str, Any]:
    """Where a decoder's train step spends its time, each part jitted with the step's shardings and
    timed alone on one micro-batch (`train.batch_size / train.grad_accum` rows):

    forward (the loss), backward (gradients minus forward), the loss head alone (output projection
    + cross-entropy, forward and backward, chunked as configured), and the optimizer update. The
    parts run as separate programs, so they do not overlap as they do inside the step; `other` is
    what the whole step takes beyond them (negative when fusion across parts saves time)."""
    import optax

    from jaxllm.train.losses import chunked_cross_entropy, loss_mask, normalizers, pretraining_loss

    m, t = s.cfg.model, s.cfg.train
    if m.arch != "decoder" or m.lora is not None:
        raise ValueError("the step-time breakdown measures decoders without adapters (synthetic CLM batches)")
    graphdef, tx = s.spec.graphdef, s.spec.tx
    params = jax.tree.map(jnp.copy, s.state.params)  # the step donates the state's own
    micro = t.batch_size // t.grad_accum
    batch = {k: jax.device_put(v, s.batch_sharding)
             for k, v in synthetic_batch(m, micro, s.cfg.data.seq_len).items()}
    key = jax.random.key(0)

    def objective(p, b):
        return pretraining_loss(p, graphdef, b, normalizers(b), t.z_loss, key, t.loss_chunk)[0]

    def head(p, x_BLD, b):
        model = models.bind(graphdef, p)
        nll, zl = chunked_cross_entropy(x_BLD, model.logits, b["targets"], loss_mask(b).astype(jnp.float32),
                                        t.z_loss, t.loss_chunk)
        return (nll + zl) / normalizers(b)["tokens"]

    def update(grads, opt, p):
        updates, opt = tx.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    with sharding.activate(s.mesh, s.rules):
        hidden = jax.jit(lambda p, b: models.bind(graphdef, p).hidden(b["inputs"], b["positions"],
                                                                      b["segment_ids"])[0])(params, batch)
        grad_fn = jax.jit(jax.grad(objective), out_shardings=s.spec.shardings.params)
        grads = grad_fn(params, batch)
        opt = {"state": jax.tree.map(jnp.copy, s.state.opt_state)}  # the step donates its own
        update_fn = jax.jit(update, donate_argnums=(1,))

        def run_update():
            new_params, opt["state"] = update_fn(grads, opt["state"], params)
            return new_params

        parts = {
            "forward": functools.partial(jax.jit(objective), params, batch),
            "forward+backward": functools.partial(grad_fn, params, batch),
            "loss head (fwd+bwd)": functools.partial(jax.jit(jax.grad(head, argnums=(0, 1))), params, hidden, batch),
            "optimizer update": run_update,
        }
        times = {name: statistics.median(timed(run, warmup, steps)) for name, run in parts.items()}
        step = statistics.median(timed(s.run_step, warmup, steps))
    accum = t.grad_accum
    seconds = {
        "forward": accum * times["forward"],
        "backward": accum * (times["forward+backward"] - times["forward"]),
        "loss head, fwd+bwd (inside the two above)": accum * times["loss head (fwd+bwd)"],
        "optimizer update": times["optimizer update"],
    }
    seconds["other"] = step - seconds["forward"] - seconds["backward"] - seconds["optimizer update"]
    return {"step_s": step, "micro_batches": accum, "micro_batch_rows": micro, "seconds": seconds,
            "share": {k: v / step for k, v in seconds.items()}}


def profile_steps(s: Setup, directory: str | Path, steps: int = 3) -> Path:
    """A `jax.profiler` trace of `steps` train steps of the (compiled) setup in `directory`, after one
    warm-up step: open it with TensorBoard's profile plugin, or the .trace.json.gz in Perfetto."""
    jax.block_until_ready(s.run_step())
    directory = Path(directory)
    with jax.profiler.trace(str(directory)):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                jax.block_until_ready(s.run_step())
    return directory


def format_breakdown(result: dict[str, Any]) -> str:
    lines = [f"step {1e3 * result['step_s']:.1f} ms ({result['micro_batches']} micro-batch(es) of "
             f"{result['micro_batch_rows']} rows), parts timed alone:"]
    for name, sec in result["seconds"].items():
        lines.append(f"  {name:<42} {1e3 * sec:9.1f} ms  {100 * result['share'][name]:6.1f}%")
    return "\n".join(lines)


def _peak_memory(device: jax.Device, compiled) -> dict[str, Any]:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_bytes_in_use": stats["peak_bytes_in_use"], "source": "device allocator"}
    mem = compiled.memory_analysis()
    if mem is None:
        return {"source": "unavailable"}
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return {"peak_bytes_in_use": int(total), "temp_bytes": int(mem.temp_size_in_bytes),
            "source": "compiled memory analysis (arguments + outputs + temporaries - donated)"}


def bench_data(cfg: Config, batches: int = 50) -> dict[str, Any]:
    """Tokens/s the data pipeline alone produces (tokenize, pack, shuffle, batch) on this host."""
    from jaxllm.data.pipeline import make_pipeline
    from jaxllm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer.path or "builtin:kjv-sp4k")
    pipeline = make_pipeline(cfg.data, tokenizer, cfg.train.batch_size)
    try:
        next(pipeline)
        t = time.perf_counter()
        for _ in range(batches):
            next(pipeline)
        elapsed = time.perf_counter() - t
    finally:
        pipeline.close()
    return {"tokens_per_sec": batches * cfg.train.batch_size * cfg.data.seq_len / elapsed, "batches": batches}


def bench_generate(cfg: Config, batch: int = 1, prompt_len: int = 128, new_tokens: int = 64) -> dict[str, Any]:
    """Prefill tokens/s and decode tokens/s of KV-cache generation (greedy, random init)."""
    from jaxllm.config import GenerateConfig
    from jaxllm.infer.generate import generate

    m = cfg.model
    mesh = sharding.make_mesh(dataclasses.replace(cfg.mesh, data=1, fsdp=-1, tensor=1))
    graphdef, params, _ = models.init_params(m, mesh, sharding.make_rules(), seed=0)
    prompts = np.random.default_rng(0).integers(0, m.vocab_size, (batch, prompt_len)).tolist()

    def run(n):
        gen = GenerateConfig(max_new_tokens=n, temperature=0.0)
        return generate(graphdef, params, m, prompts, gen, eos_id=None, pad_id=0)

    prefill = statistics.median(timed(lambda: run(1), 1, 3))
    full = statistics.median(timed(lambda: run(new_tokens), 1, 3))
    return {"prefill_tokens_per_sec": batch * prompt_len / prefill,
            "decode_tokens_per_sec": batch * (new_tokens - 1) / max(full - prefill, 1e-9),
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}


def write_report(results: dict[str, Any], path: str | Path | None) -> None:
    if path:
        atomic_write_text(path, json.dumps(results, indent=2, default=float))


def format_table(results: dict[str, Any]) -> str:
    """One row per train-step measurement. MFU in both conventions (docs/performance.md): PaLM's full
    T x T attention, and causal attention halved (MaxText, torchtitan). The last column is how many
    times faster than the row jaxllm is (jaxllm's tokens/s divided by the row's): the "jaxllm" row's, or
    that of the jaxllm row a peer's `compare_to` names (named beside the ratio)."""
    rows = [("what", "tokens/s", "step ms (p50/p90)", "MFU PaLM / causal", "peak memory", "jaxllm is x faster")]
    for name, r in results.items():
        if not isinstance(r, dict) or "step_time_median" not in r:
            continue
        mem = r.get("peak_memory_bytes", {}).get("peak_bytes_in_use")
        ours = results.get(r.get("compare_to", "jaxllm"), {})
        speedup = ours.get("tokens_per_sec", float("nan")) / r["tokens_per_sec"]
        ratio = f"{speedup:.2f}x" + (f" ({r['compare_to']})" if "compare_to" in r else "")
        rows.append((
            name, f"{r['tokens_per_sec']:,.0f}",
            f"{1e3 * r['step_time_median']:.1f}/{1e3 * r['step_time_p90']:.1f}",
            f"{100 * r['mfu']:.1f}% / {100 * r['mfu_causal']:.1f}%" if "mfu" in r else "-",
            f"{mem / 2**30:.2f} GiB" if mem else "-",
            ratio if not name.startswith("jaxllm") else "-",
        ))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows)

