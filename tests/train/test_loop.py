"""End-to-end training: loss falls, 1 vs 8 devices agree, resume is exact, SIGTERM saves and exits."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.config import JaxllmError, load_config
from jaxllm.train.loop import Trainer
from jaxllm.train.metrics import read_metrics

MICRO = [
    "model.vocab_size=4096", "model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.mlp_dim=64", "model.max_seq_len=64", "model.tie_embeddings=true",
    "data.seq_len=32", "data.shuffle_window=64", "data.prefetch=2",
    "train.batch_size=8", "train.steps=20", "train.log_every=1", "train.progress_bar=false",
    "optim.lr=1e-2", "optim.warmup_steps=2", "checkpoint.every=5", "checkpoint.keep=2",
]


def micro_config(run_dir, *extra):
    return load_config(None, MICRO + [f"run_dir={run_dir}", *extra])


def _train(cfg, devices=None, stop_at_step=None):
    trainer = Trainer(cfg, devices=devices)
    try:
        summary = trainer.run(stop_at_step=stop_at_step)
        params = jax.tree.map(np.asarray, trainer.state.params)
    finally:
        trainer.close()
    return summary, params


def _assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """20 steps uninterrupted on the 8-device mesh (data-parallel); the reference for resume tests."""
    run_dir = tmp_path_factory.mktemp("straight")
    summary, params = _train(micro_config(run_dir))
    return run_dir, summary, params


def test_loss_falls_and_everything_is_logged(straight_run):
    run_dir, summary, _ = straight_run
    losses = summary["losses"]
    assert sorted(losses) == list(range(1, 21))
    assert losses[20] < losses[1] - 1.5, losses  # from ~ln(4096)=8.3 down
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("loss", "grad_norm", "lr", "step_time", "tokens_per_sec"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["lr"] == 0.0 and rows[2]["lr"] == pytest.approx(1e-2)
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [15, 20]  # keep=2
    assert (run_dir / "config.yaml").is_file()


def test_resume_after_stop_is_exact(straight_run, tmp_path):
    _, straight, straight_params = straight_run
    cfg = micro_config(tmp_path)
    first, _ = _train(cfg, stop_at_step=10)
    assert first["end_step"] == 10 and first["stopped_early"]
    second, params = _train(cfg)
    assert second["start_step"] == 10 and second["end_step"] == 20
    _assert_same_params(params, straight_params)
    logged = {r["step"]: r["loss"] for r in read_metrics(tmp_path)}
    assert logged == straight["losses"]


def test_one_device_and_eight_devices_agree(straight_run, tmp_path):
    _, straight, straight_params = straight_run
    eight_way = micro_config(tmp_path / "a", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    summary8, params8 = _train(eight_way)
    summary1, params1 = _train(micro_config(tmp_path / "b"), devices=jax.devices()[:1])
    for step in range(1, 21):
        np.testing.assert_allclose(summary8["losses"][step], summary1["losses"][step], rtol=2e-5)
        np.testing.assert_allclose(straight["losses"][step], summary1["losses"][step], rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), params8, params1)


def test_sharded_training_state_is_really_sharded(tmp_path):
    trainer = Trainer(micro_config(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    try:
        q = trainer.state.params["layers"]["attn"]["q"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
        mu = trainer.state.opt_state[1][0].mu["layers"]["attn"]["q"]["kernel"]  # chain(clip, adamw) -> adam mu
        assert mu.sharding == q.sharding
        batch = trainer.next_batch()
        assert batch["inputs"].sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
        assert batch["inputs"].shape == (8, 32)
    finally:
        trainer.close()


def test_resume_with_a_different_model_is_refused(straight_run):
    run_dir, _, _ = straight_run
    with pytest.raises(JaxllmError, match=r"different model \(model.d_model: checkpoint 32 vs config 48\)"):
        Trainer(micro_config(run_dir, "model.d_model=48"))


def test_sigterm_saves_and_restart_continues_exactly(straight_run, tmp_path):
    _, straight, straight_params = straight_run
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxllm.cli", "train", str(Path(__file__).parents[2] / "configs" / "tiny.yaml"),
           *MICRO, f"run_dir={run_dir}", "train.sample_prompt=null", "checkpoint.every=1000"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.05)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    grace = time.time() - signalled
    assert proc.returncode == 0, out
    assert grace < 30, f"SIGTERM to exit took {grace:.1f} s; preemption grace periods are about 30 s"
    stopped_at = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert 4 <= stopped_at < 20, out
    assert f"stopped at step {stopped_at}" in out
    assert (run_dir / "checkpoints" / str(stopped_at)).is_dir()

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    logged = {r["step"]: r["loss"] for r in read_metrics(run_dir)}
    assert logged == straight["losses"]
    from jaxllm.infer.load import load_model

    _assert_same_params(jax.tree.map(np.asarray, load_model(run_dir).params), straight_params)
