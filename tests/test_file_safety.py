"""Safety of files: every write of metadata, configs and exports is atomic, and reading a checkpoint or a
tokenizer never runs code (no pickle, no `trust_remote_code`)."""

import os
import re
import stat
import sys
from pathlib import Path

import pytest

from jaxllm.config import load_config
from jaxllm.data.tokenizer import load_tokenizer_from_files
from jaxllm.infer.load import load_model
from jaxllm.train.loop import Trainer
from jaxllm.utils import atomic_write_text
from tests.train.test_loop import MICRO

PACKAGE = Path(__file__).parents[1] / "jaxllm"
# Writes that are not atomic renames, each with the reason it is safe.
NON_ATOMIC = {
    ("utils.py", "os.fdopen(fd, \"wb\")"): "the temporary file of atomic_write_bytes itself",
    ("utils.py", "probe.write_bytes("): "a throw-away probe of ensure_writable_dir",
    ("train/checkpoint.py", ").write_bytes(data)"): "inside Orbax's temporary step directory, renamed as a whole",
    ("train/checkpoint.py", "self.MANIFEST}\").write_text("): "the item's file list, in the same temporary directory",
    ("train/metrics.py", "open(run_dir / filename, \"a\""): "an append-only log (metrics.jsonl, best-of-n's rounds.jsonl); "
    "a cut last line is dropped",
    ("dataprep/io.py", "open(self._tmp, \"wb\")"): "ShardWriter's temporary file, renamed into place by commit()",
    ("dataprep/beam.py", "os.fdopen(fd, \"wb\") as out"): "a throw-away local copy of a remote input shard",
}
_WRITE = re.compile(r"\.write_(text|bytes)\(|open\([^)]*[\"'](w|a|x)b?[\"']|\.dump\(|np\.save")


def test_every_write_in_the_package_is_atomic_or_listed():
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line in path.read_text().splitlines():
            if _WRITE.search(line) and "atomic_write" not in line:
                allowed = [key for key in NON_ATOMIC if key[0] == rel and key[1] in line]
                assert allowed, f"{rel}: {line.strip()!r} writes a file in place; use jaxllm.utils.atomic_write_*"
                found.update(allowed)
    assert found == set(NON_ATOMIC)  # the list holds no stale entries


def test_no_code_runs_on_read_in_the_source():
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        for banned in ("import pickle", "pickle.load", "allow_pickle=True", "trust_remote_code=True", "cloudpickle"):
            assert banned not in text, f"{path}: {banned}"


def test_an_atomic_write_leaves_the_old_file_when_it_fails(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")

    class Boom(str):
        def encode(self, *args):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write_text(path, Boom("new: 2\n"))
    assert path.read_text() == "old: 1\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


@pytest.fixture
def unpickling_watch():
    """Records every global an unpickler would look up (`pickle.find_class` audit events): nothing can be
    executed by unpickling without one."""
    events = []
    active = [True]

    def hook(event, args):
        if active[0] and event == "pickle.find_class":
            events.append(args)

    sys.addaudithook(hook)  # cannot be removed; `active` switches it off after the test
    yield events
    active[0] = False


def test_restoring_a_checkpoint_unpickles_nothing(tmp_path, unpickling_watch):
    cfg = load_config(None, [*MICRO, f"run_dir={tmp_path}"])
    trainer = Trainer(cfg)
    try:
        trainer.save()
    finally:
        trainer.close()
    unpickling_watch.clear()  # from here on only reading
    Trainer(cfg).close()  # resumes: restores the whole training state
    loaded = load_model(tmp_path)  # restores parameters for generation
    load_tokenizer_from_files(loaded.tokenizer.files())
    assert unpickling_watch == []


def test_an_atomic_write_gets_the_permissions_of_a_plain_write(tmp_path):
    """mkstemp makes owner-only files: exported models and run files must stay readable by others as a
    plain write leaves them (0666 less the umask), and a rewritten file keeps its mode."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode
    os.chmod(plain, 0o640)
    atomic_write_text(plain, "y")
    assert stat.S_IMODE(plain.stat().st_mode) == 0o640 and plain.read_text() == "y"
