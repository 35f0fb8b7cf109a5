"""Several processes as one run: two local processes x 4 CPU devices train, checkpoint and resume, and log
the same losses as one process with 8 devices fed the same global batches."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from jaxllm.data.pipeline import make_pipeline
from jaxllm.train.checkpoint import find_checkpoint
from jaxllm.train.loop import Trainer
from jaxllm.train.metrics import read_metrics
from tests.train.test_loop import MICRO, micro_config

ROOT = Path(__file__).parents[1]
# A constant learning rate: a run of 4 steps resumed to 6 then equals 6 straight steps.
SETTINGS = [*MICRO, "optim.schedule=constant", "checkpoint.every=3", "train.log_every=1"]


def _launch(run_dir, steps, *extra):
    cmd = [sys.executable, str(ROOT / "launch" / "multihost_local.py"), "--num-processes", "2",
           "--devices-per-process", "4", "--timeout", "400", "--",
           sys.executable, "-m", "jaxllm.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *SETTINGS,
           f"train.steps={steps}", f"run_dir={run_dir}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=450, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


class _TwoShards:
    """The data of processes 0 and 1 of 2, read in one process and stacked: the same global batches."""

    def __init__(self, cfg, tokenizer):
        half = cfg.train.batch_size // 2
        self.parts = [make_pipeline(cfg.data, tokenizer, half, i, 2) for i in range(2)]

    def __next__(self):
        local = [next(p) for p in self.parts]
        # No two processes see the same example: their rows differ.
        assert not any((a == b).all() for a in local[0]["inputs"] for b in local[1]["inputs"])
        return {k: np.concatenate([part[k] for part in local]) for k in local[0]}

    def get_state(self):
        return [p.get_state() for p in self.parts]

    def close(self):
        for p in self.parts:
            p.close()


def test_two_processes_train_checkpoint_resume_like_one(tmp_path):
    run_dir = tmp_path / "two"
    # eval.batches=0: the whole held-out set, whose shares differ in length between the processes.
    out = _launch(run_dir, 4, "eval.batches=0", "eval.every=0",
                  "train.sample_tokens=4")
    assert out.count("sample> And God said") == 1, out  # the end-of-training sample, printed by process 0 only
    assert "[p1] jaxllm: joined" not in out and "[p0] jaxllm: joined 2 processes" in out
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4]
    assert len(list((run_dir / "checkpoints" / "4" / "data").glob("process_*-of-2.iterator.json"))) == 2
    _launch(run_dir, 6, "train.sample_prompt=null")  # resumes at step 4 with each process's data position

    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(rows[3]["eval_loss"]) and np.isfinite(rows[5]["eval_loss"])  # at the end of each run

    reference = Trainer(micro_config(tmp_path / "one", "optim.schedule=constant", "train.steps=6"))
    try:
        assert jax.process_count() == 1 and jax.device_count() == 8
        reference.data.close()
        reference.data = _TwoShards(reference.cfg, reference.tokenizer)
        summary = reference.run()
        expected = jax.tree.map(np.asarray, reference.state.params)
    finally:
        reference.close()
    for row in rows:
        np.testing.assert_allclose(row["loss"], summary["losses"][row["step"]], rtol=2e-5)

    _, step = find_checkpoint(run_dir)
    assert step == 6
    from jaxllm.infer.load import load_model

    params = jax.tree.map(np.asarray, load_model(run_dir).params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, expected)


def test_a_dead_process_stops_the_others_and_the_restart_resumes(tmp_path):
    """Process 1 is SIGKILLed mid-run: process 0 must not hang in a collective. JAX's coordination
    service misses process 1's heartbeats (distributed.heartbeat_timeout_s) and stops process 0 with
    "another task died"; the same command then resumes from the last checkpoint."""
    import os
    import re
    import signal
    import socket
    import time

    run_dir = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, "-m", "jaxllm.cli", "train", str(ROOT / "configs" / "tiny.yaml"), *SETTINGS,
            "train.steps=400", f"run_dir={run_dir}", "checkpoint.every=2", "distributed.heartbeat_timeout_s=10"]
    procs = []
    for i in range(2):
        env = dict(os.environ, JAXLLM_COORDINATOR=f"127.0.0.1:{port}", JAXLLM_NUM_PROCESSES="2",
                   JAXLLM_PROCESS_ID=str(i), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
                   + " --xla_force_host_platform_device_count=4")  # the suite's other XLA flags kept
        procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert procs[0].poll() is None, procs[0].communicate()[0][-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, _ = procs[0].communicate(timeout=120)
    assert procs[0].returncode != 0 and time.time() - killed_at < 60
    assert "another task died" in out and "stopped sending heartbeats" in out, out[-3000:]
    stopped = max(r["step"] for r in read_metrics(run_dir))
    assert 5 <= stopped < 400
    target = stopped + 4  # a constant learning rate: a shorter run is the same run, stopped earlier
    out = _launch(run_dir, target)  # the same run, resumed on two processes
    assert "[p0] jaxllm: resumed from" in out, out[-3000:]
    assert max(r["step"] for r in read_metrics(run_dir)) == target
