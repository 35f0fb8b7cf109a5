import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import models, sharding
from jaxllm.config import ConfigError, MeshConfig
from tests.conftest import tiny_model_config


def test_mesh_fills_the_rest():
    mesh = sharding.make_mesh(MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


@pytest.mark.parametrize(
    "mesh, message",
    [
        (MeshConfig(data=3, fsdp=1, tensor=1), "= 3, but there are 8 devices"),
        (MeshConfig(data=-1, fsdp=3, tensor=1), "does not divide the 8 devices"),
    ],
)
def test_impossible_mesh_is_a_clear_error(mesh, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(mesh)


def test_batch_must_divide_over_data_parallel_devices():
    mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2, tensor=1))
    with pytest.raises(ConfigError, match=r"over the 8 data-parallel devices \(mesh data\*fsdp\); .* multiple of 8"):
        sharding.check_batch_divides(12, 1, mesh, sharding.make_rules())
    sharding.check_batch_divides(16, 2, mesh, sharding.make_rules())


@pytest.mark.parametrize(
    "rules, axes",
    [([], ("data", "fsdp")), ([["batch", "data"]], ("data",)), ([["batch", ["tensor", "expert"]]], ("tensor",)),
     ([["batch", None]], ())],
)  # fmt: skip
def test_one_batch_rule_for_inputs_data_parallel_size_and_the_check(rules, axes):
    """A batch rule from the config moves the inputs, the data-parallel size and the batch check alike
    (mesh axes of one device drop out: expert=1 here)."""
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = sharding.make_rules(rules)
    dp = 2 ** len(axes)
    assert sharding.batch_axes(mesh, rules) == axes
    assert sharding.batch_sharding(mesh, rules, 2).spec == P(axes or None, None)
    assert sharding.data_parallel_size(mesh, rules) == dp
    sharding.check_batch_divides(dp, 1, mesh, rules)
    if dp > 1:
        named = re.escape("*".join(axes))
        with pytest.raises(ConfigError, match=rf"over the {dp} data-parallel devices \(mesh {named}\)"):
            sharding.check_batch_divides(dp + 1, 1, mesh, rules)


def test_logical_rules_and_divisibility_fallback():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = sharding.make_rules()
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh, rules) == P("fsdp", "tensor")
    # 3 heads do not divide over tensor=2: that dimension stays replicated instead of failing.
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (64, 3, 16), mesh, rules) == P("fsdp", None, None)
    assert sharding.logical_to_spec(("batch", "length"), (8, 5), mesh, rules) == P(("data", "fsdp"), None)
    override = sharding.make_rules([["embed", None], ["mlp", ["fsdp", "tensor"]]])
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 96), mesh, override) == P(None, ("fsdp", "tensor"))
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        sharding.make_rules([["embed", "model"]])


def test_params_are_born_sharded():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    cfg = tiny_model_config()
    _, params, _ = models.init_params(cfg, mesh, sharding.make_rules(), seed=0)
    q = params["layers"]["attn"]["q"]["kernel"]  # [layers, embed, heads, head_dim]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    emb = params["embed"]["embedding"]  # vocab 101 is odd: only the embed dim is sharded
    assert emb.sharding.spec == P(None, "fsdp")


def test_sharded_init_equals_unsharded_init():
    cfg = tiny_model_config()
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    _, sharded, _ = models.init_params(cfg, mesh, sharding.make_rules(), seed=5)
    one = sharding.make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    _, single, _ = models.init_params(cfg, one, sharding.make_rules(), seed=5)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, single)


def test_hybrid_mesh_puts_slices_on_the_outer_data_axis():
    """Two v5e 2x2 slices (compile-only devices from libtpu): data = 2 slices x 2, ICI axes inside a slice."""
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                           chips_per_host_bounds=(2, 2, 1), num_slices=2).devices
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1, dcn_data=2), devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1, "expert": 1}
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slice_of[:2] == slice_of[0, 0, 0, 0]).all() and (slice_of[2:] != slice_of[0, 0, 0, 0]).all()
    with pytest.raises(ConfigError, match="belong to 2 TPU slices; set mesh.dcn_data=2"):
        sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=1, dcn_data=4), devices)


def test_dcn_data_must_match_the_processes_on_cpu():
    # One process here: a hybrid mesh over two "nodes" cannot be made, and the error says why.
    with pytest.raises(ConfigError, match=r"belong to 1 processes \(one per node\); set mesh.dcn_data=1"):
        sharding.make_mesh(MeshConfig(data=-1, dcn_data=2))
