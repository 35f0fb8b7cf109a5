"""Checksums of a checkpoint's files, written before the checkpoint is finalised and checked at restore.

Orbax makes a step visible only by renaming its finished temporary directory, so a killed save never
looks complete. That does not catch a file damaged later (a flipped bit, a truncated copy, a disk
error): array data is often compressed or stored in OCDBT files whose damage may go unnoticed, or
surface as a deep tensorstore traceback. So every file gets its size and CRC-32 recorded in
`checksums.json`, written just before Orbax's rename; restore checks them and names the bad file.
"""

from __future__ import annotations

import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jaxllm.config import JaxllmError
from jaxllm.utils import atomic_write_text

CHECKSUMS_FILE = "checksums.json"
_VERSION = 1
# Orbax writes these commit markers after the checksums (top level only), so they cannot be covered.
_WRITTEN_AFTER = frozenset({"_CHECKPOINT_METADATA", "commit_success.txt"})
_CHUNK = 4 << 20


class CorruptCheckpointError(JaxllmError):
    """A checkpoint whose files do not match their recorded checksums (or that has none)."""


def write_checksums(step_dir: str | Path) -> None:
    """Records size and CRC-32 of every file under `step_dir` in `step_dir/checksums.json`."""
    step_dir = Path(step_dir)
    paths = [
        p for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.relative_to(step_dir).as_posix() not in _WRITTEN_AFTER | {CHECKSUMS_FILE}
    ]  # fmt: skip
    with ThreadPoolExecutor(max_workers=8) as pool:  # zlib releases the GIL: large checkpoints hash in parallel
        crcs = list(pool.map(_crc32, paths))
    files = {
        p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "crc32": f"{crc:08x}"}
        for p, crc in zip(paths, crcs)
    }
    atomic_write_text(step_dir / CHECKSUMS_FILE, json.dumps({"version": _VERSION, "files": files}, indent=1))


def verify_checksums(step_dir: str | Path) -> None:
    """Raises CorruptCheckpointError naming the first file under `step_dir` that is missing, has another
    size, or another CRC-32 than when it was saved (or when `checksums.json` itself is missing or bad)."""
    step_dir = Path(step_dir)
    manifest = step_dir / CHECKSUMS_FILE
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {rel: (int(v["size"]), str(v["crc32"])) for rel, v in files.items()}
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"checkpoint {step_dir} has no {CHECKSUMS_FILE}: it was not written completely, or not by this jaxllm"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(f"checkpoint file {manifest} is damaged ({type(e).__name__}: {e})") from None
    for rel, (size, _) in expected.items():
        path = step_dir / rel
        if not path.is_file():
            raise CorruptCheckpointError(f"checkpoint file {path} is missing")
        if path.stat().st_size != size:
            raise CorruptCheckpointError(
                f"checkpoint file {path} is truncated or damaged: {path.stat().st_size} bytes, saved with {size}"
            )
    paths = [step_dir / rel for rel in expected]
    with ThreadPoolExecutor(max_workers=8) as pool:
        crcs = list(pool.map(_crc32, paths))
    for path, crc, (_, want) in zip(paths, crcs, expected.values()):
        if f"{crc:08x}" != want:
            raise CorruptCheckpointError(
                f"checkpoint file {path} is damaged: its CRC-32 is {crc:08x}, it was saved with {want}"
            )


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc
