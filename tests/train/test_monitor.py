"""The loss-spike detector and metrics.jsonl after a kill (the loop-level tests are in test_faults.py)."""

import json

import numpy as np

from jaxllm.train.metrics import read_metrics, truncate_metrics
from jaxllm.train.monitor import LossSpikeDetector


def test_spikes_are_called_against_the_recent_window():
    rng = np.random.default_rng(0)
    detector = LossSpikeDetector(window=20, threshold=4.0)
    calm = 3.0 + 0.01 * rng.standard_normal(40)
    assert [detector.update(float(x)) for x in calm[:9]] == [None] * 9  # too little history to judge
    assert all(detector.update(float(x)) is None for x in calm[9:])
    spike = detector.update(3.5)
    assert spike is not None and abs(spike["window_mean"] - 3.0) < 0.01 and spike["window_std"] < 0.02
    for _ in range(19):  # a lasting jump: the window adapts instead of warning forever
        detector.update(3.5)
    assert detector.update(3.5) is None


def test_threshold_zero_turns_it_off():
    detector = LossSpikeDetector(window=10, threshold=0.0)
    assert all(detector.update(x) is None for x in [1.0] * 20 + [1e9])


def test_a_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    rows = [{"step": s, "loss": 9.0 - s} for s in range(1, 6)] + [{"step": 3, "event": "loss_spike", "loss": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo'  # killed mid-line
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    assert [r["event"] for r in read_metrics(tmp_path, events=True)] == ["loss_spike"]
    truncate_metrics(tmp_path, 4)  # resumed from the checkpoint of step 4
    kept = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1, 2, 3, 4, 3]
