"""The Checkpointer's housekeeping (saving and restoring are tested through the trainer in test_loop.py and
test_faults.py)."""

import logging

from jaxllm.train.checkpoint import Checkpointer


def test_leftovers_of_interrupted_saves_and_deletions_are_removed(tmp_path, caplog):
    (tmp_path / "6.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # a save killed before its rename
    (tmp_path / ".deleted" / "2" / "state").mkdir(parents=True)  # a deletion killed after its rename
    (tmp_path / "4").mkdir()
    with caplog.at_level(logging.INFO, logger="jaxllm"):
        checkpointer = Checkpointer(tmp_path)
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["4"]
        assert checkpointer.all_steps() == [4]
        assert f"removing {tmp_path / '6.orbax-checkpoint-tmp'}, left by an interrupted save" in caplog.text
    finally:
        checkpointer.close()


def test_read_only_use_touches_nothing(tmp_path):
    (tmp_path / "6.orbax-checkpoint-tmp").mkdir()
    (tmp_path / ".deleted").mkdir()
    Checkpointer(tmp_path, read_only=True).close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".deleted", "6.orbax-checkpoint-tmp"]
