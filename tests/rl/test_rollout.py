"""Rollouts (jaxllm/rl/rollout.py): sampled completions and their log-probs, checked against a teacher-forced
forward pass, greedy generation, seeds, stop handling, compilation counts, an 8-device mesh and LoRA."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models, sharding
from jaxllm.config import GenerateConfig, JaxllmError, LoraConfig, MeshConfig
from jaxllm.infer.generate import generate
from jaxllm.models import lora
from jaxllm.rl import rollout as rollout_module
from jaxllm.rl.rollout import SamplingSettings, bucket, bucket_width, rollout
from tests.conftest import random_params, tiny_model_config

PAD = 0
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [42, 43, 44, 45]]  # ragged: left padding inside the 16-wide bucket
STOPS = tuple(range(1, 12))  # ~11% of the vocabulary: some rows stop early, some run to max_new_tokens
SAMPLED = SamplingSettings(num_generations=2, max_new_tokens=12, temperature=0.7, top_k=40, stop_ids=STOPS)


@pytest.fixture(scope="module")
def model():
    cfg = tiny_model_config()
    return cfg, models.model_spec(cfg)[0], random_params(cfg, std=0.3)


@pytest.fixture(scope="module")
def sampled(model):
    cfg, graphdef, params = model
    return rollout(graphdef, params, cfg, PROMPTS, SAMPLED, jax.random.key(3), PAD)


@functools.partial(jax.jit, static_argnames="graphdef")
def _teacher_forced_logps(params, tokens, segments, temperature, *, graphdef):
    """log_softmax(logits / temperature) of every next token of [prompt | completion] rows, one forward pass."""
    positions = jnp.maximum(jnp.cumsum(segments, axis=1) - 1, 0)
    logits, _ = models.bind(graphdef, params)(tokens, positions, segments)
    logps = jax.nn.log_softmax(logits[:, :-1] / temperature, axis=-1)
    return jnp.take_along_axis(logps, tokens[:, 1:, None], axis=-1)[..., 0]


def _forward_logps(graphdef, params, r, temperature):
    """The teacher-forced log-probs at the completion slots of rollout `r`: [N, T]."""
    tokens = np.concatenate([r.prompt_tokens, r.completion_tokens], axis=1)
    segments = np.concatenate([r.prompt_mask, r.completion_mask], axis=1)
    out = _teacher_forced_logps(params, tokens, segments, jnp.float32(temperature), graphdef=graphdef)
    return np.asarray(out)[:, r.prompt_tokens.shape[1] - 1:]


def test_logps_equal_a_teacher_forced_forward_pass(model, sampled):
    """With left padding (prompts of 7, 2 and 4 tokens in a 16-wide bucket) and ragged stops."""
    cfg, graphdef, params = model
    r = sampled
    assert r.prompt_tokens.shape == (6, 16) and r.completion_tokens.shape == (6, 12)
    np.testing.assert_array_equal(r.prompt_mask.sum(1), [7, 7, 2, 2, 4, 4])
    lengths = r.completion_mask.sum(1)
    assert r.truncated.any() and not r.truncated.all() and len(set(lengths[~r.truncated])) > 1, lengths
    expected = _forward_logps(graphdef, params, r, SAMPLED.temperature)
    mask = r.completion_mask > 0
    np.testing.assert_allclose(r.logps[mask], expected[mask], atol=1e-5, rtol=0)
    assert np.all(r.logps[~mask] == 0)


def test_stop_tokens_end_and_are_kept_in_the_completion(sampled):
    r = sampled
    for tokens, mask, truncated in zip(r.completion_tokens, r.completion_mask, r.truncated):
        n = int(mask.sum())
        np.testing.assert_array_equal(mask, np.arange(12) < n)  # a prefix
        stops_at = [i for i, t in enumerate(tokens) if t in STOPS]
        if truncated:
            assert n == 12 and not stops_at
        else:
            assert stops_at[0] == n - 1  # the mask ends at and includes the first stop token
            assert np.all(tokens[n:] == PAD)


def test_a_fixed_key_repeats_and_rows_of_one_prompt_differ(model, sampled):
    cfg, graphdef, params = model
    again = rollout(graphdef, params, cfg, PROMPTS, SAMPLED, jax.random.key(3), PAD)
    np.testing.assert_array_equal(again.completion_tokens, sampled.completion_tokens)
    np.testing.assert_array_equal(again.logps, sampled.logps)
    for i in range(0, 6, 2):  # the two samples of each prompt
        assert not np.array_equal(sampled.completion_tokens[i], sampled.completion_tokens[i + 1])
    other = rollout(graphdef, params, cfg, PROMPTS, SAMPLED, jax.random.key(4), PAD)
    assert not np.array_equal(other.completion_tokens, sampled.completion_tokens)


def test_greedy_equals_generate(model):
    """Temperature 0: the completions are generate's (which cuts the stop token), log-probs of the raw logits."""
    cfg, graphdef, params = model
    settings = dataclasses.replace(SAMPLED, temperature=0.0, top_k=0)
    r = rollout(graphdef, params, cfg, PROMPTS, settings, jax.random.key(0), PAD)
    expected = generate(graphdef, params, cfg, [p for p in PROMPTS for _ in range(2)],
                        GenerateConfig(max_new_tokens=12, temperature=0.0), list(STOPS), PAD)
    for tokens, mask, truncated, want in zip(r.completion_tokens, r.completion_mask, r.truncated, expected):
        got = tokens[mask > 0].tolist()
        assert (got if truncated else got[:-1]) == want
    forward = _forward_logps(graphdef, params, r, 1.0)
    np.testing.assert_allclose(r.logps[r.completion_mask > 0], forward[r.completion_mask > 0], atol=1e-5, rtol=0)


def test_one_compilation_per_bucket_and_filler_rows_change_no_sample(model, sampled):
    """Batches of 1-3 prompts of 1-16 tokens padded to rows=6 share the loop compiled for `sampled` (6 rows,
    16 wide); a 20-token prompt opens the 20-wide bucket. Filler rows change no real row's sample (row i
    samples from fold_in(key, i), whatever the batch around it)."""
    cfg, graphdef, params = model
    before = rollout_module._sample._cache_size()
    assert before >= 1  # `sampled`'s
    first_two = rollout(graphdef, params, cfg, PROMPTS[:2], SAMPLED, jax.random.key(3), PAD, rows=6)
    np.testing.assert_array_equal(first_two.completion_tokens, sampled.completion_tokens[:4])
    np.testing.assert_array_equal(first_two.logps, sampled.logps[:4])
    for batch in ([[9]], [list(range(1, 17)), [7, 8, 9, 10, 11]], [[2] * 12, [3, 4], [5] * 9]):
        out = rollout(graphdef, params, cfg, batch, SAMPLED, jax.random.key(1), PAD, rows=6)
        assert out.completion_tokens.shape == (2 * len(batch), 12) and out.prompt_tokens.shape[1] == 16
    assert rollout_module._sample._cache_size() == before
    wide = rollout(graphdef, params, cfg, [list(range(1, 21))], SAMPLED, jax.random.key(1), PAD, rows=6)
    assert wide.prompt_tokens.shape == (2, 20)
    assert rollout_module._sample._cache_size() == before + 1


def test_bucket_widths_and_bad_requests(model):
    cfg, graphdef, params = model  # context 64
    assert [bucket_width(n, cfg, 12) for n in (1, 16, 17, 33, 52)] == [16, 16, 20, 40, 52]
    assert bucket_width(30, cfg, 12, limit=28) == 30  # a limit never cuts a prompt
    # four steps per power of two: at most a quarter of a row is padding
    assert [bucket(n) for n in (16, 17, 21, 32, 33, 64, 65, 91, 129, 1000)] == [16, 20, 24, 32, 40, 64, 80, 96, 160, 1024]
    with pytest.raises(JaxllmError, match="a prompt of 53 tokens \\+ max_new_tokens 12 exceeds the model's context"):
        rollout(graphdef, params, cfg, [[1] * 53], SAMPLED, jax.random.key(0), PAD)
    with pytest.raises(JaxllmError, match="rows=4 is fewer than the 3 prompts x 2 generations = 6"):
        rollout(graphdef, params, cfg, PROMPTS, SAMPLED, jax.random.key(0), PAD, rows=4)
    with pytest.raises(JaxllmError, match="at least one token"):
        rollout(graphdef, params, cfg, [[1], []], SAMPLED, jax.random.key(0), PAD)
    with pytest.raises(JaxllmError, match="top_p in \\(0, 1\\] \\(1: off\\), got 0.7, 0 and 0.0"):
        rollout(graphdef, params, cfg, PROMPTS, SamplingSettings(temperature=0.7, top_p=0), jax.random.key(0), PAD)
    assert hash(SamplingSettings(stop_ids=[2, np.int64(3)])) == hash(SamplingSettings(stop_ids=(2, 3)))  # static
    with pytest.raises(JaxllmError, match="sample from a decoder language model .* this model is arch=decoder, head=reward"):
        rollout(graphdef, params, dataclasses.replace(cfg, head="reward"), PROMPTS, SAMPLED, jax.random.key(0), PAD)


def test_on_an_8_device_mesh_samples_equal_one_devices(model, sampled):
    """Parameters sharded data=2 x fsdp=4 as a train state's; rows split over both axes (6 rows -> 8)."""
    cfg, graphdef, params = model
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, tensor=1), jax.devices()[:8])
    rules = sharding.make_rules()
    placed = jax.device_put(params, models.sharded_spec(cfg, mesh, rules)[2])
    r = rollout(graphdef, placed, cfg, PROMPTS, SAMPLED, jax.random.key(3), PAD, mesh=mesh, rules=rules)
    np.testing.assert_array_equal(r.completion_tokens, sampled.completion_tokens)
    np.testing.assert_array_equal(r.completion_mask, sampled.completion_mask)
    np.testing.assert_allclose(r.logps, sampled.logps, atol=5e-5, rtol=0)  # reduction order differs


def test_lora_params_sample_from_the_adapted_model(model):
    """Adapters with non-zero B: the log-probs are the adapted model's, not the base's."""
    base_cfg, _, base_params = model
    cfg = dataclasses.replace(base_cfg, lora=LoraConfig(rank=4, alpha=8, targets="attn|mlp"))
    graphdef = models.model_spec(cfg)[0]
    params = lora.combine(base_params, lora.partition(random_params(cfg, seed=1, std=0.1), lora.is_adapter)[0])
    r = rollout(graphdef, params, cfg, PROMPTS, SAMPLED, jax.random.key(3), PAD)
    mask = r.completion_mask > 0
    adapted = _forward_logps(graphdef, params, r, SAMPLED.temperature)
    np.testing.assert_allclose(r.logps[mask], adapted[mask], atol=1e-5, rtol=0)
    # The base model: the adapters' B at zero (the same graph, so the forward pass compiled above serves).
    unadapted = jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.zeros_like(a) if path[-1].key == "lora_b" else a, params)
    base = _forward_logps(graphdef, unadapted, r, SAMPLED.temperature)
    assert np.abs(base[mask] - r.logps[mask]).max() > 0.1
