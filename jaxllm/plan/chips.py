"""TPU generations and topology names: `v5p-128` -> 64 chips in a 4x4x4 torus, with the chip's memory,
peak FLOP/s and bandwidths, and the compile-only devices libtpu describes for it.

Names follow Cloud TPU: v4 and v5p count TensorCores (2 per chip: `v5p-128` is 64 chips), v5e and
v6e count chips (`v5e-16` is 16 chips; `v5litepod-16` is the same). A raw libtpu topology string
(`v5p:4x4x4`) is accepted too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from jaxllm.config import ConfigError
from jaxllm.platforms import on_tpu_vm

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. Bandwidths are the published per-chip figures (bytes/s): HBM, and the
    total inter-chip interconnect (ICI) over all links. DCN is an assumption: ~50 Gbit/s per chip."""

    generation: str  # libtpu's topology prefix
    hbm_bytes: int
    peak_flops: float  # bf16 FLOP/s
    hbm_bw: float
    ici_bw: float
    cores_per_chip: int  # TensorCores counted by the slice name
    torus_dims: int  # 3 (v4, v5p) or 2 (v5e, v6e)
    chip_config: str  # libtpu's chip_config_name: megacore = one JAX device per chip
    dcn_bw: float = 6.25e9

    @property
    def host_type(self) -> str:
        """The accelerator type of one host of this generation (TPU_ACCELERATOR_TYPE), e.g. v5p-8."""
        return f"{'v5litepod' if self.generation == 'v5e' else self.generation}-{4 * self.cores_per_chip}"


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 275e12, 1228e9, 2400e9 / 8, 2, 3, "megacore"),
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 1600e9 / 8, 1, 2, "default"),
    "v5p": Chip("v5p", 95 * GiB, 459e12, 2765e9, 4800e9 / 8, 2, 3, "megacore"),
    "v6e": Chip("v6e", 32 * GiB, 918e12, 1640e9, 3584e9 / 8, 1, 2, "default"),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e", "v5": "v5p"}

# Standard slice shapes by chip count (Cloud TPU's shapes for each slice size).
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
             256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice (or `slices` identical slices joined over DCN)."""

    name: str  # as the user wrote it, e.g. v5p-128
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus axis of one slice
    slices: int = 1

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def chips(self) -> int:
        return self.chips_per_slice * self.slices

    @property
    def libtpu_name(self) -> str:
        return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

    def describe(self) -> str:
        slices = f" x {self.slices} slices" if self.slices > 1 else ""
        return f"{self.name}: {self.chips_per_slice} {self.chip.generation} chips ({self.libtpu_name}){slices}"


def parse_topology(name: str, slices: int = 1) -> Topology:
    """`v5p-128`, `v5e-16`, `v5litepod-16`, `v6e-256`, `v4-32` or `v5p:4x4x4` -> Topology."""
    if slices < 1:
        raise ConfigError(f"--slices must be >= 1, got {slices}")
    text = name.strip().lower()
    raw = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", text)
    if raw:
        chip = _chip(raw.group(1), name)
        shape = tuple(int(n) for n in raw.group(2).split("x"))
        if len(shape) != chip.torus_dims:
            raise ConfigError(f"topology {name}: {chip.generation} slices have {chip.torus_dims} torus axes")
        return Topology(name, chip, shape, slices)
    named = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if not named:
        raise ConfigError(f"topology {name!r} is not a TPU slice name; use e.g. v5p-128, v5e-16, v6e-64 or v5p:4x4x4")
    chip = _chip(named.group(1), name)
    count = int(named.group(2))
    if count % chip.cores_per_chip:
        raise ConfigError(f"topology {name}: {chip.generation} names count TensorCores, 2 per chip; use an even number")
    chips = count // chip.cores_per_chip
    shapes = SHAPES_3D if chip.torus_dims == 3 else SHAPES_2D
    if chips not in shapes:
        sizes = ", ".join(f"{chip.generation}-{n * chip.cores_per_chip}" for n in shapes)
        raise ConfigError(f"topology {name}: no standard {chip.generation} slice has {chips} chips; choose one of {sizes}")
    return Topology(name, chip, shapes[chips], slices)


def _chip(prefix: str, name: str) -> Chip:
    key = ALIASES.get(prefix, prefix)
    if key not in CHIPS:
        raise ConfigError(f"topology {name}: unknown TPU generation {prefix!r}; known: {', '.join(CHIPS)}")
    return CHIPS[key]


def topology_devices(topology: Topology) -> list:
    """Compile-only devices of `topology` (no TPU needed; libtpu must be installed: pip install -e .[plan])."""
    # Compile-only use touches no chip, so several planners (or tests) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not on_tpu_vm(os.environ):
        # Off a TPU VM libtpu finds no accelerator type or worker list in the VM metadata and prints
        # warnings and an INVALID_ARGUMENT block; compile-only devices need neither, so name one host.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", topology.chip.host_type)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    # Hosts hold 4 chips (2x2x1) in pod slices; smaller slices are one host.
    host = tuple(min(2 if i < 2 else 1, n) for i, n in enumerate(topology.shape))
    host = host + (1,) * (3 - len(host))
    try:
        desc = topologies.get_topology_desc(
            platform="tpu",
            topology_name=topology.libtpu_name,
            chip_config_name=topology.chip.chip_config,
            chips_per_host_bounds=host,
            num_slices=topology.slices,
        )
    except Exception as e:  # libtpu missing, or a name it rejects; JAX raises several types
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        missing = importlib.util.find_spec("libtpu") is None
        fix = "install the TPU compiler: pip install -e '.[plan]' (libtpu; no TPU needed)" if missing else \
            "check the topology name and that libtpu matches this JAX (pip install -e '.[plan]')"
        raise ConfigError(f"cannot describe TPU topology {topology.libtpu_name}: {message}; {fix}") from None
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise ConfigError(f"libtpu describes {len(devices)} devices for {topology.describe()}, expected {topology.chips}")
    return devices
