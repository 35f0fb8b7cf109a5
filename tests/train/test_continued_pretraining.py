"""Continued pretraining (configs/tiny-general.yaml, then configs/tiny-dapt.yaml, shrunk for speed) and the
held-out evaluation it relies on: one pooled eval_loss over all eval sources, and each source's own."""

from pathlib import Path

import jax
import numpy as np
import pytest

from tests.data.data_testing import read_docs
from jaxllm.config import load_config
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.train.loop import Trainer
from jaxllm.train.metrics import read_metrics

CONFIGS = Path(__file__).parents[2] / "configs"
SMALL = ["data.seq_len=64", "data.shuffle_window=0", "data.prefetch=0", "train.batch_size=32", "train.log_every=1",
         "train.progress_bar=false", "train.sample_prompt=null", "checkpoint.every=1000", "eval.batches=1"]
MODEL = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1", "model.mlp_dim=64",
         "model.max_seq_len=64"]
GENERAL, DOMAIN = "builtin:kjv-ot-valid", "builtin:kjv-valid"  # the held-out sets of tiny-dapt.yaml


def _trainer(cfg):
    return Trainer(cfg, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def dapt(tmp_path_factory):
    """A DAPT run of 2 steps from a general model (its step-0 checkpoint: training it adds nothing to test
    here); the trainer stays open for evaluate()."""
    root = tmp_path_factory.mktemp("dapt")
    general = _trainer(load_config(CONFIGS / "tiny-general.yaml", [*SMALL, *MODEL, f"run_dir={root / 'general'}"]))
    general.save()
    general.close()
    cfg = load_config(CONFIGS / "tiny-dapt.yaml", [*SMALL, "train.steps=2", "optim.warmup_steps=1",
                                                   f"train.init_from={root / 'general'}", f"run_dir={root / 'dapt'}"])
    trainer = _trainer(cfg)
    trainer.run()
    yield trainer
    trainer.close()


def _targets(path):
    """Target tokens of a source: each document with BOS and EOS predicts len(tokens) + 1."""
    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    return sum(len(tokenizer.encode(doc)) + 1 for doc in read_docs(path))


def test_dapt_starts_from_the_general_run_and_logs_both_held_out_losses(dapt):
    assert dapt.cfg.model.d_model == 32 and dapt.cfg.model.num_layers == 1  # the general run's model
    assert [s.path for s in dapt.cfg.data.sources] == ["builtin:kjv-nt", "builtin:kjv-ot"]  # domain + replay
    end = read_metrics(dapt.run_dir)[-1]
    assert end["step"] == 2
    assert np.isfinite(end[f"eval_loss/{DOMAIN}"]) and np.isfinite(end[f"eval_loss/{GENERAL}"])
    assert end[f"eval_tokens/{DOMAIN}"] == end[f"eval_tokens/{GENERAL}"] == 32 * 64  # eval.batches=1 of each
    assert end["eval_tokens"] == 2 * 32 * 64


def test_each_eval_source_is_read_whole_and_pooled_by_tokens(dapt, monkeypatch):
    monkeypatch.setattr(dapt.cfg.eval, "batches", 0)  # the whole held-out sets
    m = dapt.evaluate()
    general, domain = _targets(GENERAL), _targets(DOMAIN)
    assert m["eval_tokens"] == general + domain  # every token of both sets, not a mix cut at the shorter one
    assert (m[f"eval_tokens/{GENERAL}"], m[f"eval_tokens/{DOMAIN}"]) == (general, domain)
    pooled = (m[f"eval_loss/{GENERAL}"] * general + m[f"eval_loss/{DOMAIN}"] * domain) / (general + domain)
    assert m["eval_loss"] == pytest.approx(pooled, rel=1e-6)
    assert m["eval_ppl"] == pytest.approx(np.exp(m["eval_loss"]), rel=1e-6)
    assert m[f"eval_loss/{GENERAL}"] != m[f"eval_loss/{DOMAIN}"]
