"""LoRA and QLoRA fine-tuning with the Trainer: only adapters train and have optimizer state, from a
checkpoint (train.init_from), the same losses on 1 and 8 devices, and exact resume of a QLoRA run."""

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models
from jaxllm.config import LoraConfig, OptimConfig, QuantConfig
from jaxllm.models import lora
from jaxllm.train.loop import Trainer
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.step import TrainState, train_step
from tests.conftest import lm_loss
from tests.conftest import random_params, tiny_model_config
from tests.train.test_loop import _train, micro_config
from tests.train.test_step import _batch

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=attn/(q|v)$|mlp/(up|down)",
        "optim.weight_decay=0.0", "train.steps=6", "checkpoint.every=3"]


def _bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("quant", [None, QuantConfig("nf4", block_size=32)])
def test_adapters_fit_a_fixed_batch(quant):
    """The train step learns through the adapters alone (LoRA, and QLoRA on an NF4 base)."""
    base = tiny_model_config()
    cfg = dataclasses.replace(base, lora=LoraConfig(rank=4, alpha=8, targets="attn|mlp"), quant=quant)
    params = lora.adapt(random_params(base, std=0.05), cfg)
    optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    tx = make_optimizer(optim, 100)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(lora.trainable(params)),
                       skipped=jnp.int32(0))
    step = jax.jit(functools.partial(train_step, frozen={}, graphdef=models.model_spec(cfg)[0], tx=tx,
                                     schedule=make_schedule(optim, 100), grad_accum=1, loss=lm_loss()))
    losses = []
    for _ in range(8):
        state, metrics = step(state, _batch(base))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.8, losses
    _assert_frozen(state.params, lora.split_trainable(params)[1])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A 'pretrained' checkpoint to fine-tune: 4 steps of the micro model on 8 devices."""
    run_dir = tmp_path_factory.mktemp("base")
    _, params = _train(micro_config(run_dir, "train.steps=4", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    return run_dir, params


def _assert_frozen(params, base):
    """Everything but the adapters equals the starting checkpoint, bit for bit."""
    adapters, frozen = lora.split_trainable(params)
    jax.tree.map(np.testing.assert_array_equal, frozen, base)
    assert any(np.any(a != 0) for a in jax.tree.leaves(adapters["layers"]["attn"]["q"]["lora_b"]))


def test_lora_trains_adapters_only_with_optimizer_state_in_proportion(base_run, tmp_path):
    base_dir, base = base_run
    cfg = micro_config(tmp_path / "lora8", f"train.init_from={base_dir}", "mesh.data=2", "mesh.fsdp=2",
                       "mesh.tensor=2", *LORA)
    trainer = Trainer(cfg)
    try:
        # AdamW keeps two moments per trainable value: its state (the real arrays) = 2 x adapter bytes,
        # plus step counters.
        adapter_bytes = _bytes(lora.trainable(trainer.state.params))
        state_bytes = _bytes(trainer.state.opt_state)
        summary8 = trainer.run()
        params8 = jax.tree.map(np.asarray, trainer.state.params)
    finally:
        trainer.close()
    assert 2 * adapter_bytes <= state_bytes <= 2 * adapter_bytes + 64
    tx = make_optimizer(OptimConfig(weight_decay=0.0), 10)
    full_state = _bytes(jax.eval_shape(tx.init, models.model_spec(lora.base_config(cfg.model))[1]))
    assert state_bytes < full_state / 10  # full fine-tuning's state, for comparison
    _assert_frozen(params8, base)
    assert sorted(summary8["losses"]) == list(range(1, 7))



def test_qlora_config_trains_a_frozen_nf4_base_from_the_cli_and_resumes_exactly(base_run, tmp_path, capsys):
    """configs/lora_tiny_qlora.yaml (shrunk) on our checkpoint from the CLI, on 8 devices; the end-of-run
    sample generates through the NF4 base and the adapters. A run stopped at step 3 and resumed logs
    the same losses and ends with the same parameters."""
    from jaxllm.cli import main
    from jaxllm.config import load_config
    from jaxllm.infer.load import load_model
    from jaxllm.train.metrics import read_metrics

    base_dir, base = base_run
    config = Path(__file__).parents[2] / "configs" / "lora_tiny_qlora.yaml"
    small = [f"train.init_from={base_dir}", "model.quant.block_size=32", "data.seq_len=32", "data.prefetch=0",
             "data.shuffle_window=64", "train.batch_size=8", "train.steps=6", "train.log_every=1",
             "train.progress_bar=false", "train.sample_tokens=4", "eval.sources=[]", "checkpoint.every=3",
             "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    assert main(["train", str(config), *small, f"run_dir={tmp_path / 'straight'}"]) == 0
    assert "sample> And God said" in capsys.readouterr().out
    straight = load_model(tmp_path / "straight")
    q = straight.params["layers"]["attn"]["q"]["kernel"]
    assert q["codes"].dtype == np.uint8 and q["scale_codes"].dtype == np.int8
    # The quantised base never changes: it is the starting checkpoint, quantised.
    expected = lora.split_trainable(lora.adapt(base, straight.config.model))[1]
    jax.tree.map(np.testing.assert_array_equal, lora.split_trainable(straight.params)[1], expected)

    resumed = tmp_path / "resumed"
    _train(load_config(config, [*small, f"run_dir={resumed}"]), stop_at_step=3)
    assert main(["train", str(config), *small, f"run_dir={resumed}"]) == 0
    logged = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert logged == {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
    jax.tree.map(np.testing.assert_array_equal, load_model(resumed).params, straight.params)
