"""Faults a run must survive, each injected from outside jaxllm: SIGKILL at random moments and in the middle
of an asynchronous save, damaged checkpoints, a write failing mid-run, an unwritable or full disk, NaN/Inf
steps and loss spikes. Where a run goes on, its end is compared bit for bit with an uninterrupted run."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.config import JaxllmError, load_config
from jaxllm.infer.load import load_model
from jaxllm.train.checksums import CorruptCheckpointError, verify_checksums
from jaxllm.train.loop import Trainer
from jaxllm.train.metrics import read_metrics
from jaxllm.train.monitor import NonfiniteLossError, replay_batch
from tests.train.test_loop import MICRO

ROOT = Path(__file__).parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, EVERY, KILLS = 60, 2, 6
FAULT = [*MICRO, f"train.steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2",
         "train.sample_prompt=null", "eval.sources=[]"]  # fmt: skip
TMP = ".orbax-checkpoint-tmp"


def _config(run_dir, *extra):
    return load_config(TINY, [*FAULT, f"run_dir={run_dir}", *extra])


def _train(cfg, stop_at_step=None, trainer=None):
    """Runs (and closes) `trainer`, or a new one of `cfg`. Same train.steps as the reference everywhere: the
    schedule is compiled into the step, so the persistent compilation cache then serves every trainer."""
    trainer = trainer or Trainer(cfg)
    try:
        summary = trainer.run(stop_at_step=stop_at_step)
        return summary, jax.tree.map(np.asarray, trainer.state.params)
    finally:
        trainer.close()


def _assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def _complete(run_dir):
    ckpt = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def _partials(run_dir):
    ckpt = Path(run_dir) / "checkpoints"
    return sorted(p.name for p in ckpt.iterdir() if TMP in p.name) if ckpt.is_dir() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """STEPS steps uninterrupted, in this process: the parameters and losses every faulty run must end with."""
    run_dir = tmp_path_factory.mktemp("reference")
    summary, params = _train(_config(run_dir))
    return params, summary["losses"]


# ------------------------------------------------------------------------------ kills (subprocesses)


def _start(run_dir, log_path, fault_env=None):
    """`jaxllm train` in a subprocess (through tests/train/fault_runner.py), output to `log_path`."""
    cmd = [sys.executable, "-m", "tests.train.fault_runner", "train", str(TINY), *FAULT, f"run_dir={run_dir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(fault_env or {}))
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_until(done, proc, log_path, timeout=240):
    deadline = time.time() + timeout
    while not done():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the kill:\n{log_path.read_text()}"
        assert time.time() < deadline, f"timed out:\n{log_path.read_text()}"
        time.sleep(0.002)


def _logged_step(run_dir):
    return max((r["step"] for r in read_metrics(run_dir)), default=0)


def test_sigkill_loop_ends_equal_to_an_uninterrupted_run(reference, tmp_path):
    """KILLS SIGKILLs: at seeded random moments from outside, and every third one inside an asynchronous
    save (its files written, not yet sealed and renamed). Each restart must resume from the newest complete
    checkpoint, remove the partial one, and the last run must end with the reference's parameters."""
    ref_params, ref_losses = reference
    run_dir = tmp_path / "run"
    ckpt = (run_dir / "checkpoints").absolute()
    rng = np.random.default_rng(7)
    resumed, left_partial, in_save = [], 0, 0
    for kill in range(KILLS):
        complete, partial_before = _complete(run_dir), _partials(run_dir)
        resume = complete[-1] if complete else 0
        log_path = tmp_path / f"run{kill}.log"
        if kill % 3 == 2:
            target = resume + 2 * EVERY  # the next save completes, this one is killed while sealing
            proc = _start(run_dir, log_path, {"JAXLLM_TEST_KILL_IN_SAVE": str(target)})
            proc.wait(timeout=300)
            assert [p for p in _partials(run_dir) if p.startswith(f"{target}{TMP}")], log_path.read_text()
            assert target not in _complete(run_dir)
            in_save += 1
        else:
            target = resume + EVERY + int(rng.integers(0, 3))
            proc = _start(run_dir, log_path)
            began = f"resumed from {ckpt / str(resume)} at step {resume}" if resume else "starting at step 0"
            # Killed once it has sealed a new checkpoint (so the loop makes progress) and reached `target`.
            _wait_until(lambda: began in log_path.read_text() and _logged_step(run_dir) >= target
                        and _complete(run_dir)[-1:] >= [resume + EVERY], proc, log_path)
            time.sleep(rng.uniform(0, 0.03))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        log = log_path.read_text()
        assert proc.returncode == -signal.SIGKILL, log  # really killed: it did not finish first
        assert target <= STEPS - 8 and STEPS not in _complete(run_dir), log
        if resume:
            assert f"resumed from {ckpt / str(resume)} at step {resume}" in log, log
            resumed.append(resume)
        for name in partial_before:  # what the previous kill left was removed, not read
            assert f"removing {ckpt / name}, left by an interrupted save" in log, log
        left_partial += bool(_partials(run_dir))

    summary, params = _train(_config(run_dir))  # the last run goes to the end (in this process: quicker)
    resumed.append(summary["start_step"])
    assert not _partials(run_dir) and not (ckpt / ".deleted").exists()
    assert resumed == sorted(set(resumed)) and len(resumed) == KILLS, resumed  # every restart got further
    _assert_same_params(params, ref_params)
    _assert_same_params(jax.tree.map(np.asarray, load_model(run_dir).params), ref_params)  # and its checkpoint
    assert {r["step"]: r["loss"] for r in read_metrics(run_dir)} == ref_losses
    print(f"\nkill loop: {KILLS} SIGKILLs ({in_save} inside a save), {left_partial} left a partial checkpoint; "
          f"restarts resumed from steps {resumed}; final parameters and losses equal the uninterrupted run")


def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_last_checkpoint(reference, tmp_path):
    """From the save of step 10 on, files cannot grow past 256 KiB (like a full disk): the array writes fail
    in Orbax's background thread. The run stops with one line naming the step and the newest complete
    checkpoint, which stays the newest; the same command resumes from it once there is room."""
    ref_params, _ = reference
    run_dir = tmp_path / "run"
    log_path = tmp_path / "full.log"
    proc = _start(run_dir, log_path, {"JAXLLM_TEST_FSIZE_FROM_SAVE": "10"})
    assert proc.wait(timeout=300) == 2, log_path.read_text()
    log = log_path.read_text()
    # Around it Orbax's dying writer threads print their own asyncio tracebacks about the aborted writes,
    # concurrently: a fragment of theirs can land in front of our message, on the same line.
    errors = re.findall(r"(?<!\w)error: [^\n]*", log)
    assert len(errors) == 1, log
    assert f"error: saving checkpoint 10 to {(run_dir / 'checkpoints').absolute()} failed: " in errors[0]
    assert "File too large" in errors[0] and "The newest complete checkpoint is step 8" in errors[0], errors[0]
    assert _complete(run_dir)[-1] == 8 and not _partials(run_dir)

    summary, params = _train(_config(run_dir))  # the disk has room again
    assert summary["start_step"] == 8
    _assert_same_params(params, ref_params)


# ------------------------------------------------------------------------------ damaged checkpoints


def _biggest_file(directory):
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_a_damaged_checkpoint_is_named_and_the_previous_one_used_when_configured(reference, tmp_path, capsys):
    ref_params, _ = reference
    _train(_config(tmp_path), stop_at_step=10)
    ckpt = (tmp_path / "checkpoints").absolute()
    assert _complete(tmp_path) == [8, 10]
    victim = _biggest_file(ckpt / "10" / "state")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit
    victim.write_bytes(bytes(data))

    with pytest.raises(CorruptCheckpointError) as e:
        Trainer(_config(tmp_path))
    assert f"checkpoint file {victim} is damaged: its CRC-32 is" in str(e.value)
    assert "Set checkpoint.on_corrupt=previous" in str(e.value) and "the one before is step 8" in str(e.value)
    assert main(["generate", "--run-dir", str(tmp_path), "--prompt", "And"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(victim) in err[0] and f"--checkpoint {ckpt / '8'}" in err[0], err

    summary, params = _train(_config(tmp_path, "checkpoint.on_corrupt=previous"))
    assert summary["start_step"] == 8 and (ckpt / "corrupt" / "10").is_dir()
    _assert_same_params(params, ref_params)

    victim = _biggest_file(ckpt / str(STEPS) / "state")
    victim.write_bytes(victim.read_bytes()[:100])  # truncated, e.g. by a copy cut short
    assert main(["generate", "--run-dir", str(tmp_path), "--prompt", "And"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint file {victim} is truncated or damaged: 100 bytes" in err[0], err


def test_synchronous_saves_are_sealed_too(tmp_path):
    _train(_config(tmp_path, "checkpoint.async_save=false"), stop_at_step=6)
    assert _complete(tmp_path) == [4, 6] and not (tmp_path / "checkpoints" / ".deleted").exists()
    for step in (4, 6):
        verify_checksums(tmp_path / "checkpoints" / str(step))


# ------------------------------------------------------------------------------ disks


def test_an_unwritable_run_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(JaxllmError, match=r"run_dir .*a_file/run is not writable \(Not a directory\); choose another"):
        Trainer(_config(blocker / "run"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_a_read_only_run_dir_is_refused_before_training(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(JaxllmError, match=r"is not writable \(Permission denied\)"):
            Trainer(_config(tmp_path / "run"))
    finally:
        tmp_path.chmod(0o700)


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(total=10**9, used=10**9, free=10**5))
    with pytest.raises(JaxllmError, match=r"has 0.1 MB free but one checkpoint of this model takes about [\d.]+ MB"):
        Trainer(_config(tmp_path))
    assert _complete(tmp_path) == [] and not (tmp_path / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ NaN / Inf and spikes


def _tamper(trainer, steps, change):
    """Makes `trainer` feed `change(batch)` at `steps`; returns the untouched batches of those steps."""
    original, seen = trainer.next_batch, {}

    def next_batch():
        batch = original()
        step = trainer.step + 1
        if step in steps:
            seen[step] = {k: np.asarray(v) for k, v in batch.items()}
            batch = change(batch)
        return batch

    trainer.next_batch = next_batch
    return seen


def _nan(batch):
    return dict(batch, loss_mask=batch["loss_mask"] * jnp.nan)


def _inf(batch):
    return dict(batch, loss_mask=batch["loss_mask"].at[0, 0].set(jnp.inf))


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, caplog):
    trainer = Trainer(_config(tmp_path, "train.on_nonfinite=skip"))
    _tamper(trainer, {4, 9}, lambda b: _nan(b) if trainer.step + 1 == 4 else _inf(b))
    _, params = _train(None, stop_at_step=12, trainer=trainer)
    events = [(e["step"], e["action"]) for e in read_metrics(tmp_path, events=True) if e["event"] == "nonfinite"]
    assert events == [(4, "skipped"), (9, "skipped")]
    assert [r["skipped_updates"] for r in read_metrics(tmp_path)] == [0] * 3 + [1] * 5 + [2] * 4
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
    assert "loss nan and gradient norm nan at step 4: update skipped (train.on_nonfinite=skip)" in caplog.text


def test_a_nonfinite_step_stops_with_the_batch_location_to_replay(tmp_path):
    cfg = _config(tmp_path, "train.log_every=5")  # on_nonfinite=stop is the default
    trainer = Trainer(cfg)
    seen = _tamper(trainer, {7}, _nan)
    report = tmp_path / "nonfinite" / "step_7.json"
    with pytest.raises(NonfiniteLossError, match=rf"at step 7; the update was not applied.*position is in {report}"):
        _train(None, trainer=trainer)
    assert _complete(tmp_path) == [4, 6]  # the check before saving step 8 stopped the run
    events = read_metrics(tmp_path, events=True)
    assert [(e["step"], e["event"], e["action"]) for e in events] == [(7, "nonfinite", "stopped")]
    replayed = replay_batch(cfg, trainer.tokenizer, report)
    for key, value in seen[7].items():
        np.testing.assert_array_equal(replayed[key], value)


def test_a_loss_spike_is_logged(tmp_path, caplog):
    trainer = Trainer(_config(tmp_path, "train.spike_threshold=3", "train.spike_window=10"))
    _tamper(trainer, {15}, lambda b: dict(b, targets=(b["targets"] + 1000) % 4096))  # nonsense targets
    _train(None, stop_at_step=16, trainer=trainer)
    spikes = [e for e in read_metrics(tmp_path, events=True) if e["event"] == "loss_spike"]
    assert [e["step"] for e in spikes] == [15], spikes
    assert spikes[0]["loss"] > spikes[0]["window_mean"] + 3 * spikes[0]["window_std"]
    assert "loss spike at step 15" in caplog.text
