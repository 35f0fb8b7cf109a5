"""Test setup: 8 fake CPU devices (set before JAX is imported), and small shared fixtures."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
# The suite's programs are tiny and mostly compiled once: LLVM's optimisation of the CPU code is much of
# their compile time and buys nothing at these sizes (tests/train/test_lora_training.py and
# test_moe_training.py: 439 s -> 254 s; the execution-bound SIGKILL loop and bench test: unchanged). The
# whole suite passes with it, tolerances untouched. Set the level in XLA_FLAGS to override; the `jaxllm`
# subprocesses of the tests inherit it.
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA cache per test session: the many small trainers, and the `jaxllm train` subprocesses
# of the fault tests (which inherit it), compile the same programs, and compiling is most of their time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit  # noqa: E402
    import shutil  # noqa: E402
    import tempfile  # noqa: E402

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxllm-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from jaxllm.config import Config, ModelConfig, TrainConfig  # noqa: E402


def tiny_model_config(**overrides) -> ModelConfig:
    """A small LLaMA-style config with non-trivial shapes (GQA, odd vocab)."""
    base = ModelConfig(
        vocab_size=101, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
        max_seq_len=64, init_std=0.1,
    )
    return dataclasses.replace(base, **overrides)


@pytest.fixture
def model_cfg() -> ModelConfig:
    return tiny_model_config()


def random_params(cfg: ModelConfig, seed: int = 0, std: float = 0.1):
    """Parameters of `cfg` drawn with numpy: norm scales near 1, everything else N(0, std^2). Much
    faster than compiling an initialiser, for tests that only need some non-trivial weights."""
    import jax
    import numpy as np

    from jaxllm import models

    rng = np.random.default_rng(seed)
    abstract = models.model_spec(cfg)[1]

    def draw(path, a):
        base = 1.0 if path[-1].key == "scale" else 0.0
        return jax.numpy.asarray(base + std * rng.normal(size=a.shape), a.dtype)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def lm_loss(z_loss: float = 0.0, loss_chunk: int = 0):
    """The clm objective's loss (what `train_step` takes as `loss`) with these train settings."""
    from jaxllm.train.step import bound_loss

    return bound_loss(Config(train=TrainConfig(z_loss=z_loss, loss_chunk=loss_chunk)))
