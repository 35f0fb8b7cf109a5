#!/usr/bin/env python3
"""Runs one command as N JAX processes on this machine, joined on 127.0.0.1 (a multi-host run in miniature).

    python launch/multihost_local.py --num-processes 2 --devices-per-process 4 -- \\
        jaxllm train configs/tiny.yaml run_dir=runs/two_procs

Each process gets JAXLLM_COORDINATOR=127.0.0.1:PORT, JAXLLM_NUM_PROCESSES and JAXLLM_PROCESS_ID
(read by `jaxllm.distributed`), and `--devices-per-process` fake CPU devices (JAX_PLATFORMS=cpu,
XLA_FLAGS=--xla_force_host_platform_device_count=N), so 2 x 4 processes form one 8-device mesh.
Output lines are prefixed with [pI]. When one process fails, the others are stopped; the exit
status is the first failure's (0 when all succeed). `--dry-run` prints the commands instead.

Standard library only: it starts the processes, it does not import jax.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-processes", type=int, default=2)
    p.add_argument("-d", "--devices-per-process", type=int, default=4, help="fake CPU devices in each process")
    p.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: pick a free one)")
    p.add_argument("--timeout", type=float, default=0, help="stop all processes after this many seconds (0: never)")
    p.add_argument("--dry-run", action="store_true", help="print each process's environment and command, start nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command every process runs (after --)")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        p.error("give the command to run after --, e.g. -- jaxllm train configs/tiny.yaml")
    if args.num_processes < 1 or args.devices_per_process < 1:
        p.error("--num-processes and --devices-per-process must be >= 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: Mapping[str, str], index: int, count: int, port: int, devices: int) -> dict[str, str]:
    """The environment of process `index`: base, plus the coordinator and fake-device settings."""
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\d+", "", base.get("XLA_FLAGS", "")).split()
    env = dict(base)
    env.update(
        JAXLLM_COORDINATOR=f"127.0.0.1:{port}",
        JAXLLM_NUM_PROCESSES=str(count),
        JAXLLM_PROCESS_ID=str(index),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=" ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"]),
        PYTHONUNBUFFERED="1",
    )
    return env


CHANGED = ("JAXLLM_COORDINATOR", "JAXLLM_NUM_PROCESSES", "JAXLLM_PROCESS_ID", "JAX_PLATFORMS", "XLA_FLAGS")


def describe(env: Mapping[str, str], command: Sequence[str]) -> str:
    """One shell line: the variables this launcher sets, then the command."""
    assigned = " ".join(f"{k}={shlex.quote(env[k])}" for k in CHANGED)
    return f"{assigned} {shlex.join(command)}"


def _pump(stream, prefix: str) -> None:
    for line in stream:
        sys.stdout.write(f"{prefix}{line}")
        sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    port = args.port or free_port()
    envs = [process_env(os.environ, i, args.num_processes, port, args.devices_per_process)
            for i in range(args.num_processes)]
    if args.dry_run:
        for env in envs:
            print(describe(env, args.command))
        return 0
    procs, pumps = [], []
    for i, env in enumerate(envs):
        proc = subprocess.Popen(args.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[p{i}] "), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
    deadline = time.monotonic() + args.timeout if args.timeout else None
    status = 0
    try:
        while [p.poll() for p in procs].count(None):  # poll every process: each poll sets its returncode
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            timed_out = deadline is not None and time.monotonic() > deadline
            if failed or timed_out:
                status = failed[0] if failed else 124
                print(f"[launcher] {'a process failed' if failed else 'timeout'}: stopping the others", flush=True)
                _stop(procs)
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        _stop(procs)
        status = 130
    for pump in pumps:
        pump.join(timeout=10)
    codes = [p.wait() for p in procs]
    return status or next((c for c in codes if c != 0), 0)


def _stop(procs: list[subprocess.Popen]) -> None:
    # SIGTERM first: jaxllm saves a checkpoint and exits; then SIGKILL whatever is left.
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    end = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
