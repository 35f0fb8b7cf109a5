"""The local multi-process launcher: its arguments and the environment each process gets (dry run)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "launch" / "multihost_local.py"
spec = importlib.util.spec_from_file_location("multihost_local", SCRIPT)
launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launcher)


def test_each_process_gets_coordinator_rank_and_fake_devices():
    env = launcher.process_env({"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "HOME": "/h"},
                               index=1, count=2, port=4321, devices=4)
    assert env["JAXLLM_COORDINATOR"] == "127.0.0.1:4321"
    assert env["JAXLLM_NUM_PROCESSES"] == "2" and env["JAXLLM_PROCESS_ID"] == "1"
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert env["JAX_PLATFORMS"] == "cpu" and env["HOME"] == "/h"


def test_dry_run_prints_one_command_per_process():
    proc = subprocess.run([sys.executable, str(SCRIPT), "-n", "3", "-d", "2", "--port", "5000", "--dry-run", "--",
                           "jaxllm", "train", "configs/tiny.yaml", "run_dir=runs/x y"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3
    for i, line in enumerate(lines):
        assert f"JAXLLM_PROCESS_ID={i} " in line and "JAXLLM_COORDINATOR=127.0.0.1:5000" in line
        assert line.endswith("jaxllm train configs/tiny.yaml 'run_dir=runs/x y'")


def test_a_failing_process_stops_the_run_with_its_status():
    code = launcher.main(["-n", "2", "--", sys.executable, "-c",
                          "import os, sys, time; sys.exit(3) if os.environ['JAXLLM_PROCESS_ID'] == '1' else time.sleep(60)"])
    assert code == 3


def test_a_command_is_required():
    with pytest.raises(SystemExit):
        launcher.parse_args(["-n", "2"])
