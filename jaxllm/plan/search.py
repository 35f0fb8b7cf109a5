"""`jaxllm plan`: the config's own layout, or a search over layouts, on a TPU topology.

Search: every mesh factorisation data x fsdp x tensor of a slice (tensor up to 8 and dividing the
heads), every remat policy and every micro-batch count that divides the batch over the
data-parallel chips is ranked by the analytical estimate (`plan.estimate`); those predicted to fit
are compiled best-first until `top` of them really fit (or `max_compiles` compiles are spent).
Each compile calibrates the memory model: later layouts with the same remat policy are predicted
with the ratio of the compiler's bytes to the estimate's.
The compiler's memory decides "fits" (with HEADROOM of the HBM left free); the estimate's step
time orders the plans.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Callable

from jaxllm.config import Config, ConfigError
from jaxllm.plan.chips import GiB, Topology, topology_devices
from jaxllm.plan.compile import CompiledStep, apply_layout, compile_step, layout_of
from jaxllm.plan.estimate import Estimate, Layout, estimate

log = logging.getLogger("jaxllm")

REMAT_POLICIES = ("none", "dots_with_no_batch_dims", "dots", "full")
MAX_TENSOR = 8  # beyond one host's chips, tensor parallelism's all-reduces swamp the step
MAX_ACCUM = 64
# Kept free on each chip: the runtime's own buffers, fragmentation, and the estimate's optimism.
HEADROOM = 0.05


@dataclasses.dataclass
class Candidate:
    layout: Layout
    estimate: Estimate
    compiled: CompiledStep | None = None
    error: str | None = None
    oom_bytes: int | None = None  # the compiler gave up: its temporaries alone need this much

    def fits(self, hbm_bytes: int) -> bool | None:
        """Whether the compiled step leaves HEADROOM of the chip's HBM free (None: not compiled)."""
        if self.oom_bytes is not None:
            return False
        return None if self.compiled is None else self.compiled.peak_bytes <= usable(hbm_bytes)


def usable(hbm_bytes: int) -> float:
    return (1 - HEADROOM) * hbm_bytes


@dataclasses.dataclass
class Plan:
    config: Config
    topology: Topology
    candidates: list[Candidate]  # compiled first, best first; then estimated only
    searched: int  # layouts ranked


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def layouts(cfg: Config, topology: Topology) -> list[Layout]:
    """Every layout of `cfg`'s batch on `topology` worth estimating: data x fsdp x tensor (x expert
    for a mixture of experts) per slice, each remat policy and micro-batch count."""
    m, batch, n = cfg.model, cfg.train.batch_size, topology.chips_per_slice
    expert_sizes = [e for e in _divisors(n) if m.moe is not None and m.moe.num_experts % e == 0] or [1]
    out = []
    for expert in expert_sizes:
        for tensor in _divisors(n // expert):
            if tensor > MAX_TENSOR or m.num_heads % tensor or m.mlp_dim % tensor:
                continue
            if m.kv_heads % tensor and tensor % m.kv_heads:
                continue
            for fsdp in _divisors(n // expert // tensor):
                data = n // expert // tensor // fsdp
                dp = data * fsdp * expert * topology.slices
                for accum in _divisors(batch):
                    if accum > MAX_ACCUM or (batch // accum) % dp:
                        continue
                    out += [Layout(data, fsdp, tensor, remat, accum, topology.slices, expert)
                            for remat in REMAT_POLICIES]
    return out


def plan(
    cfg: Config,
    topology: Topology,
    search: bool = False,
    top: int = 3,
    max_compiles: int = 6,
    progress: Callable[[str], None] = log.info,
) -> Plan:
    """Compiles the config's layout (or searches, see the module docstring) on `topology`."""
    batch, seq_len, chip = cfg.train.batch_size, cfg.data.seq_len, topology.chip
    if search:
        pool = layouts(cfg, topology)
        if not pool:
            raise ConfigError(
                f"no layout of train.batch_size={batch} divides over {topology.chips} chips; "
                f"use a batch size that is a multiple of {topology.chips}"
            )
    else:
        pool = [layout_of(cfg, topology)]
    ranked = sorted((Candidate(layout, estimate(cfg.model, layout, chip, batch, seq_len, cfg.train.loss_chunk))
                     for layout in pool), key=_rank)
    devices = topology_devices(topology)
    compiled: list[Candidate] = []
    # The compiler corrects the memory model as the search goes: each compile (or out-of-memory
    # failure) of a remat policy rescales the estimates of the other layouts with that policy.
    calibration: dict[str, float] = {}

    def predicted(c: Candidate) -> float:
        return c.estimate.memory_bytes * calibration.get(c.layout.remat, 1.0)

    pending = list(ranked)
    while pending and len(compiled) < max_compiles and sum(bool(c.fits(chip.hbm_bytes)) for c in compiled) < top:
        # Most layouts need far more memory than a chip has; compile only those predicted to fit.
        candidate = next((c for c in pending if predicted(c) <= usable(chip.hbm_bytes)), None) if search else pending[0]
        if candidate is None:
            if compiled:
                break
            candidate = pending[0]  # nothing is predicted to fit: compile the best to say by how much
        pending.remove(candidate)
        progress(f"compiling {candidate.layout.describe()} for {topology.describe()} ...")
        try:
            candidate.compiled = compile_step(cfg, candidate.layout, devices)
        except ConfigError as e:
            candidate.error = str(e)
        except Exception as e:  # the TPU compiler's own errors: out of memory, or a real failure
            message = (str(e).strip().splitlines() or [type(e).__name__])[0]
            needed = re.search(r"temporaries \(([\d.]+)G\)", message)
            if "RESOURCE_EXHAUSTED" in message and needed:
                candidate.oom_bytes = int(float(needed.group(1)) * GiB)
            else:
                candidate.error = message[:300]
        compiled.append(candidate)
        remat, estimated = candidate.layout.remat, candidate.estimate.memory_bytes
        if candidate.oom_bytes is not None:
            progress(f"  does not fit: temporaries alone need {candidate.oom_bytes / GiB:.1f} GiB per chip")
            # a lower bound on what it needs: never lowers the correction
            calibration[remat] = max(calibration.get(remat, 1.0), candidate.oom_bytes / estimated)
        if candidate.compiled is not None:
            progress(f"  {candidate.compiled.peak_bytes / GiB:.1f} GiB per chip, compiled in "
                     f"{candidate.compiled.compile_seconds:.0f} s")
            calibration[remat] = candidate.compiled.peak_bytes / estimated
    compiled.sort(key=lambda c: (not c.fits(chip.hbm_bytes), _rank(c)))
    rest = [c for c in ranked if c not in compiled and predicted(c) <= usable(chip.hbm_bytes)]
    return Plan(cfg, topology, compiled + rest, len(pool))


def _rank(c: Candidate) -> tuple[int, float]:
    # Step times within 1% of each other are a tie (the model is not that precise): the layout that
    # leaves more memory free goes first.
    return round(math.log(c.estimate.step_seconds) / math.log(1.01)), c.estimate.memory_bytes


def best(p: Plan) -> Candidate | None:
    """The fastest layout that compiled and fits, if any."""
    hbm = p.topology.chip.hbm_bytes
    return next((c for c in p.candidates if c.fits(hbm)), None)


def best_config(p: Plan) -> Config | None:
    chosen = best(p)
    return None if chosen is None else apply_layout(p.config, chosen.layout)
