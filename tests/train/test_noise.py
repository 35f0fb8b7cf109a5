"""Embedding noise (train/noise.py, models/layers.py): NEFTune's scale and wiring, off in evaluation, generation
and frozen models; FGM / PGD go uphill at the documented number of passes; a Trainer run with both on."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models
from jaxllm.data.objectives import batch_spec
from jaxllm.config import AdversarialConfig, Config, ConfigError, TrainConfig, load_config
from jaxllm.models.layers import EmbeddingPerturbation, neftune_noise, perturb_embeddings, perturbed
from jaxllm.train.frozen import FrozenModel
from jaxllm.train.losses import normalizers
from jaxllm.train.metrics import read_metrics
from jaxllm.train.noise import embedding_shapes, uphill
from jaxllm.train.step import bound_loss, eval_step, train_step
from tests.conftest import tiny_model_config
from tests.train.test_loop import _train, micro_config
from tests.train.test_step import _batch, _state

CONFIGS = Path(__file__).parents[2] / "configs"
CFG = tiny_model_config(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32)


@functools.cache
def _tiny_state():
    """(graphdef, optimizer, schedule, step-0 state) of CFG, made once (eager initialisation is slow)."""
    return _state(CFG)


def test_neftune_noise_is_uniform_with_magnitude_alpha_over_sqrt_length_times_dim():
    alpha, dim = 5.0, 4096
    segments = jnp.array([[1, 1, 1, 1, 1, 1, 1, 1],  # one unpadded sequence: transformers' L = row length
                          [1, 1, 1, 1, 1, 1, 2, 2]])  # packed: each position's L is its sequence's length
    segments = jnp.concatenate([segments, jnp.array([[1, 1, 2, 2, 2, 3, 0, 0]])])  # and padding (0)
    noise = np.asarray(neftune_noise(jax.random.key(0), segments, dim, alpha))
    length = np.array([[8] * 8, [6] * 6 + [2] * 2, [2, 2, 3, 3, 3, 1, 0, 0]])
    for b in range(3):
        for i in range(8):
            if length[b, i] == 0:
                assert not noise[b, i].any()  # padding keeps its embedding
                continue
            mag = alpha / np.sqrt(length[b, i] * dim)
            x = noise[b, i]
            assert np.abs(x).max() <= mag * (1 + 1e-6)
            assert np.abs(x).max() > 0.99 * mag  # 4096 draws reach the edge of U(-mag, mag)
            np.testing.assert_allclose(x.std(), mag / np.sqrt(3), rtol=0.05)  # U(-m, m): std m / sqrt(3)
            assert abs(x.mean()) < 0.05 * mag
    # transformers' hook on an unpadded row: mag_norm = alpha / sqrt(seq_len * hidden)
    assert np.abs(noise[0]).max() <= alpha / np.sqrt(8 * dim) * (1 + 1e-6)
    same = np.asarray(neftune_noise(jax.random.key(0), segments, dim, alpha))
    np.testing.assert_array_equal(noise, same)  # a function of the key


def test_the_stacks_add_the_noise_of_their_call_and_never_with_a_cache_or_in_a_frozen_model():
    cfg = CFG
    graphdef, _, _, state = _tiny_state()
    batch = _batch(cfg, batch=2, length=8)
    tokens, positions, segments = batch["inputs"], batch["positions"], batch["segment_ids"]
    x = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))
    key = jax.random.key(3)
    with perturb_embeddings(EmbeddingPerturbation(key, 5.0)):
        first, second = perturbed(x, segments), perturbed(x, segments)
    for index, got in enumerate((first, second)):  # call i draws from fold_in(key, i)
        want = x + neftune_noise(jax.random.fold_in(key, index), segments, cfg.d_model, 5.0)
        np.testing.assert_allclose(got, want, rtol=1e-6)

    @jax.jit
    def forward(params):
        model = models.bind(graphdef, params)
        clean, _ = model(tokens, positions, segments)
        loud = EmbeddingPerturbation(key, 1e4)  # noise far larger than the embeddings
        with perturb_embeddings(loud):
            noisy, _ = model(tokens, positions, segments)
            cached, _ = model(tokens, positions, segments, cache=models.init_cache(cfg, 2, 8))  # generation's path
            frozen, _ = FrozenModel(params, graphdef, cfg).bind()(tokens, positions, segments)  # a teacher
        assert loud.calls == 1  # only the training-style call took the perturbation
        return clean, noisy, cached, frozen

    clean, noisy, cached, frozen = forward(state.params)
    assert np.abs(np.asarray(noisy - clean)).max() > 1.0
    np.testing.assert_allclose(cached, clean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(frozen, clean, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config, calls", [
    ("tiny.yaml", ["inputs"]),
    ("tiny-t5-span.yaml", ["encoder_inputs", "decoder_inputs"]),  # both halves, encoder first
    ("tiny-electra.yaml", ["inputs", "inputs"]),  # generator, then discriminator
])
def test_every_stack_of_the_trained_model_takes_one_perturbation_in_call_order(config, calls):
    cfg = load_config(CONFIGS / config)
    graphdef, abstract, _ = models.model_spec(cfg.model)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in batch_spec(cfg.data, 2).items()}
    loss = bound_loss(cfg)

    def perturbed_objective(params, batch, key, deltas, shapes):
        with perturb_embeddings(EmbeddingPerturbation(deltas=deltas, shapes=shapes)):
            return loss(params, graphdef, batch, normalizers(batch), key, {})

    shapes = embedding_shapes(perturbed_objective, abstract, batch, jax.random.key(0))  # traced only
    assert shapes == [(*batch[name].shape, cfg.model.embedding_dim) for name in calls]


def _step(**noise):
    graphdef, tx, schedule, state = _tiny_state()
    calls = []  # one per forward pass executed (a jax.debug.callback in the loss)

    def counted(*args):
        jax.debug.callback(lambda: calls.append(1))
        return bound_loss(Config(train=TrainConfig(loss_chunk=0)))(*args)

    step = jax.jit(functools.partial(train_step, frozen={}, graphdef=graphdef, tx=tx, schedule=schedule,
                                     grad_accum=1, loss=counted, **noise))
    return step, state, graphdef, calls


def test_neftune_is_on_in_the_train_step_only_and_deterministic_given_seed_and_step():
    cfg = CFG
    step, state, graphdef, calls = _step(neftune_noise_alpha=15.0)
    batch = _batch(cfg, batch=2, length=8)
    _, m1 = step(state, batch)
    _, again = step(state, batch)
    _, later = step(state.replace(step=jnp.int32(1)), batch)
    assert float(m1["loss"]) == float(again["loss"])  # same (seed, step): same noise (a resumed run repeats it)
    assert float(later["loss"]) != float(m1["loss"])
    # Evaluation with the same config takes no noise: the clean loss, as with NEFTune off.
    evals = []
    for alpha in (15.0, 0.0):
        loss = bound_loss(Config(train=TrainConfig(loss_chunk=0, neftune_noise_alpha=alpha)))
        sums = eval_step(state.params, batch, {}, graphdef=graphdef, loss=loss)
        evals.append(float(sums["nll_sum"] / sums["tokens"]))
    assert evals[0] == evals[1]
    assert abs(evals[0] - float(m1["loss"])) > 1e-3  # while the train step's loss is the noisy one
    jax.effects_barrier()
    assert len(calls) == 3  # one forward and backward pass per train step


@pytest.mark.parametrize("adversarial, passes", [(AdversarialConfig(method="fgm", epsilon=0.5), 2),
                                                 (AdversarialConfig(method="pgd", epsilon=0.5, steps=3), 4)])
def test_adversarial_steps_go_uphill_at_the_documented_passes(adversarial, passes):
    cfg = CFG
    step, state, graphdef, calls = _step(adversarial=adversarial)
    batch = _batch(cfg, batch=2, length=8)
    _, metrics = step(state, batch)
    jax.effects_barrier()
    assert len(calls) == passes  # FGM: clean + 1, PGD: clean + steps forward and backward passes
    clean = float(metrics["loss"])
    assert float(metrics["adv_loss"]) > clean + 0.05, (float(metrics["adv_loss"]), clean)

    if adversarial.method == "pgd":
        return
    # The FGM direction beats a random one of the same norm (the perturbation follows the gradient), and the
    # step's adversarial loss is the loss at exactly that delta.
    loss = bound_loss(Config(train=TrainConfig(loss_chunk=0)))

    @jax.jit
    def losses(params):
        def loss_at(delta):
            with perturb_embeddings(EmbeddingPerturbation(deltas=[delta])):
                return loss(params, graphdef, batch, normalizers(batch), jax.random.key(0), {})[1]["loss"]

        zero = jnp.zeros((2, 8, cfg.d_model))
        fgm = uphill(zero, jax.grad(loss_at)(zero), 0.5, 0.5)
        random = uphill(zero, jax.random.normal(jax.random.key(7), zero.shape), 0.5, 0.5)
        return jnp.sqrt(jnp.sum(fgm**2, axis=(1, 2))), loss_at(fgm), loss_at(random)

    norms, at_fgm, at_random = losses(state.params)
    np.testing.assert_allclose(norms, [0.5, 0.5], rtol=1e-5)  # on the ball's surface
    assert float(at_fgm) > float(at_random) + 0.05
    np.testing.assert_allclose(float(metrics["adv_loss"]), float(at_fgm), rtol=1e-5)


def test_trainer_runs_with_neftune_and_fgm_and_logs_the_adversarial_loss(tmp_path):
    cfg = micro_config(tmp_path, "train.steps=3", "train.sample_prompt=null", "train.neftune_noise_alpha=5",
                       "train.adversarial.method=fgm", "train.adversarial.epsilon=0.5", "model.num_layers=1")
    summary, _ = _train(cfg, devices=jax.devices()[:1])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["adv_loss"]) and r["adv_loss"] > r["loss"] for r in rows), rows


@pytest.mark.parametrize("override, message", [
    ("train.neftune_noise_alpha=-1", r"train.neftune_noise_alpha must be >= 0 \(0 = off; NEFTune: 5, 10 or 15\)"),
    ("train.adversarial.epsilon=0", r"train.adversarial.epsilon must be > 0 \(e.g. 1.0"),
    ("train.adversarial.steps=0", r"train.adversarial.steps must be >= 1, got 0"),
    ("train.adversarial.step_size=-0.1", r"train.adversarial.step_size must be > 0 \(e.g. epsilon / steps"),
    ("train.adversarial.weight=0", r"train.adversarial.weight must be > 0 \(e.g. 1.0; loss = clean \+ weight"),
    ("train.adversarial.method=fgsm", r"train.adversarial.method must be one of fgm, pgd, got 'fgsm'; did you mean"),
])
def test_bad_noise_settings_are_one_line_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
