"""Training mixture-of-experts decoders: exact gradient accumulation with the aux losses, expert-parallel
steps equal to one device, and the MoE metrics in metrics.jsonl."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxllm import models, sharding
from jaxllm.config import MeshConfig, MoEConfig
from jaxllm.train.metrics import read_metrics
from jaxllm.train.step import TrainState, train_step
from tests.conftest import lm_loss
from tests.conftest import random_params, tiny_model_config
from jaxllm.cli import main
from tests.train.test_objective_configs import CONFIGS, SMALL
from tests.train.test_step import _batch


def _cfg(dispatch, capacity_factor=1.0):
    moe = MoEConfig(num_experts=4, experts_per_token=2, every=2, dispatch=dispatch, capacity_factor=capacity_factor,
                    shared_mlp_dim=16, aux_loss_weight=0.1, z_loss_weight=0.01)
    return tiny_model_config(num_layers=2, d_model=32, mlp_dim=48, moe=moe)


def _step(graphdef, tx, grad_accum):
    return functools.partial(train_step, frozen={}, graphdef=graphdef, tx=tx, schedule=optax.constant_schedule(0.1),
                             grad_accum=grad_accum, loss=lm_loss())


def test_gradient_accumulation_is_exact_with_moe_losses():
    """Capacity dispatch that drops tokens, aux and z-losses on: 1, 2 and 4 micro-batches give the same
    loss, metrics and update (plain SGD)."""
    cfg = _cfg("capacity", capacity_factor=0.75)
    params = random_params(cfg, seed=1)
    graphdef = models.model_spec(cfg)[0]
    tx = optax.sgd(1.0)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), skipped=jnp.int32(0))
    batch = _batch(cfg, batch=4)
    batch["segment_ids"] = batch["segment_ids"].at[0, 10:].set(0)  # padding: fewer real tokens in row 0
    outs = [jax.jit(_step(graphdef, tx, accum))(state, batch) for accum in (1, 2, 4)]
    first = outs[0][1]
    assert float(first["moe_dropped_fraction"]) > 0
    assert abs(sum(float(first[f"moe_load/e{j}"]) for j in range(4)) - 1.0) < 1e-5
    for new_state, metrics in outs[1:]:
        for key in first:
            np.testing.assert_allclose(metrics[key], first[key], rtol=2e-5, atol=1e-7, err_msg=key)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), new_state.params, outs[0][0].params)


@pytest.mark.parametrize("dispatch, mesh_shape", [("dropless", (2, 1, 1, 4)), ("capacity", (1, 2, 2, 2))])
def test_expert_parallel_training_equals_one_device(dispatch, mesh_shape):
    """Three SGD steps with experts split over the expert axis give the losses and parameters of one device
    (SGD: Adam would blow float noise in near-zero gradients up to +-lr)."""
    cfg = _cfg(dispatch)
    graphdef, abstract, logical = models.model_spec(cfg)
    params = random_params(cfg, seed=0)
    tx = optax.sgd(0.5)
    batch = _batch(cfg, batch=8)

    def run(mesh):
        rules = sharding.make_rules()
        shardings = sharding.tree_shardings(abstract, logical, mesh, rules)
        placed = jax.device_put(params, shardings)
        state = TrainState(step=jnp.int32(0), params=placed, opt_state=tx.init(placed), skipped=jnp.int32(0))
        with sharding.activate(mesh, rules):
            step = jax.jit(_step(graphdef, tx, 1), in_shardings=(None, sharding.batch_sharding(mesh, rules, 2)))
            losses = []
            for _ in range(3):
                state, metrics = step(state, batch)
                losses.append(float(metrics["loss"]))
        return losses, jax.tree.map(np.asarray, state.params), state.params

    one_losses, one_params, _ = run(sharding.make_mesh(MeshConfig(1, 1, 1, 1), jax.devices()[:1]))
    ep_losses, ep_params, placed = run(sharding.make_mesh(MeshConfig(*mesh_shape)))
    assert placed["layers"]["moe"]["mlp"]["experts"]["down"].sharding.spec[1] == "expert"
    np.testing.assert_allclose(ep_losses, one_losses, rtol=1e-5)
    assert one_losses[-1] < one_losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), ep_params, one_params)


def test_tiny_moe_config_trains_on_an_expert_mesh_and_logs_moe_metrics(tmp_path):
    """configs/tiny-moe.yaml from the CLI (shrunk), experts split 2 ways, capacity dispatch."""
    args = ["train", str(CONFIGS / "tiny-moe.yaml"), *SMALL, "model.moe.expert_mlp_dim=64", "model.moe.every=2",
            "model.moe.dispatch=capacity", "mesh.data=4", "mesh.expert=2", f"run_dir={tmp_path}"]
    assert main(args) == 0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert min(r["loss"] for r in rows[-3:]) < rows[0]["loss"] - 0.5
    for r in rows:
        assert r["moe_aux_loss"] >= 0.99 and r["moe_z_loss"] > 0  # 1.0 = perfectly balanced
        assert 0 <= r["moe_dropped_fraction"] < 1
        assert abs(sum(r[f"moe_load/e{j}"] for j in range(8)) - 1.0) < 1e-4
