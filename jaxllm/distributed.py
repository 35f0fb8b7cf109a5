"""Multi-host initialisation: every process runs the same program and joins one JAX runtime.

`initialize(cfg.distributed)` must run before anything touches a JAX device. It finds the other
processes in one of three ways (first match wins in `mode: auto`):

- an explicit coordinator: `distributed.coordinator=host:port` with `num_processes` and
  `process_id`, or the environment variables JAXLLM_COORDINATOR, JAXLLM_NUM_PROCESSES,
  JAXLLM_PROCESS_ID (set per process by `launch/multihost_local.py`);
- Slurm: inside an `srun` step with several tasks (JAX reads SLURM_STEP_NODELIST, SLURM_NTASKS,
  SLURM_PROCID and SLURM_LOCALID);
- a TPU pod slice: on a TPU VM (or a GKE TPU pod), where JAX reads the workers from the TPU
  metadata / TPU_WORKER_HOSTNAMES.

A single process (no coordinator, no multi-task Slurm step, no TPU) does nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

from jaxllm.config import ConfigError, DistributedConfig, JaxllmError
from jaxllm.platforms import on_tpu_vm

log = logging.getLogger("jaxllm")

ENV_COORDINATOR = "JAXLLM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLLM_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Setup:
    """How this process joins: `source` (coordinator, slurm or tpu) and the arguments for
    `jax.distributed.initialize` (empty ones let JAX detect the cluster itself)."""

    source: str
    kwargs: dict[str, Any]


def resolve(cfg: DistributedConfig, environ: Mapping[str, str] | None = None) -> Setup | None:
    """Decides how to join, from the config and the environment; None for a single process.

    Pure (reads only `environ`, default `os.environ`, and which TPU device files exist), so
    launchers and tests can check it without starting anything.
    """
    env = os.environ if environ is None else environ
    if cfg.mode == "off":
        return None
    timeout = {"initialization_timeout": cfg.timeout_s, "heartbeat_timeout_seconds": cfg.heartbeat_timeout_s}
    coordinator = cfg.coordinator or env.get(ENV_COORDINATOR)
    if cfg.mode == "coordinator" or (cfg.mode == "auto" and coordinator):
        return _explicit(cfg, env, coordinator, timeout)
    in_srun = "SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env
    if cfg.mode == "slurm" or (cfg.mode == "auto" and in_srun):
        if not in_srun:
            raise ConfigError(
                "distributed.mode=slurm, but this process was not started by srun (no SLURM_JOB_ID / "
                "SLURM_STEP_NODELIST); launch it with srun (see launch/slurm_gpu.sbatch) or use mode=auto"
            )
        if int(env.get("SLURM_NTASKS", "1")) == 1:
            return None
        return Setup("slurm", {"cluster_detection_method": "slurm", **timeout})
    if cfg.mode == "tpu" or (cfg.mode == "auto" and on_tpu_vm(env)):
        hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
        if len(hosts) == 1:
            return None
        return Setup("tpu", dict(timeout))
    return None


def _explicit(cfg: DistributedConfig, env: Mapping[str, str], coordinator: str | None, timeout: dict) -> Setup | None:
    num = _number(cfg.num_processes, env, ENV_NUM_PROCESSES, "num_processes")
    pid = _number(cfg.process_id, env, ENV_PROCESS_ID, "process_id")
    if not coordinator or num is None or pid is None:
        raise ConfigError(
            "an explicit multi-process run needs distributed.coordinator (host:port of process 0), "
            "distributed.num_processes and distributed.process_id (or JAXLLM_COORDINATOR, JAXLLM_NUM_PROCESSES, "
            f"JAXLLM_PROCESS_ID); got coordinator={coordinator!r}, num_processes={num}, process_id={pid}"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"distributed.coordinator={coordinator!r} must be host:port, e.g. 10.0.0.2:1234")
    if num < 1 or not 0 <= pid < num:
        raise ConfigError(f"distributed.process_id={pid} must be in [0, num_processes={num}); number processes from 0")
    if num == 1:
        return None
    return Setup("coordinator", {"coordinator_address": coordinator, "num_processes": num, "process_id": pid, **timeout})


def _number(value: int | None, env: Mapping[str, str], var: str, key: str) -> int | None:
    if value is not None:
        return value
    text = env.get(var)
    if text is None:
        return None
    if not text.strip().isdigit():
        raise ConfigError(f"environment variable {var}={text!r} must be a whole number (distributed.{key})")
    return int(text)


def initialize(cfg: DistributedConfig) -> Setup | None:
    """Joins the multi-process run described by `cfg` and the environment (see `resolve`).

    Call before any JAX device use. Processes other than 0 then log warnings only, so the console
    shows one copy of each message.
    """
    setup = resolve(cfg)
    if setup is None:
        return None
    import jax

    if not jax.distributed.is_initialized():
        # Processes of CPU devices need a collectives backend; GPU and TPU clients ignore this flag.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        try:
            jax.distributed.initialize(**setup.kwargs)
        except (RuntimeError, ValueError) as e:
            problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise JaxllmError(
                f"could not join the multi-process run ({setup.source}: {_describe(setup)}): {problem}; check that "
                "every process has the same coordinator and process count, that process 0 is running and its "
                "port is reachable, and that nothing used JAX devices before"
            ) from None
    if jax.process_index() != 0:
        log.setLevel(logging.WARNING)
    log.info("joined %d processes (%s); %d devices in all, %d here",
             jax.process_count(), setup.source, jax.device_count(), jax.local_device_count())
    return setup


def _describe(setup: Setup) -> str:
    shown = {k: v for k, v in setup.kwargs.items() if k not in ("initialization_timeout", "heartbeat_timeout_seconds")}
    return ", ".join(f"{k}={v}" for k, v in shown.items()) or "detected from the environment"
