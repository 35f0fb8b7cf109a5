"""Checkpoint checksums: every kind of damage is caught and names the file."""

import json

import pytest

from jaxllm.train.checksums import CHECKSUMS_FILE, CorruptCheckpointError, verify_checksums, write_checksums


@pytest.fixture
def step_dir(tmp_path):
    d = tmp_path / "7"
    (d / "state" / "d").mkdir(parents=True)
    (d / "state" / "d" / "chunk").write_bytes(bytes(range(256)) * 1000)
    (d / "meta").mkdir()
    (d / "meta" / "config.yaml").write_text("model: {}\n")
    (d / "_CHECKPOINT_METADATA").write_text("{}")  # Orbax rewrites it after the checksums: not covered
    write_checksums(d)
    return d


def test_a_sound_checkpoint_verifies(step_dir):
    files = json.loads((step_dir / CHECKSUMS_FILE).read_text())["files"]
    assert sorted(files) == ["meta/config.yaml", "state/d/chunk"]
    (step_dir / "_CHECKPOINT_METADATA").write_text('{"commit_timestamp_nsecs": 1}')
    (step_dir / "commit_success.txt").write_text("ok")
    verify_checksums(step_dir)


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _flip(d / "state/d/chunk", 123_456), r"state/d/chunk is damaged: its CRC-32 is \w{8}, it was saved"),
        (lambda d: (d / "state/d/chunk").write_bytes(b"cut"), r"state/d/chunk is truncated or damaged: 3 bytes, saved"),
        (lambda d: (d / "meta/config.yaml").unlink(), r"meta/config.yaml is missing"),
        (lambda d: (d / CHECKSUMS_FILE).unlink(), r"has no checksums.json: it was not written completely"),
        (lambda d: (d / CHECKSUMS_FILE).write_text('{"files": [1'), r"checksums.json is damaged \(JSONDecodeError"),
        (lambda d: (d / CHECKSUMS_FILE).write_text('{"nope": 1}'), r"checksums.json is damaged \(KeyError"),
    ],
    ids=["flipped-bit", "truncated", "missing-file", "no-checksums", "bad-json", "wrong-json"],
)
def test_damage_is_caught_and_named(step_dir, damage, message):
    damage(step_dir)
    with pytest.raises(CorruptCheckpointError, match=message) as e:
        verify_checksums(step_dir)
    assert str(step_dir) in str(e.value)
