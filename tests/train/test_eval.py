"""Held-out evaluation: one pooled loss over all eval sources, and each source's own when there are several."""

import jax
import numpy as np
import pytest

from tests.data.data_testing import read_docs
from tests.train.test_loop import micro_config
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.train.loop import Trainer

GENERAL, DOMAIN = "builtin:kjv-ot-valid", "builtin:kjv-valid"
SOURCES = f"eval.sources=[{{path: {GENERAL}}}, {{path: {DOMAIN}}}]"


def _targets(path):
    """Target tokens of a source: each document with BOS and EOS predicts len(tokens) + 1."""
    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    return sum(len(tokenizer.encode(doc)) + 1 for doc in read_docs(path))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    cfg = micro_config(tmp_path_factory.mktemp("eval"), SOURCES, "train.batch_size=32", "data.seq_len=64",
                       "model.max_seq_len=64", "tokenizer.path=builtin:kjv-sp4k")
    trainer = Trainer(cfg, devices=jax.devices()[:1])
    yield trainer
    trainer.close()


def test_each_source_is_read_whole_and_logged_by_name(trainer):
    m = trainer.evaluate()
    general, domain = _targets(GENERAL), _targets(DOMAIN)
    assert m["eval_tokens"] == general + domain  # every token of both sets, not a mix cut at the shorter one
    assert (m[f"eval_tokens/{GENERAL}"], m[f"eval_tokens/{DOMAIN}"]) == (general, domain)
    pooled = (m[f"eval_loss/{GENERAL}"] * general + m[f"eval_loss/{DOMAIN}"] * domain) / (general + domain)
    assert m["eval_loss"] == pytest.approx(pooled, rel=1e-6)
    assert m["eval_ppl"] == pytest.approx(np.exp(m["eval_loss"]), rel=1e-6)
    assert m[f"eval_loss/{GENERAL}"] != m[f"eval_loss/{DOMAIN}"]


def test_eval_batches_apply_to_each_source(trainer, monkeypatch):
    monkeypatch.setattr(trainer.cfg.eval, "batches", 2)
    m = trainer.evaluate()
    assert m[f"eval_tokens/{GENERAL}"] == m[f"eval_tokens/{DOMAIN}"] == 2 * 32 * 64  # packed rows, no padding
    assert m["eval_tokens"] == 2 * 2 * 32 * 64
