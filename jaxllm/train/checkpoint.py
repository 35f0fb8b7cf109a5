"""Checkpoints with Orbax: model + optimizer + step, data-iterator state, config and tokenizer files.

Layout of `run_dir/checkpoints/<step>/`: `state/` (arrays, sharded, written by all processes),
`data/` (one JSON file per process: where its data iterator stands), `meta/` (the run's config),
`tokenizer/` (the tokenizer's files). Orbax writes each step to a temporary directory and renames it
when complete, so a half-written checkpoint is never taken for a good one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxllm.config import CheckpointConfig, JaxllmError


class FilesHandler(ocp.CheckpointHandler):
    """Stores small named files (bytes) in a checkpoint item; per process, or once by process 0."""

    def save(self, directory: epath.Path, args: "FilesSave") -> None:
        if args.per_process:
            prefix = f"process_{jax.process_index()}-of-{jax.process_count()}."
        elif jax.process_index() == 0:
            prefix = ""
        else:
            return
        for name, data in args.files.items():
            (directory / f"{prefix}{name}").write_bytes(data)

    def restore(self, directory: epath.Path, args: "FilesRestore | None" = None) -> dict[str, bytes]:
        per_process = args.per_process if args is not None else False
        prefix = f"process_{jax.process_index()}-of-{jax.process_count()}." if per_process else ""
        out = {}
        for path in directory.iterdir():
            if per_process and not path.name.startswith(prefix):
                continue
            if not per_process and path.name.startswith("process_"):
                continue
            out[path.name[len(prefix):]] = path.read_bytes()
        return out

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
class Restored:
    step: int
    state: dict[str, Any]
    data_state: dict[str, Any] | None
    config_yaml: str
    tokenizer_files: dict[str, bytes]


class Checkpointer:
    """Saves and restores training checkpoints under `directory` (keep-last-N, keep-every-K, async)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig | None = None, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            keep_period=cfg.keep_every,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        step: int,
        state: dict[str, Any],
        data_state: dict[str, Any] | None,
        config_yaml: str,
        tokenizer_files: dict[str, bytes],
    ) -> bool:
        """Starts saving (asynchronously when configured). `state` is a pytree of global arrays."""
        items = {
            "state": ocp.args.StandardSave(state),
            "meta": FilesSave({"config.yaml": config_yaml.encode()}),
            "tokenizer": FilesSave(tokenizer_files),
        }
        if data_state is not None:
            items["data"] = FilesSave({"iterator.json": json.dumps(data_state).encode()}, per_process=True)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any | None, with_data: bool = True) -> Restored:
        """Restores `step`. `abstract_state`: ShapeDtypeStructs with the target shardings (any mesh, any
        number of processes); None restores only the small items (config, tokenizer, data state).
        `with_data=False` skips the data state, which exists only for the process count that wrote it."""
        items = {
            "meta": FilesRestore(),
            "tokenizer": FilesRestore(),
        }
        step_dir = self.directory / str(step)
        has_data = with_data and (step_dir / "data").exists()
        if has_data:
            items["data"] = FilesRestore(per_process=True)
        if abstract_state is not None:
            items["state"] = ocp.args.StandardRestore(abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        data_state = None
        if has_data:
            blob = out["data"].get("iterator.json")
            if blob is None:
                raise JaxllmError(
                    f"checkpoint {step_dir} has no data state for process {jax.process_index()} of "
                    f"{jax.process_count()}; it was written by a run with a different number of processes"
                )
            data_state = json.loads(blob)
        return Restored(
            step=step,
            state=out["state"] if abstract_state is not None else None,
            data_state=data_state,
            config_yaml=out["meta"]["config.yaml"].decode(),
            tokenizer_files=out["tokenizer"],
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def find_checkpoint(path: str | Path) -> tuple[Checkpointer, int]:
    """Resolves a run directory, a `checkpoints/` directory or one step directory to (checkpointer, step)."""
    path = Path(path)
    if not path.exists():
        raise JaxllmError(f"checkpoint path {path} does not exist; pass a run directory or run_dir/checkpoints/STEP")
    candidates = [(path / "checkpoints", None), (path, None)]
    if path.name.isdigit():
        candidates.insert(0, (path.parent, int(path.name)))
    for directory, step in candidates:
        if not directory.is_dir():
            continue
        ckpt = Checkpointer(directory, read_only=True)
        steps = ckpt.all_steps()
        if step is None and steps:
            return ckpt, max(steps)
        if step is not None and step in steps:
            return ckpt, step
    raise JaxllmError(f"no complete checkpoint found at {path}; train first or pass run_dir/checkpoints/STEP")
