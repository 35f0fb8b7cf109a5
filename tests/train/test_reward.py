"""Reward models: reading rewards at segment ends, pairs of packed preference rows, the Bradley-Terry objective
(margin, centring, metrics), LoRA training the fresh head, an LM's parameters becoming a reward model's
(train.init_from), the config checks, and `jaxllm score`. Parity with transformers and TRL:
tests/convert/test_reward_parity.py."""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models
from jaxllm.cli import main
from jaxllm.config import (Config, ConfigError, DataConfig, JaxllmError, LoraConfig, ObjectiveConfig, OptimConfig,
                           validate)
from jaxllm.convert.hf import hf_to_jaxllm, save_hf
from jaxllm.convert.hf_tokenizer import hf_tokenizer_files
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.models import lora
from jaxllm.models.heads import change_head
from jaxllm.infer.score import RecordEncoder, bucket, load_reward_model, reward_position, score_file
from jaxllm.train.losses import batch_counts, normalizers, segment_last
from jaxllm.train.loop import Trainer
from jaxllm.train.objective import check_trainable
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.reward import bradley_terry, pair_rewards, reward_loss
from jaxllm.train.step import TrainState, bound_loss, train_step
from tests.conftest import random_params, tiny_model_config
from tests.train.test_loop import micro_config

SEGMENTS = np.array([[1, 1, 1, 2, 2, 3, 3, 3, 4, 4],   # two pairs
                     [1, 1, 2, 2, 2, 2, 0, 0, 0, 0],   # one pair
                     [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # padding only


def test_segment_last_and_pair_sums_read_each_sequence_at_its_end():
    values = np.arange(30, dtype=np.float32).reshape(3, 10) + 1
    last = np.asarray(segment_last(jnp.asarray(SEGMENTS), jnp.asarray(values)))
    expected = np.zeros_like(values)
    for r, c in [(0, 2), (0, 4), (0, 7), (0, 9), (1, 1), (1, 5)]:
        expected[r, c] = values[r, c]
    np.testing.assert_array_equal(last, expected)
    mask = jnp.asarray((SEGMENTS == np.roll(SEGMENTS, -1, 1)) & (SEGMENTS > 0), jnp.float32)
    chosen, rejected, valid = map(np.asarray, pair_rewards(jnp.asarray(values), jnp.asarray(SEGMENTS), mask))
    assert chosen.shape == (3, 5)
    np.testing.assert_array_equal(chosen[:, :2], [[3, 8], [12, 0], [0, 0]])
    np.testing.assert_array_equal(rejected[:, :2], [[5, 10], [16, 0], [0, 0]])
    np.testing.assert_array_equal(valid[:, :2], [[True, True], [True, False], [False, False]])
    assert not valid[:, 2:].any()
    assert float(batch_counts({"segment_ids": jnp.asarray(SEGMENTS), "loss_mask": mask})["examples"]) == 6


def test_bradley_terry_sums_with_margin_and_centring():
    chosen, rejected = jnp.array([[2.0, -1.0, 5.0]]), jnp.array([[1.0, 0.5, 9.0]])
    valid = jnp.array([[True, True, False]])
    margin = jnp.array([[0.5, -0.25, 0.0]])
    out = bradley_terry(chosen, rejected, valid, margin, center_coefficient=0.1)
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    expected = -log_sigmoid(1.0 - 0.5) - log_sigmoid(-1.5 + 0.25) + 0.1 * (3.0 ** 2 + 0.5 ** 2)
    np.testing.assert_allclose(float(out["loss"]), expected, rtol=1e-6)
    assert float(out["accuracy"]) == 1.0 and float(out["margin"]) == pytest.approx(1.0 - 1.5)
    assert float(out["mean_reward"]) == pytest.approx((3.0 - 0.5) / 2)


def _preference_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, cfg.vocab_size, SEGMENTS.shape).astype(np.int32) * (SEGMENTS > 0)
    positions = np.zeros_like(SEGMENTS)
    for r in range(SEGMENTS.shape[0]):
        for c in range(1, SEGMENTS.shape[1]):
            positions[r, c] = positions[r, c - 1] + 1 if SEGMENTS[r, c] == SEGMENTS[r, c - 1] else 0
    targets = np.where(SEGMENTS == np.roll(SEGMENTS, -1, 1), np.roll(ids, -1, 1), 0)
    batch = {"inputs": ids, "targets": targets, "segment_ids": SEGMENTS.astype(np.int32),
             "positions": positions.astype(np.int32), "loss_mask": (targets > 0).astype(np.float32)}
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _reward_config(center=None, **model):
    cfg = tiny_model_config(head="reward", **model)
    return cfg, Config(model=cfg, data=DataConfig(objective=ObjectiveConfig(name="reward",
                                                                             center_rewards_coefficient=center)))


def test_reward_loss_is_the_mean_over_pairs_of_the_rewards_at_segment_ends():
    cfg, config = _reward_config(center=0.01)
    params, graphdef = random_params(cfg), models.model_spec(cfg)[0]
    batch = _preference_batch(cfg)
    loss, metrics = reward_loss(params, graphdef, batch, normalizers(batch), jax.random.key(0), {}, config)
    rewards = np.asarray(models.bind(graphdef, params)(batch["inputs"], batch["positions"], batch["segment_ids"])[0])
    c, r = rewards[[0, 0, 1], [2, 7, 1]], rewards[[0, 0, 1], [4, 9, 5]]
    expected = np.mean(np.log1p(np.exp(-(c - r))) + 0.01 * (c + r) ** 2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(c > r))
    np.testing.assert_allclose(float(metrics["mean_reward"]), np.mean((c + r) / 2), rtol=1e-5, atol=1e-6)


def test_lora_reward_model_trains_its_fresh_head_and_adapters_only():
    cfg = tiny_model_config(head="reward", lora=LoraConfig(rank=4, alpha=8, targets="attn/(q|v)$"))
    _, config = _reward_config()
    params = lora.adapt(random_params(dataclasses.replace(cfg, lora=None), std=0.05), cfg)
    trainable, frozen = lora.split_trainable(params)
    assert "score" in trainable and "score" not in frozen and "embed" in frozen
    optim = OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0)
    tx = make_optimizer(optim, 10)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(trainable), skipped=jnp.int32(0))
    step = jax.jit(functools.partial(train_step, frozen={}, graphdef=models.model_spec(cfg)[0], tx=tx,
                                     schedule=make_schedule(optim, 10), grad_accum=1,
                                     loss=bound_loss(dataclasses.replace(config, model=cfg))))
    batch, losses = _preference_batch(cfg), []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    assert not np.allclose(state.params["score"]["kernel"], params["score"]["kernel"])
    assert not np.allclose(state.params["layers"]["attn"]["q"]["lora_b"], 0.0)
    np.testing.assert_array_equal(state.params["embed"]["embedding"], params["embed"]["embedding"])
    np.testing.assert_array_equal(state.params["layers"]["attn"]["q"]["kernel"], params["layers"]["attn"]["q"]["kernel"])
    # Without adapters every parameter trains (the head is nothing special then).
    assert lora.split_trainable(random_params(tiny_model_config(head="reward")))[1] == {}


def test_an_lm_becomes_a_reward_model_with_its_backbone_and_a_fresh_head():
    lm = tiny_model_config()
    params = random_params(lm)
    reward = dataclasses.replace(lm, head="reward")
    out = change_head(params, lm, reward, seed=3)
    assert "lm_head" not in out and out["score"]["kernel"].shape == (lm.d_model, 1)
    assert 0 < float(jnp.std(out["score"]["kernel"])) < 3 * lm.init_std
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in out.items() if k != "score"},
                 {k: v for k, v in params.items() if k != "lm_head"})
    models.bind(models.model_spec(reward)[0], out)  # the tree is a reward model's
    with pytest.raises(JaxllmError, match="head=reward"):
        change_head(out, reward, lm)


def test_config_checks_pair_the_head_with_the_objective():
    with pytest.raises(ConfigError, match="model.head=reward is a decoder's"):
        validate(Config(model=tiny_model_config(arch="encoder", head="reward")))
    _, config = _reward_config()
    check_trainable(config)
    with pytest.raises(JaxllmError, match="data.objective.name=reward with model.head=lm"):
        check_trainable(dataclasses.replace(config, model=tiny_model_config()))
    with pytest.raises(JaxllmError, match="data.objective.name=clm with model.head=reward"):
        check_trainable(dataclasses.replace(config, data=DataConfig()))


PAIRS = [
    {"prompt": "In the beginning", "chosen": " God created the heaven and the earth.", "rejected": " the earth.",
     "margin": 0.5},
    {"prompt": "And God said,", "chosen": " Let there be light.", "rejected": " light be there let."},
    {"chosen": "And God saw the light, that it was good.", "rejected": "And God saw the darkness."},
]


def test_a_reward_model_trains_from_a_language_model_with_a_fresh_head(tmp_path):
    """train.init_from of a causal LM (a Hugging Face directory here) with model.head=reward: the backbone is
    the LM's, the LM head is gone, `score` is new; the pipeline's pairs (with their margins) train and evaluate
    with TRL's metrics, eval_loss per pair."""
    tok = load_tokenizer("builtin:kjv-sp4k")
    lm = tiny_model_config(vocab_size=tok.vocab_size, family="llama", max_seq_len=64)
    lm_params = random_params(lm, seed=2)
    save_hf(lm_params, lm, tmp_path / "lm", hf_tokenizer_files(tok, DataConfig()))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 6))
    cfg = micro_config(tmp_path / "rm", f"train.init_from={tmp_path / 'lm'}", "model.head=reward",
                       f"data.sources=[{{path: {pairs}}}]", "data.objective.name=reward", "data.seq_len=64",
                       "data.shuffle_window=0", "data.prefetch=0", "train.steps=3", "checkpoint.every=100",
                       f"eval.sources=[{{path: {pairs}}}]", "eval.every=3")
    trainer = Trainer(cfg)
    try:
        params = trainer.state.params
        assert "lm_head" not in params and params["score"]["kernel"].shape == (lm.d_model, 1)
        np.testing.assert_array_equal(params["layers"]["attn"]["q"]["kernel"], lm_params["layers"]["attn"]["q"]["kernel"])
        evaluated = trainer.evaluate()
        assert {"eval_loss", "eval_accuracy", "eval_margin", "eval_mean_reward"} <= set(evaluated)
        assert "eval_ppl" not in evaluated and 0 < evaluated["eval_loss"] < 5
        batch = trainer.next_batch()
        margins = np.asarray(batch["margin"])[np.asarray(batch["segment_ids"]) > 0]
        assert set(np.unique(margins)) == {0.0, 0.5}
        metrics = jax.device_get(trainer.train_step(batch))
        assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
        assert {"margin", "mean_reward"} <= set(metrics)
    finally:
        trainer.close()


def test_a_margin_must_be_a_number():
    from jaxllm.config import SourceConfig
    from jaxllm.data.preference import EncodePair
    from jaxllm.data.readers import RecordError

    cfg = DataConfig(sources=[SourceConfig(path="x.jsonl")], objective=ObjectiveConfig(name="reward"))
    encode = EncodePair(cfg, load_tokenizer("builtin:kjv-sp4k"), cfg.sources[0])
    assert encode({"prompt": "a", "chosen": "b", "rejected": "c", "margin": 2})["margin"] == 2.0
    with pytest.raises(RecordError, match="field 'margin' must be a finite number"):
        encode({"prompt": "a", "chosen": "b", "rejected": "c", "margin": "high"})


# ------------------------------------------------------------------------------------------ score


def test_reward_position_and_buckets():
    assert reward_position([5, 6, 7], None) == 2
    assert reward_position([5, 6, 0, 0], 0) == 1  # transformers: the last token that is not padding
    assert reward_position([5, 3, 6, 3], 3) == 2  # (so a pad id equal to the EOS moves it before the EOS)
    assert [bucket(n, 64) for n in (1, 16, 17, 40, 100)] == [16, 16, 32, 64, 64]


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    """A tiny random reward model with the builtin tokenizer, as a Hugging Face directory and a jaxllm run."""
    tmp = tmp_path_factory.mktemp("rm")
    tok = load_tokenizer("builtin:kjv-sp4k")
    cfg = tiny_model_config(vocab_size=tok.vocab_size, head="reward", family="llama", max_seq_len=128)
    params = random_params(cfg, seed=1)
    save_hf(params, cfg, tmp / "hf", hf_tokenizer_files(tok, DataConfig()), pad_token_id=tok.pad_id)
    hf_to_jaxllm(tmp / "hf", tmp / "run")
    rows = [{"prompt": "In the beginning", "chosen": " God created the heaven.", "rejected": " heaven the God.",
             "id": 1},
            {"prompt": "And God said", "completion": ", Let there be light: and there was light.", "id": 2},
            {"chosen": "Jesus wept.", "rejected": "wept Jesus wept Jesus", "id": 3},
            {"text": "The LORD is my shepherd; I shall not want.", "id": 4}]
    (tmp / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp, cfg, params, rows


def test_score_writes_every_field_and_the_rewards_of_a_direct_forward(reward_dirs, capsys):
    tmp, cfg, params, rows = reward_dirs
    assert main(["score", "--model", str(tmp / "run"), "--data", str(tmp / "rows.jsonl"),
                 "--out", str(tmp / "scored.jsonl"), "--batch-size", "2"]) == 0
    assert "accuracy" in capsys.readouterr().out
    scored = [json.loads(line) for line in (tmp / "scored.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in s.items() if not k.startswith("score")} for s in scored] == rows
    assert {"score_chosen", "score_rejected"} <= set(scored[0]) and "score" in scored[1] and "score" in scored[3]

    model = load_reward_model(tmp / "run")
    graphdef = models.model_spec(cfg)[0]
    ids = RecordEncoder(model)({"prompt": rows[0]["prompt"], "completion": rows[0]["chosen"]})[1][0]
    assert ids[-1] == model.tokenizer.eos_id
    direct = models.bind(graphdef, params)(jnp.asarray([ids]))[0][0, -1]
    np.testing.assert_allclose(scored[0]["score_chosen"], float(direct), rtol=1e-5, atol=1e-6)

    # The same scores one at a time (other padding), and from the Hugging Face directory (pad id 0 != EOS).
    one = score_file(tmp / "hf", tmp / "rows.jsonl", tmp / "one.jsonl", batch_size=1, progress=False)
    assert one == {"rows": 4, "pairs": 2, "accuracy": (scored[0]["score_chosen"] > scored[0]["score_rejected"]) / 2
                   + (scored[2]["score_chosen"] > scored[2]["score_rejected"]) / 2}
    again = [json.loads(line) for line in (tmp / "one.jsonl").read_text().splitlines()]
    for a, b in zip(scored, again):
        for k in ("score", "score_chosen", "score_rejected"):
            if k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_score_refuses_a_language_model_and_bad_rows(reward_dirs, tmp_path, capsys):
    tmp, cfg, params, _ = reward_dirs
    lm = dataclasses.replace(cfg, head="lm")
    save_hf(change_head_back(params, lm), lm, tmp_path / "lm",
            hf_tokenizer_files(load_tokenizer("builtin:kjv-sp4k"), DataConfig()))
    assert main(["score", "--model", str(tmp_path / "lm"), "--data", str(tmp / "rows.jsonl"),
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "is not a reward model" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3\n')
    with pytest.raises(JaxllmError, match=r"bad.jsonl:2: not a JSON line"):
        score_file(tmp / "hf", tmp_path / "bad.jsonl", tmp_path / "x.jsonl", progress=False)
    (tmp_path / "odd.jsonl").write_text('{"question": "a"}\n')
    with pytest.raises(JaxllmError, match=r"odd.jsonl:1: the record has none of the fields"):
        score_file(tmp / "hf", tmp_path / "odd.jsonl", tmp_path / "x.jsonl", progress=False)


def change_head_back(params, lm):
    """A language model's parameters from a reward model's (an untrained LM head), for the refusal test."""
    out = {k: v for k, v in params.items() if k != "score"}
    out["lm_head"] = {"kernel": jnp.zeros((lm.d_model, lm.vocab_size), jnp.float32)}
    return out


def test_a_reward_run_exports_as_a_transformers_reward_model(reward_dirs, tmp_path):
    """jaxllm-to-hf of a reward run: *ForSequenceClassification with the tokenizer's pad id, whose reward of a
    scored row is jaxllm's."""
    torch = pytest.importorskip("torch")
    import transformers as T

    from jaxllm.convert.hf import jaxllm_to_hf

    tmp, _, _, rows = reward_dirs
    out = jaxllm_to_hf(tmp / "run", tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["pad_token_id"] == 0
    model = T.AutoModelForSequenceClassification.from_pretrained(out).eval()
    reward = load_reward_model(tmp / "run")
    ids = RecordEncoder(reward)(rows[1])[1][0]
    score = score_file(tmp / "run", tmp / "rows.jsonl", tmp_path / "s.jsonl", progress=False)
    scored = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor([ids + [0, 0]])).logits[0, 0].item()  # right-padded with pad id 0
    np.testing.assert_allclose(scored[1]["score"], theirs, rtol=1e-4, atol=1e-5)
    assert score["pairs"] == 2
