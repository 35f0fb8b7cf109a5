"""Compiling the real train step for a TPU topology on this machine, and reading its memory per chip.

The step is the one `jaxllm train` runs (`train.step.jit_train_step` with the state shardings of
`train.step.train_state_spec`), lowered on compile-only TPU devices from libtpu and compiled by the
TPU compiler: the memory figures are XLA's buffer assignment for one chip, not an estimate.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import jax

from jaxllm import models, sharding
from jaxllm.config import Config, ConfigError
from jaxllm.plan.chips import Topology
from jaxllm.plan.estimate import Layout
from jaxllm.train.frozen import FrozenModel, frozen_shardings, open_pretrained
from jaxllm.train.objective import check_trainable, step_batch_spec
from jaxllm.train.step import jit_train_step, train_state_spec


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """XLA's per-chip memory for the step (bytes) and how long compiling took."""

    argument_bytes: int  # parameters, optimizer state and batch shards held by each chip
    output_bytes: int
    alias_bytes: int  # outputs written over donated arguments (the new state over the old)
    temp_bytes: int  # activations, gradients and everything else alive during the step
    peak_bytes: int
    compile_seconds: float
    held_bytes: int = 0  # frozen models held beside the step, which does not read them (online RL's reference)


def layout_of(cfg: Config, topology: Topology) -> Layout:
    """The layout a config asks for on `topology` (mesh sizes resolved, `topology.slices` over DCN)."""
    mesh = dataclasses.replace(cfg.mesh, dcn_data=topology.slices)
    data, fsdp, tensor, expert = sharding.mesh_shape(mesh, topology.chips)
    return Layout(data // topology.slices, fsdp, tensor, cfg.model.remat, cfg.train.grad_accum, topology.slices,
                  expert)


def apply_layout(cfg: Config, layout: Layout) -> Config:
    """`cfg` with the mesh, remat policy and micro-batching of `layout`."""
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, remat=layout.remat),
        mesh=dataclasses.replace(cfg.mesh, data=layout.data, fsdp=layout.fsdp, tensor=layout.tensor,
                                 expert=layout.expert, dcn_data=layout.slices),
        train=dataclasses.replace(cfg.train, grad_accum=layout.grad_accum),
    )


def abstract_frozen(cfg: Config, mesh, rules) -> dict[str, FrozenModel]:
    """The frozen models the config's objective declares (a reference, a teacher) as arguments of the step:
    parameters as ShapeDtypeStructs on `mesh`, as the Trainer loads them (`load_frozen`), so their memory is
    counted. A model's shapes are read from its path (config only); a reference whose path is not here (a plan
    made before the run) has the policy's shapes, as train.init_from is both the start and the reference."""
    out = {}
    for name, source in check_trainable(cfg).frozen_models(cfg).items():
        if os.path.exists(source.path):
            model = open_pretrained(source.path).config
        elif name == "reference":
            model = dataclasses.replace(cfg.model, lora=None, quant=None, value_head=False)
        else:
            raise ConfigError(f"the {name} model {source.path} does not exist here: the plan reads its shapes from "
                              "it; copy or convert it first (its config is enough)")
        if source.param_dtype:
            model = dataclasses.replace(model, param_dtype=source.param_dtype)
        graphdef, target, _ = models.sharded_spec(model, mesh, rules)
        out[name] = FrozenModel(target, graphdef, model)
    return out


def compile_step(cfg: Config, layout: Layout, devices: list) -> CompiledStep:
    """Compiles the train step of `cfg` laid out as `layout` on `devices` (compile-only TPU devices)."""
    cfg = apply_layout(cfg, layout)
    objective = check_trainable(cfg)
    if objective.online is not None:  # what the objective adds to the model (ppo: the value head)
        cfg = objective.prepare(cfg, None)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    rules = sharding.make_rules(cfg.mesh.rules)
    batch = cfg.train.batch_size
    dp = sharding.data_parallel_size(mesh, rules)
    if batch % (cfg.train.grad_accum * dp):
        raise ConfigError(
            f"micro-batch of {batch // cfg.train.grad_accum} sequences does not divide over {dp} data-parallel chips; "
            f"use a train.batch_size that is a multiple of {dp * cfg.train.grad_accum}"
        )
    spec = train_state_spec(cfg, mesh, rules)
    batch_sharding = sharding.batch_sharding(mesh, rules, 2)
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
                      for k, (shape, dtype) in step_batch_spec(cfg, batch).items()}
    frozen = abstract_frozen(cfg, mesh, rules)
    # An online objective (grpo, rloo, ppo) reads its reference in the scoring pass before the updates
    # (jaxllm/rl/online.py), not in the step: the reference is held in memory beside the step, counted apart.
    held = per_chip_bytes(frozen) if objective.online is not None else 0
    if held:
        frozen = {}
    start = time.perf_counter()
    with sharding.activate(mesh, rules):
        step = jit_train_step(cfg, spec, batch_sharding, frozen_shardings(frozen))
        compiled = step.lower(spec.abstract, abstract_batch, frozen).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    args, out, alias, temp = (int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp"))
    # The state is donated: the new state reuses the old one's buffers (alias), so it is not counted twice.
    peak = (int(getattr(mem, "peak_memory_in_bytes", 0) or 0) or args + temp + out - alias) + held
    return CompiledStep(args, out, alias, temp, peak, seconds, held)


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded ShapeDtypeStructs (its shard of each array)."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))
