"""Checkpoints with Orbax: model + optimizer + step, data-iterator state, config and tokenizer files.

Layout of `run_dir/checkpoints/<step>/`: `state/` (arrays, sharded, written by all processes),
`data/` (one JSON file per process: where its data iterator stands), `meta/` (the run's config),
`tokenizer/` (the tokenizer's files), `checksums.json` (size and CRC-32 of every file).

What can go wrong, and what happens:
- A save killed at any moment leaves `<step>.orbax-checkpoint-tmp`: Orbax renames a step's directory
  only once everything (checksums included) is written, so it is never read; the next start deletes it.
- Old checkpoints are dropped by an atomic rename into `.deleted/` and emptied from there, so a kill
  during deletion never leaves a half-deleted step that looks complete.
- A damaged checkpoint fails its checksums at restore, with the file named; `checkpoint.on_corrupt`
  chooses between an error and setting it aside in `corrupt/` to resume from the one before.
- A failed write (disk full, no permission) stops the run with an error naming the step and the
  newest complete checkpoint, which stays the newest; the partial one is removed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxllm.config import CheckpointConfig, Config, JaxllmError, config_from_yaml_text
from jaxllm.train.checksums import CorruptCheckpointError, verify_checksums, write_checksums

log = logging.getLogger("jaxllm")

_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # how Orbax names a step directory it has not finalised
_TRASH = ".deleted"  # old steps are renamed in here (atomic), then removed
_CORRUPT = "corrupt"  # steps that failed their checksums, kept for inspection


class _ReadOnlyNotices(logging.Filter):
    """Orbax warns about every option it resets for a read-only manager ("read_only=True, setting
    ...", "Given directory is read only"); jaxllm opens checkpoints read-only by design (loading a model,
    train.init_from, frozen models), so those notices say nothing to a user and are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not ("read_only=True" in text or text.startswith("Given directory is read only"))


logging.getLogger("absl").addFilter(_ReadOnlyNotices())


class FilesHandler(ocp.CheckpointHandler):
    """Stores small named files (bytes) in a checkpoint item; per process, or once by process 0.

    Orbax adds files of its own to an item's directory (`commit_success.txt`), so a list of the names
    we wrote (`MANIFEST`) goes with them and `restore` returns exactly those. Items saved before the
    list existed are read as every file but Orbax's marker."""

    MANIFEST = "jaxllm-files.json"

    def save(self, directory: epath.Path, args: "FilesSave") -> None:
        prefix = self._prefix(args.per_process)
        if prefix is None:
            return
        for name, data in args.files.items():
            (directory / f"{prefix}{name}").write_bytes(data)
        (directory / f"{prefix}{self.MANIFEST}").write_text(json.dumps(sorted(args.files)))

    def restore(self, directory: epath.Path, args: "FilesRestore | None" = None) -> dict[str, bytes]:
        per_process = args.per_process if args is not None else False
        prefix = self._prefix(per_process) or ""
        manifest = directory / f"{prefix}{self.MANIFEST}"
        if manifest.exists():
            return {name: (directory / f"{prefix}{name}").read_bytes() for name in json.loads(manifest.read_text())}
        out = {}
        for path in directory.iterdir():
            if per_process and not path.name.startswith(prefix):
                continue
            if not per_process and path.name.startswith("process_"):
                continue
            if path.name == ocp.path.atomicity_types.COMMIT_SUCCESS_FILE:
                continue
            out[path.name[len(prefix):]] = path.read_bytes()
        return out

    @staticmethod
    def _prefix(per_process: bool) -> str | None:
        """File name prefix of this process's files; None when this process writes none."""
        if per_process:
            return f"process_{jax.process_index()}-of-{jax.process_count()}."
        return "" if jax.process_index() == 0 else None

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(FilesHandler, for_save=True)
@dataclasses.dataclass
class FilesSave(ocp.args.CheckpointArgs):
    files: dict[str, bytes]
    per_process: bool = False


@ocp.args.register_with_handler(FilesHandler, for_restore=True)
@dataclasses.dataclass
class FilesRestore(ocp.args.CheckpointArgs):
    per_process: bool = False


@dataclasses.dataclass
class Meta:
    """The small items of a checkpoint: the run's config (YAML, and parsed once: `config`), the
    tokenizer's files, and this process's data-iterator state (None when not read)."""

    step: int
    config_yaml: str
    tokenizer_files: dict[str, bytes]
    data_state: dict[str, Any] | None

    @functools.cached_property
    def config(self) -> Config:
        return config_from_yaml_text(self.config_yaml)


class Checkpointer:
    """Saves and restores training checkpoints under `directory` (keep-last-N, keep-every-K, async).

    A step counts as complete when its directory exists under its final name; `verify` checks its
    checksums. Saving and removing old steps are atomic renames, so a kill never leaves a half state."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig | None = None, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.directory = Path(directory).absolute()
        self._async = cfg.async_save
        self._read_only = read_only
        self._saving: int | None = None  # the step being written, until its save has finished
        self._failed_step: int | None = None  # a step whose save failed: its partial files are removed
        if not read_only and jax.process_index() == 0:
            self._remove_leftovers()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else cfg.keep,  # (Orbax warns that it ignores them when read-only)
            keep_period=None if read_only else cfg.keep_every,
            # Always Orbax's async checkpointer: only it runs the callback that writes the checksums
            # before the final rename. A synchronous save waits for it (see `save`).
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal),
            todelete_subdir=None if read_only else _TRASH,
            create=not read_only,
            read_only=read_only,
        )
        try:
            self.manager = ocp.CheckpointManager(self.directory, options=options)
        except OSError as e:
            raise JaxllmError(
                f"cannot use checkpoint directory {self.directory} ({e.strerror or e}); "
                "check the path and its permissions"
            ) from None

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Steps whose directories have their final names (not yet verified), oldest first."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def verify(self, step: int) -> None:
        """Raises CorruptCheckpointError naming the damaged file when `step` fails its checksums."""
        verify_checksums(self.directory / str(step))

    def newest_good_step(self, on_corrupt: str = "error") -> int | None:
        """The newest step that passes its checksums. A damaged one raises (`on_corrupt="error"`) or is
        moved to `corrupt/` with a warning (`"previous"`), and the one before it is tried."""
        steps = self.all_steps()
        for i in range(len(steps) - 1, -1, -1):
            try:
                self.verify(steps[i])
                return steps[i]
            except CorruptCheckpointError as e:
                if on_corrupt != "previous":
                    before = f"the one before is step {steps[i - 1]}" if i else "there is no earlier one"
                    raise CorruptCheckpointError(
                        f"{e}. Set checkpoint.on_corrupt=previous to set it aside and resume from the newest good "
                        f"checkpoint ({before}), or delete {self.directory / str(steps[i])}"
                    ) from None
                log.warning("%s; moving it to %s/ and trying the checkpoint before it", e, _CORRUPT)
                self._set_aside(steps[i])
        return None

    def save(
        self,
        step: int,
        state: dict[str, Any],
        data_state: dict[str, Any] | None,
        config_yaml: str,
        tokenizer_files: dict[str, bytes],
    ) -> None:
        """Starts saving (finishes first when checkpoint.async_save is false). `state` is a pytree of
        global arrays. Raises JaxllmError when this save, or the previous asynchronous one, failed."""
        self.wait()  # one save at a time: `_seal` must know which step it seals
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": FilesSave({"config.yaml": config_yaml.encode()}),
            "tokenizer": FilesSave(tokenizer_files),
        }
        if data_state is not None:
            items["data"] = FilesSave({"iterator.json": json.dumps(data_state).encode()}, per_process=True)
        self._saving = step
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 (any failure to write: disk full, permissions, ...)
            raise self._save_failed(e) from None
        if not self._async:
            self.wait()

    def restore_meta(self, step: int, with_data: bool = True) -> Meta:
        """The small items of `step` (config, tokenizer files, data state), never the arrays.
        `with_data=False` skips the data state, which exists only for the process count that wrote it."""
        step_dir = self.directory / str(step)
        items = {"meta": FilesRestore(), "tokenizer": FilesRestore()}
        has_data = with_data and (step_dir / "data").exists()
        if has_data:
            items["data"] = FilesRestore(per_process=True)
        out = self._restore(step, items)
        data_state = None
        if has_data:
            blob = out["data"].get("iterator.json") or _global_data_state(step_dir / "data")
            if blob is None:
                raise JaxllmError(
                    f"checkpoint {step_dir} has no data state for process {jax.process_index()} of "
                    f"{jax.process_count()}; it was written by a run with a different number of processes"
                )
            data_state = json.loads(blob)
        return Meta(step, out["meta"]["config.yaml"].decode(), out["tokenizer"], data_state)

    def restore_state(self, step: int, abstract_state: Any) -> dict[str, Any]:
        """The train state of `step` into `abstract_state`: ShapeDtypeStructs with the target shardings (any
        mesh, any number of processes)."""
        return self._restore(step, {"state": ocp.args.StandardRestore(abstract_state)})["state"]

    def _restore(self, step: int, items: dict[str, Any]) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, OSError) as e:  # checksums passed: the saved tree differs from this model's
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise JaxllmError(
                f"cannot restore checkpoint {self.directory / str(step)} into this model ({first}); it was saved by "
                "another model config or jaxllm version: use a new run_dir"
            ) from None

    def restore_params(self, step: int, target: Any) -> Any:
        """Only the parameters of `step` (never reading the optimizer state), into `target`:
        ShapeDtypeStructs carrying the shardings they should have. The step must already be verified
        (`find_checkpoint` and `newest_good_step` do it)."""
        item = {"params": target}
        restore = ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
        )
        return self.manager.restore(step, args=ocp.args.Composite(state=restore))["state"]["params"]

    def check_free_space(self, checkpoint_bytes: int, keep: int) -> None:
        """Raises before training when the disk cannot hold one more checkpoint of `checkpoint_bytes`;
        warns when it cannot hold `keep` + 1 (the kept ones and the one being written)."""
        free = shutil.disk_usage(self.directory).free
        need = f"one checkpoint of this model takes about {checkpoint_bytes / 1e6:,.1f} MB"
        if free < checkpoint_bytes:
            raise JaxllmError(
                f"{self.directory} has {free / 1e6:,.1f} MB free but {need}; free some space or choose a run_dir "
                "on a larger disk"
            )
        if free < checkpoint_bytes * (keep + 1):
            log.warning("%s has %.1f MB free and %s: fewer than checkpoint.keep + 1 = %d fit",
                        self.directory, free / 1e6, need, keep + 1)

    def wait(self) -> None:
        """Waits for an asynchronous save; raises JaxllmError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 (errors of the background write surface here)
            raise self._save_failed(e) from None
        self._saving = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            if not self._read_only and jax.process_index() == 0:
                shutil.rmtree(self.directory / _TRASH, ignore_errors=True)
                if self._failed_step is not None:  # again, now that no writer thread can still add files
                    self._remove_partials(self._failed_step)

    # ------------------------------------------------------------------------------------ internals

    def _seal(self) -> None:
        """Orbax's post-finalisation callback (process 0, background thread, before the final rename):
        the step's files are all written, so their checksums go in with them."""
        tmp = [p for p in self.directory.glob(f"{self._saving}{_TMP_SUFFIX}*") if p.is_dir()]
        if len(tmp) != 1:
            raise JaxllmError(f"expected one temporary directory of step {self._saving} in {self.directory}: {tmp}")
        write_checksums(tmp[0])
        shutil.rmtree(self.directory / _TRASH, ignore_errors=True)  # steps dropped after the previous save

    def _save_failed(self, error: Exception) -> JaxllmError:
        step, self._saving = self._saving, None
        self._failed_step = step
        if jax.process_index() == 0:
            self._remove_partials(step)
        reason = _reason(error)
        latest = self.latest_step()
        newest = f"step {latest}" if latest is not None else "none (this run has no checkpoint yet)"
        return JaxllmError(
            f"saving checkpoint {step} to {self.directory} failed: {reason}. The newest complete checkpoint is "
            f"{newest}; fix the cause (disk space, permissions) and run the same command to resume from it"
        )

    def _remove_partials(self, step: int) -> None:
        for partial in self.directory.glob(f"{step}{_TMP_SUFFIX}*"):
            shutil.rmtree(partial, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        """Deletes partial steps of an interrupted save and the remains of an interrupted deletion."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if _TMP_SUFFIX in path.name or path.name == _TRASH:
                log.info("removing %s, left by an interrupted save or deletion", path)
                shutil.rmtree(path, ignore_errors=True)

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            target = self.directory / _CORRUPT / str(step)
            n = 1
            while target.exists():
                target, n = self.directory / _CORRUPT / f"{step}-{n}", n + 1
            target.parent.mkdir(exist_ok=True)
            (self.directory / str(step)).rename(target)
        self.manager.reload()


def _reason(error: BaseException) -> str:
    """The system's word for a failed write ("No space left on device"), else the error's first line."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    text = str(error).strip()
    code = re.search(r"os_error_code='?(\d+)", text)  # tensorstore reports errno in its message
    if code:
        return os.strerror(int(code.group(1)))
    return text.splitlines()[0][:200] if text else type(error).__name__


def find_checkpoint(path: str | Path) -> tuple[Checkpointer, int]:
    """Resolves a run directory, a `checkpoints/` directory or one step directory to (checkpointer, step),
    the step verified against its checksums."""
    path = Path(path)
    if not path.exists():
        raise JaxllmError(f"checkpoint path {path} does not exist; pass a run directory or run_dir/checkpoints/STEP")
    candidates = [(path / "checkpoints", None), (path, None)]
    if path.name.isdigit():
        candidates.insert(0, (path.parent, int(path.name)))
    for directory, wanted in candidates:
        if not directory.is_dir():
            continue
        ckpt = Checkpointer(directory, read_only=True)
        steps = ckpt.all_steps()
        step = max(steps) if wanted is None and steps else wanted
        if step is None or step not in steps:
            continue
        try:
            ckpt.verify(step)
        except CorruptCheckpointError as e:
            earlier = [s for s in steps if s < step]
            hint = f"; pass --checkpoint {ckpt.directory / str(earlier[-1])} to use the one before" if earlier else ""
            raise CorruptCheckpointError(f"{e}{hint}") from None
        return ckpt, step
    raise JaxllmError(f"no complete checkpoint found at {path}; train first or pass run_dir/checkpoints/STEP")


def _global_data_state(data_dir: Path) -> bytes | None:
    """Process 0's saved data state when it is a global position (pre-tokenised shards: jaxllm.data.shard_source),
    which every process of any count resumes from; None otherwise."""
    for path in sorted(data_dir.glob("process_0-of-*.iterator.json")):
        blob = path.read_bytes()
        if json.loads(blob).get("layout", {}).get("position") == "global":
            return blob
    return None
