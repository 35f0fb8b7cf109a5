"""Special tokens added to a run's tokenizer (tokenizer.add_special_tokens): the vocabulary of a model started
from a checkpoint grows (new rows the mean of the old), the run's config carries it, and conversion keeps
the grown embedding and the added tokens' ids both ways (transformers' ids and logits equal ours)."""

import logging
import shutil

import numpy as np
import pytest
import torch
import transformers as T

from jaxllm import models
from jaxllm.cli import main
from jaxllm.config import ConfigError, JaxllmError, load_config
from jaxllm.convert.hf import hf_to_jaxllm
from jaxllm.data import ASSETS
from jaxllm.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    load_tokenizer_from_files,
)
from jaxllm.infer.load import load_model
from jaxllm.train.loop import Trainer, _check_same_tokenizer
from tests.convert.test_export_tokenizer import TINY, _bpe_tokenizer
from tests.train.test_loop import MICRO

CHATML = ["<|im_start|>", "<|im_end|>"]
ADD = f"tokenizer.add_special_tokens=[{', '.join(CHATML)}]"
TEXTS = ["<|im_start|>user\nWho begat Enos?<|im_end|>\n<|im_start|>assistant\nSeth.<|im_end|>\n",
         " And God said<|im_end|>", "<|im_end|><|im_start|>", "no added tokens here"]
RUN = [*MICRO, "train.sample_prompt=", "eval.sources=[]", "checkpoint.every=1"]


def _hf_ids(directory, texts):
    tok = T.AutoTokenizer.from_pretrained(directory)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _start(cfg, save=True):
    """A Trainer built (parameters restored or initialised, resized), saved at step 0 when `save`, never trained."""
    trainer = Trainer(cfg)
    try:
        if save:
            trainer.save()
            trainer.checkpointer.wait()
    finally:
        trainer.close()
    return trainer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A run of the tiny model with the bundled tokenizer (4096 ids), saved at step 0."""
    run = tmp_path_factory.mktemp("base")
    _start(load_config(TINY, [*RUN, f"run_dir={run}"]))
    return run


def test_grown_run_resumes_and_round_trips_through_hugging_face(base, tmp_path, caplog):
    run, hf, back = (tmp_path / n for n in ("run", "hf", "back"))
    grown = load_config(TINY, [*RUN, f"run_dir={run}", f"train.init_from={base}", ADD])
    with caplog.at_level(logging.INFO, logger="jaxllm"):
        trainer = _start(grown)
    assert ("model vocabulary 4096 -> 4224: 2 added tokens (<|im_start|>, <|im_end|>); new embedding rows are the "
            "mean of the old") in caplog.text
    table = np.asarray(trainer.state.params["embed"]["embedding"])
    np.testing.assert_allclose(table[4096:], np.broadcast_to(table[:4096].mean(0), (128, 32)), rtol=1e-5, atol=1e-6)
    assert load_config(str(run / "config.yaml")).model.vocab_size == 4224
    # Resumes: the grown model is the checkpoint's, and so is the tokenizer (its tokens are already there).
    assert _start(grown, save=False)._resume is not None
    more = load_config(TINY, [*RUN, f"run_dir={run}", f"train.init_from={base}",
                              "tokenizer.add_special_tokens=[<|im_start|>, <|im_end|>, <|endoftext|>]"])
    lacks = r"holds checkpoints whose tokenizer lacks the special tokens \['<\|endoftext\|>'\]; tokens are added when"
    with pytest.raises(JaxllmError, match=lacks):
        Trainer(more)
    loaded = load_model(run)
    assert isinstance(loaded.tokenizer, SentencePieceTokenizer)
    assert [loaded.tokenizer.token_to_id(t) for t in CHATML] == [4096, 4097]

    assert main(["convert", "jaxllm-to-hf", str(run), str(hf)]) == 0
    ours = [loaded.tokenizer.encode(t) for t in TEXTS]
    assert _hf_ids(hf, TEXTS) == ours and 4096 in ours[0] and 4097 in ours[0]
    model = T.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    assert model.get_input_embeddings().weight.shape == (4224, 32)
    ids = np.array([ours[0][:24]])
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
    mine = np.asarray(models.bind(loaded.graphdef, loaded.params)(ids)[0])
    np.testing.assert_allclose(mine, theirs, atol=1e-4 * np.abs(theirs).max())

    # And back: the exported directory converts with its tokenizer's added tokens and the grown embedding.
    hf_to_jaxllm(hf, back)
    again = load_model(back)
    assert isinstance(again.tokenizer, HFTokenizer) and again.config.model.vocab_size == 4224
    assert [again.tokenizer.encode(t) for t in TEXTS] == ours


def test_lora_on_a_grown_model_trains_with_the_new_rows_frozen(base, tmp_path, caplog):
    cfg = load_config(TINY, [*RUN, f"run_dir={tmp_path}", f"train.init_from={base}", ADD, "model.lora.rank=4",
                             "model.lora.alpha=8", "model.lora.targets=attn/(q|v)$"])
    with caplog.at_level(logging.INFO, logger="jaxllm"):
        trainer = Trainer(cfg)
    try:
        assert "the embedding is not an adapter target, so the new rows stay the mean" in caplog.text
        before = np.asarray(trainer.state.params["embed"]["embedding"])
        metrics = trainer.train_step(trainer.next_batch())
        assert np.isfinite(float(metrics["loss"])) and np.isfinite(before).all()
        np.testing.assert_array_equal(np.asarray(trainer.state.params["embed"]["embedding"]), before)
    finally:
        trainer.close()


def test_a_resumed_run_accepts_its_tokenizer_under_another_path(tmp_path):
    """A run's tokenizer is the named one plus the tokens the run added: naming that tokenizer on resume is fine."""
    copy = tmp_path / "kjv.model"
    shutil.copy(ASSETS / "kjv-sp4k.model", copy)
    saved = load_tokenizer("builtin:kjv-sp4k")
    saved.add_special_tokens(CHATML)
    saved = load_tokenizer_from_files(saved.files())  # as a checkpoint gives it back
    cfg, saved_cfg = load_config(TINY, [ADD, f"tokenizer.path={copy}"]), load_config(TINY, [ADD])
    _check_same_tokenizer(cfg, saved_cfg, saved, tmp_path)
    saved.add_special_tokens(["<|endoftext|>"])  # one more than the config adds is still the same base tokenizer
    _check_same_tokenizer(cfg, saved_cfg, saved, tmp_path)
    _bpe_tokenizer(tmp_path, post_bos=False)  # another, smaller tokenizer: kjv's ids above its own are no additions
    other = load_config(TINY, [ADD, f"tokenizer.path={tmp_path}"])
    with pytest.raises(JaxllmError, match=f"but tokenizer.path is {tmp_path} \\(a different tokenizer\\)"):
        _check_same_tokenizer(other, saved_cfg, saved, tmp_path)


def test_a_fresh_model_too_small_for_the_added_tokens_is_a_clear_error(tmp_path):
    cfg = load_config(TINY, [*RUN, f"run_dir={tmp_path}", ADD])
    with pytest.raises(ConfigError, match=r"model.vocab_size=4096 is too small for the tokenizer's 4098 ids with the "
                                          r"added tokens <\|im_start\|>, <\|im_end\|> \(4098 ids in all\); set "
                                          r"model.vocab_size >= 4098 \(e.g. 4224\), or start from a trained model"):
        Trainer(cfg)


def test_hf_model_with_tokens_added_by_transformers_converts_with_them(tmp_path):
    """An HF directory whose tokenizer got tokens (transformers' add_special_tokens) keeps their ids; a model
    left smaller than its tokenizer (no resize_token_embeddings) grows to fit, the mean of its rows."""
    src = tmp_path / "src"
    src.mkdir()
    _bpe_tokenizer(src, post_bos=False)
    tok = T.AutoTokenizer.from_pretrained(src)
    rows = len(tok)  # 308: the model has a row for each id before the additions
    assert tok.add_special_tokens({"additional_special_tokens": CHATML}) == 2
    tok.save_pretrained(src)
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    T.LlamaForCausalLM(config).save_pretrained(src, safe_serialization=True)
    hf_to_jaxllm(src, tmp_path / "run")
    loaded = load_model(tmp_path / "run")
    assert [loaded.tokenizer.encode(t) for t in TEXTS] == [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert loaded.config.model.vocab_size == 384
    table = np.asarray(loaded.params["embed"]["embedding"])
    mean = np.broadcast_to(table[:rows].mean(0), (384 - rows, 16))
    np.testing.assert_allclose(table[rows:], mean, rtol=1e-5, atol=1e-7)
