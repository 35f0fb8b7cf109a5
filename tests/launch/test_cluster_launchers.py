"""The Slurm and TPU-pod launchers: arguments, and the commands they would run (dry runs; no cluster here)."""

import os
import shlex
import subprocess
from pathlib import Path

LAUNCH = Path(__file__).parents[2] / "launch"


def _run(script, args, **env):
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(["bash", str(LAUNCH / script), *args], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def test_slurm_one_process_per_node():
    proc = _run("slurm_gpu.sbatch", ["configs/llama3-8b.yaml", "run_dir=/shared/runs/a b"],
                SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1",
                                        "--kill-on-bad-exit=1", "--label", "jaxllm", "train",
                                        "configs/llama3-8b.yaml", "run_dir=/shared/runs/a b"]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in proc.stderr


def test_slurm_one_process_per_gpu_binds_each_task_to_its_gpu():
    proc = _run("slurm_gpu.sbatch", ["c.yaml"], SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2",
                SLURM_GPUS_ON_NODE="h100:8", PROCS_PER_NODE="8", DRY_RUN="1", JAXLLM_VENV="/opt/venv")
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:6] == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--gpus-per-task=1",
                        "--gpu-bind=single:1"]
    assert "source '/opt/venv/bin/activate'" in argv[10] and argv[-3:] == ["jaxllm", "train", "c.yaml"]


def test_slurm_refuses_outside_an_allocation_and_bad_process_counts():
    proc = _run("slurm_gpu.sbatch", ["c.yaml"])
    assert proc.returncode == 2 and "not inside a Slurm allocation" in proc.stderr
    proc = _run("slurm_gpu.sbatch", ["c.yaml"], SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2",
                SLURM_GPUS_ON_NODE="8", PROCS_PER_NODE="3")
    assert proc.returncode == 2 and "PROCS_PER_NODE=3 must be 1" in proc.stderr
    assert _run("slurm_gpu.sbatch", []).returncode == 2


def test_tpu_pod_creates_copies_installs_and_runs_on_every_worker():
    proc = _run("tpu_pod.sh", ["--name", "pod", "--zone", "us-east5-a", "--project", "proj", "--accelerator",
                               "v5e-16", "--create", "--dry-run", "--", "jaxllm", "train", "configs/llama3-8b.yaml",
                               "mesh.fsdp=-1"])
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert lines[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
    assert "--accelerator-type=v5litepod-16" in lines[0] and "--version=v2-alpha-tpuv5-lite" in lines[0]
    assert lines[1][:2] == ["git", "-C"] and "archive" in lines[1]
    assert lines[2][4] == "scp" and "--worker=all" in lines[2] and "--project=proj" in lines[2]
    assert lines[3][4] == "ssh" and "pip install -q -e '.[tpu]'" in lines[3][-1]
    assert lines[4][4] == "ssh" and "--worker=all" in lines[4]
    assert lines[4][-1].endswith("jaxllm train configs/llama3-8b.yaml mesh.fsdp=-1 ")


def test_tpu_pod_reuse_without_install_and_argument_errors():
    proc = _run("tpu_pod.sh", ["--name", "pod", "--zone", "z", "--skip-install", "--dry-run", "--", "jaxllm", "x"])
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1
    assert _run("tpu_pod.sh", ["--zone", "z", "--", "jaxllm"]).returncode == 2
    bad = _run("tpu_pod.sh", ["--name", "p", "--zone", "z", "--accelerator", "v9-8", "--", "jaxllm"])
    assert bad.returncode == 2 and "unknown accelerator v9-8" in bad.stderr


def test_slurm_xla_flags_are_known_to_this_xla():
    # XLA aborts on an unknown flag; the GPU flags are parsed by every build, so a CPU run checks them.
    import sys

    proc = _run("slurm_gpu.sbatch", ["c.yaml"], SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1", DRY_RUN="1")
    flags = proc.stderr.split("XLA_FLAGS=", 1)[1].strip()
    check = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2).block_until_ready()"],
                           env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"},
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]
