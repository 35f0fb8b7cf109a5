"""metrics.jsonl keeps metric names exactly; TensorBoard gets tags it accepts, without a warning per write."""

import json
import logging

from jaxllm.train.metrics import MetricsWriter


def test_per_source_names_become_valid_tensorboard_tags(tmp_path, caplog):
    writer = MetricsWriter(tmp_path)
    with caplog.at_level(logging.INFO):  # tensorboardX says so at INFO, which the CLI prints
        writer.write(5, {"eval_loss/builtin:kjv-valid": 4.5, "eval_loss/runs/x.jsonl#1": 4.0})
    writer.close()
    assert "illegal" not in caplog.text
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 5, "eval_loss/builtin:kjv-valid": 4.5, "eval_loss/runs/x.jsonl#1": 4.0}
    assert sorted(_scalar_tags(tmp_path / "tensorboard")) == ["eval_loss/builtin_kjv-valid", "eval_loss/runs/x.jsonl_1"]


def _scalar_tags(directory):
    """The scalar tags in TensorBoard event files (TFRecords: length, crc, Event proto, crc)."""
    from tensorboardX.proto import event_pb2

    tags = []
    for path in directory.iterdir():
        data = path.read_bytes()
        while data:
            n = int.from_bytes(data[:8], "little")
            event = event_pb2.Event.FromString(data[12:12 + n])
            tags += [v.tag for v in event.summary.value]
            data = data[12 + n + 4:]
    return tags
