"""Which JAX platforms a process may use, decided before JAX initialises any backend.

Where libtpu is installed (the test and `plan` extras install it), JAX loads it on every machine
when it picks backends, and on a machine without a TPU libtpu prints "could not determine TPU
accelerator type" warnings and an `E0000 ... INVALID_ARGUMENT ... TPU_WORKER_HOSTNAMES` block that
read as a crash. `keep_off_tpu` tells JAX to skip the TPU platform on such machines; TPU VMs,
and users who chose JAX_PLATFORMS themselves, are left as they are. Reads the environment and
device files only; never imports JAX's backends.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Mapping, MutableMapping

# Set on TPU VMs and GKE TPU pods (or by a user forcing TPU initialisation).
TPU_ENV = ("TPU_WORKER_HOSTNAMES", "TPU_NAME", "TPU_ACCELERATOR_TYPE", "JAX_FORCE_TPU_INIT")


def on_tpu_vm(env: Mapping[str, str]) -> bool:
    """A TPU pod worker: GKE sets the worker list; TPU VMs expose their chips as /dev/accel* (v2-v4)
    or /dev/vfio/N (v5e, v5p, v6e). VFIO devices also appear on GPU VMs, so a TPU VM also needs
    libtpu installed."""
    if "TPU_WORKER_HOSTNAMES" in env:
        return True
    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def keep_off_tpu(env: MutableMapping[str, str] | None = None) -> str | None:
    """Sets JAX_PLATFORMS in `env` (default os.environ) to this machine's platforms without `tpu` when
    libtpu is installed but this is no TPU VM; returns what it set, or None when it left JAX alone
    (a TPU VM or TPU environment, JAX_PLATFORMS or a PJRT plugin list already chosen, no libtpu, or a
    JAX plugin other than CUDA/ROCm whose platform name we cannot know). Call before JAX is imported."""
    env = os.environ if env is None else env
    if "JAX_PLATFORMS" in env or "PJRT_NAMES_AND_LIBRARY_PATHS" in env:
        return None
    if any(k in env for k in TPU_ENV) or on_tpu_vm(env):
        return None
    if "TPU_LIBRARY_PATH" not in env and importlib.util.find_spec("libtpu") is None:
        return None
    plugins = [e.name for e in importlib.metadata.entry_points(group="jax_plugins")]
    try:
        import jax_plugins  # namespace package of PJRT plugins

        plugins += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if any("cuda" not in p and "rocm" not in p for p in plugins):
        return None
    # JAX skips `cuda` itself when no NVIDIA GPU is visible; ROCm needs its kernel driver.
    platforms = ["cuda"] * any("cuda" in p for p in plugins)
    platforms += ["rocm"] * (any("rocm" in p for p in plugins) and os.path.exists("/dev/kfd"))
    chosen = env["JAX_PLATFORMS"] = ",".join([*platforms, "cpu"])
    if env is os.environ and "jax" in sys.modules:  # imported already: JAX read the variable then
        sys.modules["jax"].config.update("jax_platforms", chosen)
    return chosen
