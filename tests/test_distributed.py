"""How a process decides to join a multi-process run (no processes are started here)."""

import pytest

from jaxllm.config import ConfigError, DistributedConfig
from jaxllm.distributed import resolve


def test_single_process_does_nothing():
    assert resolve(DistributedConfig(), {}) is None
    assert resolve(DistributedConfig(mode="off"), {"JAXLLM_COORDINATOR": "h:1"}) is None
    env = {"JAXLLM_COORDINATOR": "h:1", "JAXLLM_NUM_PROCESSES": "1", "JAXLLM_PROCESS_ID": "0"}
    assert resolve(DistributedConfig(), env) is None


def test_explicit_coordinator_from_config_or_environment():
    env = {"JAXLLM_COORDINATOR": "10.0.0.2:1234", "JAXLLM_NUM_PROCESSES": "4", "JAXLLM_PROCESS_ID": "3"}
    setup = resolve(DistributedConfig(timeout_s=60, heartbeat_timeout_s=30), env)
    assert setup.source == "coordinator"
    assert setup.kwargs == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3,
                            "initialization_timeout": 60, "heartbeat_timeout_seconds": 30}
    cfg = DistributedConfig(coordinator="127.0.0.1:9", num_processes=2, process_id=1)
    assert resolve(cfg, {}).kwargs["process_id"] == 1


@pytest.mark.parametrize(
    "cfg, env, message",
    [
        (DistributedConfig(coordinator="h:1"), {}, "needs distributed.coordinator"),
        (DistributedConfig(coordinator="nohost", num_processes=2, process_id=0), {}, "must be host:port"),
        (DistributedConfig(coordinator="h:1", num_processes=2, process_id=2), {}, r"must be in \[0, num_processes=2\)"),
        (DistributedConfig(coordinator="h:1", process_id=0), {"JAXLLM_NUM_PROCESSES": "two"}, "whole number"),
        (DistributedConfig(mode="slurm"), {}, "not started by srun"),
    ],
)
def test_mistakes_are_errors_that_name_the_fix(cfg, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve(cfg, env)


def test_slurm_step_with_several_tasks_lets_jax_read_slurm():
    env = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}
    setup = resolve(DistributedConfig(), env)
    assert setup.source == "slurm" and setup.kwargs["cluster_detection_method"] == "slurm"
    assert resolve(DistributedConfig(), {**env, "SLURM_NTASKS": "1"}) is None


def test_tpu_pod_from_gke_worker_list():
    assert resolve(DistributedConfig(), {"TPU_WORKER_HOSTNAMES": "a,b,c,d"}).source == "tpu"
    assert resolve(DistributedConfig(), {"TPU_WORKER_HOSTNAMES": "a"}) is None
