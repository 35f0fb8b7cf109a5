import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxllm import models, sharding
from jaxllm.config import MeshConfig, OptimConfig
from jaxllm.train.optim import decay_mask, make_optimizer, make_schedule, opt_state_shardings
from jaxllm.train.losses import cross_entropy
from jaxllm.train.step import TrainState, train_step
from tests.conftest import lm_loss, tiny_model_config


def _batch(cfg, batch=4, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
    mask = np.ones((batch, length), np.float32)
    mask[:, -3:] = 0  # some positions carry no loss
    return {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.ones((batch, length), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
        "loss_mask": jnp.asarray(mask),
    }


def _state(cfg, optim=OptimConfig(warmup_steps=0)):
    model = models.create_model(cfg, seed=0)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    tx = make_optimizer(optim, 100)
    return graphdef, tx, make_schedule(optim, 100), TrainState(
        step=jnp.int32(0), params=params, opt_state=tx.init(params), skipped=jnp.int32(0)
    )


def test_cross_entropy_matches_manual():
    logits = jnp.array([[[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]]])
    targets = jnp.array([[0, 2]])
    mask = jnp.array([[1.0, 1.0]])
    nll, zl = cross_entropy(logits, targets, mask, z_loss=0.1)
    manual = -jax.nn.log_softmax(logits[0, 0])[0] - jax.nn.log_softmax(logits[0, 1])[2]
    np.testing.assert_allclose(nll, manual, rtol=1e-6)
    lse = jax.nn.logsumexp(logits, axis=-1)
    np.testing.assert_allclose(zl, 0.1 * jnp.sum(lse**2), rtol=1e-6)


def test_masked_targets_do_not_affect_loss():
    cfg = tiny_model_config()
    graphdef, tx, schedule, state = _state(cfg)
    step = jax.jit(functools.partial(train_step, frozen={}, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=1, loss=lm_loss()))
    batch = _batch(cfg)
    changed = dict(batch, targets=batch["targets"].at[:, -3:].set(7))
    _, m1 = step(state, batch)
    _, m2 = step(state, changed)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    assert m1["tokens"] == 4 * 13


def test_gradient_accumulation_equals_one_big_batch():
    cfg = tiny_model_config()
    graphdef, _, schedule, state = _state(cfg)
    # Plain SGD with lr 1: the update is the gradient itself (Adam would amplify float noise in
    # near-zero gradients into +-lr updates).
    tx = optax.sgd(1.0)
    state = state.replace(opt_state=tx.init(state.params))
    batch = _batch(cfg, batch=4)
    batch["loss_mask"] = batch["loss_mask"].at[0, :8].set(0)  # unequal token counts per micro-batch
    outs = []
    for accum in (1, 2, 4):
        step = functools.partial(train_step, frozen={}, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=accum, loss=lm_loss())
        outs.append(jax.jit(step)(state, batch))
    for new_state, metrics in outs[1:]:
        np.testing.assert_allclose(metrics["loss"], outs[0][1]["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], outs[0][1]["grad_norm"], rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), new_state.params, outs[0][0].params)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion"])
def test_optimizers_fit_a_fixed_batch(name):
    cfg = tiny_model_config()
    lr = {"adamw": 3e-3, "adafactor": 1e-2, "lion": 3e-4}[name]
    graphdef, tx, schedule, state = _state(cfg, OptimConfig(name=name, lr=lr, warmup_steps=0, schedule="constant"))
    step = jax.jit(functools.partial(train_step, frozen={}, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=1, loss=lm_loss()))
    batch = _batch(cfg)
    losses = []
    for _ in range(8):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    assert int(state.step) == 8


def test_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    s = make_schedule(cfg, 110)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 0.55, rtol=1e-5)  # halfway down the cosine
    np.testing.assert_allclose(float(s(110)), 0.1, rtol=1e-5)
    lin = make_schedule(OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.0, schedule="linear"), 110)
    np.testing.assert_allclose(float(lin(60)), 0.5, rtol=1e-5)


def test_weight_decay_skips_norms_and_biases():
    params = {"norm": {"scale": 1.0}, "dense": {"kernel": 1.0, "bias": 0.0}, "embed": {"embedding": 1.0}}
    assert decay_mask(params) == {"norm": {"scale": False}, "dense": {"kernel": True, "bias": False}, "embed": {"embedding": True}}


def test_optimizer_state_follows_parameter_sharding():
    cfg = tiny_model_config()
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = sharding.make_rules()
    _, abstract, logical = models.model_spec(cfg)
    shardings = sharding.tree_shardings(abstract, logical, mesh, rules)
    tx = make_optimizer(OptimConfig(), 10)
    opt_sh = opt_state_shardings(jax.eval_shape(tx.init, abstract), abstract, shardings, mesh)
    specs = [s.spec for s in jax.tree.leaves(opt_sh)]
    # Adam's mu and nu for the q kernel are sharded like it; the step count is replicated.
    assert specs.count(P(None, "fsdp", "tensor", None)) == 2 * 3  # q, k, v kernels x (mu, nu)
    assert P() in specs


@pytest.mark.parametrize("chunk", [3, 4, 16])
def test_chunked_cross_entropy_equals_full(chunk):
    """Same loss and gradients whether logits are computed whole or `chunk` positions at a time
    (3 does not divide the length 10: the padded tail must not count)."""
    from jaxllm.train.losses import chunked_cross_entropy

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (2, 10, 8))
    w = jax.random.normal(k2, (8, 37))
    targets = jax.random.randint(k3, (2, 10), 0, 37)
    mask = jnp.ones((2, 10)).at[1, 7:].set(0)

    def loss(w, x, chunk):
        nll, zl = chunked_cross_entropy(x, lambda h: h @ w, targets, mask, 1e-2, chunk)
        return nll + zl

    full, grads_full = jax.value_and_grad(loss, argnums=(0, 1))(w, x, 0)
    part, grads_part = jax.value_and_grad(loss, argnums=(0, 1))(w, x, chunk)
    np.testing.assert_allclose(part, full, rtol=1e-6)
    for a, b in zip(grads_part, grads_full):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_with_chunked_loss_matches_whole_loss():
    cfg = tiny_model_config()
    graphdef, tx, schedule, state = _state(cfg)
    batch = _batch(cfg, length=16)
    outs = [jax.jit(functools.partial(train_step, frozen={}, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=1,
                                      loss=lm_loss(loss_chunk=chunk)))(state, batch) for chunk in (0, 5)]
    np.testing.assert_allclose(outs[0][1]["loss"], outs[1][1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(outs[0][1]["grad_norm"], outs[1][1]["grad_norm"], rtol=1e-5)


@pytest.mark.parametrize("poison", [jnp.nan, jnp.inf])
def test_a_nonfinite_loss_leaves_the_state_unchanged_and_is_counted(poison):
    cfg = tiny_model_config()
    graphdef, tx, schedule, state = _state(cfg)
    step = jax.jit(functools.partial(train_step, frozen={}, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=1, loss=lm_loss()))
    batch = _batch(cfg)
    good, metrics = step(state, batch)
    assert bool(metrics["finite"]) and int(good.skipped) == 0
    bad, metrics = step(good, dict(batch, loss_mask=batch["loss_mask"].at[1, 2].set(poison)))
    assert not bool(metrics["finite"]) and int(metrics["skipped_updates"]) == 1
    assert int(bad.step) == 2 and int(bad.skipped) == 1
    jax.tree.map(np.testing.assert_array_equal, (bad.params, bad.opt_state), (good.params, good.opt_state))
    after, metrics = step(bad, batch)  # and training goes on from there
    assert bool(metrics["finite"]) and int(after.skipped) == 1
