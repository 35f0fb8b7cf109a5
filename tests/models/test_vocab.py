"""resize_vocab: the token embedding, an untied head and a logits bias grow (new rows the mean of the old) or
shrink together, and sharded arrays keep their shardings (the grown model's logits: tests/convert/test_added_tokens.py)."""

import jax
import numpy as np
import pytest

from jaxllm import models, sharding
from jaxllm.config import MeshConfig
from jaxllm.models.vocab import grown_vocab_size, resize_vocab
from tests.conftest import random_params, tiny_model_config


def test_grown_vocab_size_is_a_multiple_of_128():
    assert [grown_vocab_size(n) for n in (1, 128, 129, 4098, 50259)] == [128, 128, 256, 4224, 50304]


def test_resize_grows_with_the_mean_and_keeps_shardings():
    cfg = tiny_model_config(vocab_size=256, d_model=16, num_layers=1, mlp_dim=32, tie_embeddings=False,
                            logits_bias=True)
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    target = models.sharded_spec(cfg, mesh, sharding.make_rules())[1]
    params = jax.tree.map(lambda a, t: jax.device_put(a, t.sharding), random_params(cfg), target)
    grown, grown_cfg = resize_vocab(params, cfg, 384)
    assert grown_cfg.vocab_size == 384
    for old, new, axis in [(params["embed"]["embedding"], grown["embed"]["embedding"], 0),
                           (params["lm_head"]["kernel"], grown["lm_head"]["kernel"], 1),
                           (params["lm_head"]["bias"], grown["lm_head"]["bias"], 0)]:
        assert new.shape[axis] == 384 and new.sharding == old.sharding  # P('tensor', 'fsdp') etc.
        kept, added = np.split(np.asarray(new), [256], axis=axis)
        np.testing.assert_array_equal(kept, np.asarray(old))
        mean = np.asarray(old).mean(axis=axis, keepdims=True)
        np.testing.assert_allclose(added, np.broadcast_to(mean, added.shape), rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, s: np.testing.assert_equal(a.shape, s.shape), grown, models.model_spec(grown_cfg)[1])

    shrunk, _ = resize_vocab(grown, grown_cfg, 255)  # 255 rows: the tensor axis no longer divides them
    np.testing.assert_array_equal(np.asarray(shrunk["embed"]["embedding"]), np.asarray(params["embed"]["embedding"])[:255])
    assert shrunk["embed"]["embedding"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")


@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
def test_resize_other_architectures_on_the_host(arch):
    cfg = tiny_model_config(arch=arch, vocab_size=100, d_model=16, num_layers=1, mlp_dim=32, tie_embeddings=True,
                            positions="learned" if arch == "encoder" else "relative")
    params = jax.tree.map(np.asarray, random_params(cfg))
    grown, grown_cfg = resize_vocab(params, cfg, 128)
    spec = models.model_spec(grown_cfg)[1]
    jax.tree.map(lambda a, s: np.testing.assert_equal(a.shape, s.shape), grown, spec)
    assert isinstance(grown["embed"]["embedding"], np.ndarray)
    np.testing.assert_allclose(grown["embed"]["embedding"][100:], np.broadcast_to(
        params["embed"]["embedding"].mean(0), (28, 16)), rtol=1e-5, atol=1e-7)
