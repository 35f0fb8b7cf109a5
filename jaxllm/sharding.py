"""Device mesh, the logical-axis rules table, and helpers that place arrays by logical names.

Parameters and activations are named with logical axes ("embed", "mlp", "batch", ...). The rules
table maps each logical name to mesh axes. The model never mentions a mesh axis; everything about
placement is decided here, in one table, overridable from the config (`mesh.rules`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxllm.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical name -> mesh axis, tuple of mesh axes, or None (replicated). First match wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("relative_buckets", None),
    ("embed_factor", None),
    ("expert", "expert"),
    # activations. The expert axis splits the batch too: outside the experts it is data parallelism.
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
)

Rules = tuple[tuple[str, Any], ...]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("jaxllm_mesh", default=None)


def make_rules(extra: Sequence[Sequence[Any]] = ()) -> Rules:
    """The default rules with `extra` ([name, axes] pairs from `mesh.rules`) taking precedence."""
    out = []
    for i, rule in enumerate(extra):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"mesh.rules.{i} must be [logical_name, mesh_axis_or_list_or_null], got {rule!r}")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, list) else axes
        for ax in (axes if isinstance(axes, tuple) else (axes,)):
            if ax is not None and ax not in MESH_AXES:
                raise ConfigError(f"mesh.rules.{i}: unknown mesh axis {ax!r}; mesh axes are {', '.join(MESH_AXES)}")
        out.append((name, axes))
    return tuple(out) + DEFAULT_RULES


def rule_axes(rules: Rules, name: str | None) -> tuple[str, ...]:
    """The mesh axes the first rule for logical axis `name` maps it to; () when replicated or unnamed."""
    for rule_name, axes in rules if name is not None else ():
        if rule_name == name:
            return (axes,) if isinstance(axes, str) else tuple(axes or ())
    return ()


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
    """The (data, fsdp, tensor, expert) mesh shape: resolves the -1 entry within one slice
    (num_devices / dcn_data devices) and checks the product; the returned data size includes the
    dcn_data slices."""
    slices = cfg.dcn_data
    if num_devices % slices:
        raise ConfigError(
            f"mesh.dcn_data={slices} slices do not divide the {num_devices} devices; "
            f"set mesh.dcn_data to the number of slices (TPU) or nodes (GPU)"
        )
    per_slice = num_devices // slices
    where = f"{per_slice} devices per slice" if slices > 1 else f"{per_slice} devices"
    sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.expert]
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if per_slice % known:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed sizes multiply to {known}, which does not divide "
                f"the {where}; choose sizes whose product divides {per_slice}"
            )
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ConfigError(
            f"mesh data*fsdp*tensor*expert = {'*'.join(map(str, sizes))} = {math.prod(sizes)}, but there are "
            f"{where}; make the product {per_slice} or set one size to -1 to take the rest"
        )
    return (slices * sizes[0], sizes[1], sizes[2], sizes[3])


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, expert) over `devices` (default: all devices of all processes).

    Devices are laid out by `mesh_utils` so that on TPU each axis follows the physical torus. With
    `cfg.dcn_data` > 1 the mesh is hybrid: slices (TPU `slice_index`; elsewhere processes) stacked
    along `data`, the ICI axes inside each slice. Axes are `Auto`: the compiler (GSPMD/Shardy)
    propagates shardings from the ones we pin.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    if cfg.dcn_data > 1:
        array = _hybrid_device_array(cfg.dcn_data, (shape[0] // cfg.dcn_data, *shape[1:]), devices)
    else:
        try:
            array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            # Shapes the topology-aware layout does not handle (e.g. a subset of a TPU slice): keep device order.
            array = np.asarray(devices).reshape(shape)
    return Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _hybrid_device_array(slices: int, ici_shape: tuple[int, ...], devices: list[jax.Device]) -> np.ndarray:
    by_slice = getattr(devices[0], "slice_index", None) is not None
    granules = {d.slice_index if by_slice else d.process_index for d in devices}
    if len(granules) != slices:
        kind = "TPU slices" if by_slice else "processes (one per node)"
        raise ConfigError(
            f"mesh.dcn_data={slices}, but the devices belong to {len(granules)} {kind}; "
            f"set mesh.dcn_data={len(granules)}, or 1 for a single slice"
        )
    dcn_shape = (slices,) + (1,) * (len(ici_shape) - 1)
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=not by_slice, allow_split_physical_axes=True
    )


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """Maps logical axis names to a PartitionSpec. A mesh axis is used at most once per array, and
    only where it divides the dimension (else that dimension stays replicated: e.g. 4 heads on an
    8-way tensor axis)."""
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        chosen = []
        for ax in rule_axes(rules, name):
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(ax)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return P(*spec)


def named_sharding(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def tree_shardings(abstract: Any, logical: Any, mesh: Mesh, rules: Rules) -> Any:
    """Shardings for a pytree of ShapeDtypeStructs given a matching pytree of logical-name tuples."""
    return jax.tree.map(
        lambda a, names: named_sharding(names or (None,) * len(a.shape), a.shape, mesh, rules),
        abstract,
        logical,
        is_leaf=lambda x: isinstance(x, tuple) or x is None,
    )


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `constrain` place activations on `mesh` by `rules` (used while tracing model code)."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> tuple[Mesh, Rules] | None:
    """The (mesh, rules) of the enclosing `activate`, or None (code that must place work itself:
    the `shard_map` of dropless MoE)."""
    return _ACTIVE.get()


def active_platform() -> str:
    """The platform of the active mesh's devices (compile-only TPU devices count as "tpu"), else
    JAX's default backend."""
    current = _ACTIVE.get()
    if current is not None:
        return current[0].devices.flat[0].platform
    return jax.default_backend()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Pins an activation's sharding by logical names; a no-op outside `activate`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(names, x.shape, mesh, rules))


def shard_map_by_names(fn, in_names, out_names):
    """`fn` applied per device under the active mesh (`activate`), its inputs and outputs split by
    logical names; outside a mesh, `fn` itself. For kernels the compiler cannot partition (Pallas)."""
    active = _ACTIVE.get()
    if active is None:
        return fn
    mesh, rules = active

    def wrapped(*args):
        shapes = tuple(a.shape for a in args)
        in_specs = tuple(logical_to_spec(n, s, mesh, rules) for n, s in zip(in_names, shapes))
        out_spec = logical_to_spec(out_names, shapes[0], mesh, rules)
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)

    return wrapped


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
    """The mesh axes that split a batch: those of the `batch` rule with more than one device (no
    expert axis when mesh.expert=1). Input shardings, the data-parallel size and the batch check all
    come from here."""
    return tuple(ax for ax in rule_axes(rules, "batch") if mesh.shape[ax] > 1)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(batch_axes(mesh, rules) or None, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways a batch is split: the product of `batch_axes`."""
    return math.prod(mesh.shape[ax] for ax in batch_axes(mesh, rules))


def check_batch_divides(batch_size: int, grad_accum: int, mesh: Mesh, rules: Rules) -> None:
    dp = data_parallel_size(mesh, rules)
    micro = batch_size // grad_accum
    if micro % dp:
        raise ConfigError(
            f"micro-batch of {micro} sequences (train.batch_size={batch_size} / train.grad_accum={grad_accum}) "
            f"does not divide over the {dp} data-parallel devices (mesh {'*'.join(batch_axes(mesh, rules))}); "
            f"use a batch size that is a multiple of {dp * grad_accum}"
        )
    if batch_size % jax.process_count():
        raise ConfigError(
            f"train.batch_size={batch_size} does not divide over {jax.process_count()} processes"
        )
