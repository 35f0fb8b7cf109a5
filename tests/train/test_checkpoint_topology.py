"""A checkpoint saved on one mesh restores on another: (2,2,2) -> (1,8,1) -> one device, same parameters,
each device reading only its own shard."""

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxllm.infer.load import load_model
from jaxllm.train.loop import Trainer
from tests.train.test_loop import micro_config


def _params(trainer):
    return jax.tree.map(np.asarray, trainer.state.params)


def test_checkpoint_moves_between_meshes(tmp_path):
    cfg = micro_config(tmp_path, "train.steps=2", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    trainer = Trainer(cfg)
    try:
        trainer.run()
        saved = _params(trainer)
        saved_mu = jax.tree.map(np.asarray, trainer.state.opt_state)
    finally:
        trainer.close()

    # The same run resumed on a (1, 8, 1) mesh: parameters and optimizer state land in the new shardings.
    wide = Trainer(micro_config(tmp_path, "train.steps=2", "mesh.data=1", "mesh.fsdp=8", "mesh.tensor=1"))
    try:
        assert wide.step == 2
        jax.tree.map(np.testing.assert_array_equal, _params(wide), saved)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, wide.state.opt_state), saved_mu)
        q = wide.state.params["layers"]["attn"]["q"]["kernel"]  # [layers, embed=32, heads, head_dim]
        assert q.sharding.spec == P(None, "fsdp", None, None)
        # Each device was handed only its 1/8 of the embedding dimension, never the whole array.
        assert {s.data.shape for s in q.addressable_shards} == {(2, 4, 4, 8)}
    finally:
        wide.close()

    one = load_model(tmp_path, devices=jax.devices()[:1])
    assert one.step == 2
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, one.params), saved)
