"""Ahead-of-time planning for TPU topologies we do not have: compile the real train step with libtpu's
compile-only devices, read the memory per chip, and estimate step time and MFU (`jaxllm plan`)."""

from __future__ import annotations

from jaxllm import models
from jaxllm.plan.chips import CHIPS, GiB, Topology, parse_topology, topology_devices
from jaxllm.plan.compile import CompiledStep, apply_layout, compile_step, layout_of
from jaxllm.plan.estimate import Estimate, Layout, estimate, flops_per_token, matmul_params
from jaxllm.plan.search import HEADROOM, Candidate, Plan, best, best_config, layouts, plan

__all__ = [
    "CHIPS", "Topology", "parse_topology", "topology_devices", "CompiledStep", "apply_layout", "compile_step",
    "layout_of", "Estimate", "Layout", "estimate", "flops_per_token", "matmul_params", "Candidate", "Plan", "best", "best_config",
    "layouts", "plan", "format_plan", "HEADROOM",
]


def format_plan(p: Plan, rows: int = 10) -> str:
    """The plan as a person reads it: model, topology, then one line per layout (compiled ones first)."""
    cfg, topo, chip = p.config, p.topology, p.topology.chip
    total = models.param_counts(cfg.model)["total"]
    tokens = cfg.train.batch_size * cfg.data.seq_len
    lines = [
        f"model: {total / 1e9:.2f}B parameters; batch {cfg.train.batch_size} x {cfg.data.seq_len} = "
        f"{tokens:,} tokens per step",
        f"topology: {topo.describe()}; {topo.chips} chips x {chip.hbm_bytes / GiB:.0f} GiB HBM, "
        f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 peak each",
        f"layouts ranked: {p.searched}; compiled: {sum(c.fits(chip.hbm_bytes) is not None or c.error is not None for c in p.candidates)}",
        "",
        f"{'layout':<56} {'fits':>5} {'GiB/chip':>8} {'args':>6} {'temp':>6} {'est.GiB':>7} "
        f"{'TFLOP/step':>10} {'step s>=':>8} {'MFU<=':>5}",
    ]
    for c in p.candidates[:rows]:
        e = c.estimate
        if c.compiled is not None:
            m = c.compiled
            fits = "yes" if c.fits(chip.hbm_bytes) else "NO"
            mem = f"{m.peak_bytes / GiB:8.1f} {m.argument_bytes / GiB:6.1f} {m.temp_bytes / GiB:6.1f}"
        elif c.oom_bytes is not None:
            fits, mem = "NO", f"{'>' + format(c.oom_bytes / GiB, '.1f'):>8} {'-':>6} {'>' + format(c.oom_bytes / GiB, '.0f'):>6}"
        elif c.error is not None:
            fits, mem = "error", f"{'-':>8} {'-':>6} {'-':>6}"
        else:
            fits, mem = "?", f"{'-':>8} {'-':>6} {'-':>6}"
        lines.append(
            f"{c.layout.describe():<56} {fits:>5} {mem} {e.memory_bytes / GiB:7.1f} "
            f"{e.model_flops / 1e12:10.1f} {e.step_seconds:8.3f} {e.mfu:5.0%}"
        )
        if c.error is not None:
            lines.append(f"    compile error: {c.error}")
    chosen = best(p)
    held = max((c.compiled.held_bytes for c in p.candidates if c.compiled is not None), default=0)
    if held:
        lines.append(f"GiB/chip includes {held / GiB:.2f} GiB of frozen models held beside the step (online RL's "
                     "reference, read by the scoring pass before the updates)")
    lines.append("")
    if chosen is None:
        lines.append(f"no compiled layout fits in {chip.hbm_bytes / GiB:.0f} GiB per chip (keeping {HEADROOM:.0%} free); "
                     "try --search, a smaller "
                     "train.batch_size or data.seq_len, more chips, or remat: full")
    else:
        lay = chosen.layout
        lines.append(
            f"chosen: {lay.describe()}: {chosen.compiled.peak_bytes / GiB:.1f} of {chip.hbm_bytes / GiB:.0f} GiB "
            f"per chip; at best {chosen.estimate.step_seconds:.2f} s/step, MFU {chosen.estimate.mfu:.0%}"
        )
        dcn = f" mesh.dcn_data={lay.slices}" if lay.slices > 1 else ""
        dcn += f" mesh.expert={lay.expert}" if lay.expert > 1 else ""
        lines.append(f"  as overrides: mesh.data={lay.data} mesh.fsdp={lay.fsdp} mesh.tensor={lay.tensor}{dcn} "
                     f"model.remat={lay.remat} train.grad_accum={lay.grad_accum}")
    lines.append(f"GiB/chip, args, temp: the TPU compiler's buffer assignment (fits: {HEADROOM:.0%} of HBM left "
                 "free); est.GiB, step s, MFU: the analytical model at peak FLOP/s with perfect overlap, a bound "
                 "(docs/plans.md)")
    return "\n".join(lines)
