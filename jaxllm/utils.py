"""Small helpers shared across the package."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path

from jaxllm.config import JaxllmError

_UMASK = os.umask(0)  # read once, at import (single-threaded), and put back at once
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` so that readers see the old file or the whole new one, never a part. The
    file gets the permissions a plain write would give it (the old file's, else 0666 less the umask), not
    mkstemp's owner-only 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def ensure_writable_dir(path: str | Path, what: str) -> Path:
    """Creates directory `path` if needed and proves it writable by writing and removing a small file.

    Raises JaxllmError naming `what` (e.g. "run_dir") and the system's reason, before any work starts."""
    path = Path(path)
    probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}"  # unique per process
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as e:
        raise JaxllmError(
            f"{what} {path} is not writable ({e.strerror or e}); choose another {what} or fix its permissions"
        ) from None
    return path
