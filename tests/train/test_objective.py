"""The Trainer's extension point: an objective registered with its own loss and a frozen model rides along
(sharded, never updated, never checkpointed), through training, evaluation and resume."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import JaxllmError, ObjectiveConfig, SourceConfig
from jaxllm.data.objectives import batch_format, register_format
from jaxllm.models import bind
from jaxllm.train import objective as objective_mod
from jaxllm.train.frozen import FrozenSource
from jaxllm.train.loop import Trainer
from jaxllm.train.losses import pretraining_loss
from tests.train.test_loop import micro_config


def _kl_to_reference(params, graphdef, batch, norms, key, frozen, cfg):
    """clm loss + token-mean KL(policy || reference), the shape of a post-training loss with a frozen model."""
    objective, metrics = pretraining_loss(params, graphdef, batch, norms, cfg.train.z_loss, key, 0)
    policy = jax.nn.log_softmax(bind(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])[0])
    ref_model = frozen["reference"].bind()
    reference = jax.nn.log_softmax(ref_model(batch["inputs"], batch["positions"], batch["segment_ids"])[0])
    kl_BL = jnp.sum(jnp.exp(policy) * (policy - reference), axis=-1)
    kl = jnp.sum(kl_BL * batch["loss_mask"]) / norms["tokens"]
    return objective + 0.1 * kl, dict(metrics, kl=kl)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """A 4-step clm run: the frozen reference, and the policy's starting point."""
    run_dir = tmp_path_factory.mktemp("reference")
    trainer = Trainer(micro_config(run_dir, "train.steps=4"))
    try:
        trainer.run()
    finally:
        trainer.close()
    return run_dir


@pytest.fixture
def kl_objective(reference_run, monkeypatch):
    reference = str(reference_run)
    # A real method adds its name to ObjectiveConfig.name's choices in config/schema.py.
    monkeypatch.setitem(ObjectiveConfig.__annotations__, "name",
                        ObjectiveConfig.__annotations__["name"].replace("'ul2'", "'ul2', 'test_kl'"))
    objective_mod.register(objective_mod.Objective(
        "test_kl", ("decoder",), _kl_to_reference,
        frozen_models=lambda cfg: {"reference": FrozenSource(reference, "bfloat16")}))
    register_format("test_kl", batch_format("clm"))
    yield
    objective_mod._OBJECTIVES.pop("test_kl")


def _kl_config(run_dir, reference_run, *extra):
    cfg = micro_config(run_dir, f"train.init_from={reference_run}", "train.steps=6", "checkpoint.every=3", *extra)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, objective=ObjectiveConfig(name="test_kl")))


def test_a_frozen_model_rides_along_and_is_never_updated_or_saved(kl_objective, reference_run, tmp_path):
    cfg = _kl_config(tmp_path / "kl", reference_run)
    trainer = Trainer(cfg)
    try:
        frozen = trainer.frozen["reference"]
        start = jax.tree.map(np.asarray, trainer.state.params)
        # bf16 as its FrozenSource asked, sharded like the policy (same rules, same mesh).
        assert {a.dtype for a in jax.tree.leaves(frozen.params)} == {jnp.dtype(jnp.bfloat16)}
        assert jax.tree.map(lambda a: a.sharding.spec, frozen.params) == jax.tree.map(
            lambda s: s.spec, trainer.state_shardings.params)
        jax.tree.map(lambda f, p: np.testing.assert_array_equal(np.asarray(f), p.astype(jnp.bfloat16)),
                     frozen.params, start)
        first = jax.device_get(trainer.train_step(trainer.next_batch()))
        # The policy starts from the reference: the KL is that of bf16 rounding, ~0.
        assert 0 <= float(first["kl"]) < 1e-3
        before = jax.tree.map(np.asarray, frozen.params)
        summary = trainer.run()
        assert summary["end_step"] == 6
        jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, trainer.frozen["reference"].params))
        moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), trainer.state.params, start)
        assert max(jax.tree.leaves(moved)) > 0
        # The checkpoint holds the trained state only; the optimizer state covers the policy only.
        saved = trainer.checkpointer.restore_meta(6)
        assert saved.config.data.objective.name == "test_kl"
        assert set(trainer.state.params) == set(start)
        # AdamW's two moments of the policy, and a few counters: no state for the frozen model.
        size = lambda tree: sum(a.size for a in jax.tree.leaves(tree))  # noqa: E731
        assert 2 * size(start) <= size(trainer.state.opt_state) < 2 * size(start) + 16
    finally:
        trainer.close()


def test_evaluation_and_resume_with_a_frozen_model(kl_objective, reference_run, tmp_path):
    run_dir = tmp_path / "kl"
    cfg = _kl_config(run_dir, reference_run, "eval.batches=2")
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, sources=[SourceConfig(path="builtin:kjv-valid")]))
    straight = Trainer(cfg)
    try:
        straight_summary = straight.run()
        straight_params = jax.tree.map(np.asarray, straight.state.params)
    finally:
        straight.close()
    assert straight_summary["eval_loss"] > 0
    resumed_dir = tmp_path / "resumed"
    cfg = dataclasses.replace(cfg, run_dir=str(resumed_dir))
    first = Trainer(cfg)
    try:
        first.run(stop_at_step=3)
    finally:
        first.close()
    second = Trainer(cfg)  # resumes at step 3, loading the frozen model again
    try:
        assert second.step == 3
        summary = second.run()
        jax.tree.map(np.testing.assert_array_equal, straight_params, jax.tree.map(np.asarray, second.state.params))
    finally:
        second.close()
    assert summary["losses"][6] == straight_summary["losses"][6]


def test_an_objective_that_does_not_fit_the_model_names_the_ones_that_do(tmp_path):
    cfg = micro_config(tmp_path / "x")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, objective=ObjectiveConfig(name="span")))
    with pytest.raises(JaxllmError, match="data.objective.name=span trains a model.arch=encoder_decoder.*use "
                                          "data.objective.name=clm"):
        Trainer(cfg)


def test_a_frozen_model_from_a_hugging_face_directory_is_read_in_its_dtype_with_the_trainers_rules(tmp_path):
    from jaxllm import models, sharding
    from jaxllm.config import MeshConfig
    from jaxllm.convert.hf import save_hf
    from jaxllm.train.frozen import load_frozen
    from tests.conftest import random_params, tiny_model_config

    cfg = dataclasses.replace(tiny_model_config(), family="llama")
    params = random_params(cfg)
    save_hf(params, cfg, tmp_path / "hf")
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    rules = sharding.make_rules([["mlp", None]])  # this trainer keeps MLP weights whole on the tensor axis
    frozen = load_frozen(tmp_path / "hf", mesh, rules, "bfloat16")
    assert frozen.cfg.param_dtype == "bfloat16"
    assert {a.dtype for a in jax.tree.leaves(frozen.params)} == {jnp.dtype(jnp.bfloat16)}
    expected = models.sharded_spec(frozen.cfg, mesh, rules)[2]
    assert jax.tree.map(lambda a: a.sharding.spec, frozen.params) == jax.tree.map(lambda s: s.spec, expected)
    jax.tree.map(lambda f, p: np.testing.assert_array_equal(np.asarray(f), np.asarray(p).astype(jnp.bfloat16)),
                 frozen.params, params)
