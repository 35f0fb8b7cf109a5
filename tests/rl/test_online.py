"""Online RL in the one Trainer (jaxllm/rl/online.py, rl/objectives.py): grpo and rloo train from the CLI and log
TRL's metrics; the first update's loss is the policy-loss formula on the batch it trained on; PPO-ptx adds
ptx_coef * the clm loss of its pretraining rows; 8 devices give one device's losses; a stopped and resumed run
makes the same rollouts, ptx rows and losses; with LoRA the reference is the adapters-off policy; bad configs are
one-line errors."""

import json

import jax
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.config import JaxllmError, load_config
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.rl.prompts import PromptEncoder, prompt_pipeline, rows
from jaxllm.train.loop import Trainer
from jaxllm.train.metrics import read_metrics

REWARD = "tests.rl.test_online:share_of_e"
MICRO_RL = [
    "model.vocab_size=4096", "model.d_model=32", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
    "model.mlp_dim=64", "model.max_seq_len=64", "model.tie_embeddings=true", "model.init_std=0.2",
    "data.seq_len=32", "data.shuffle_window=0", "data.prefetch=0",
    "train.batch_size=8", "train.log_every=1", "train.progress_bar=false", "train.sample_prompt=null",
    "train.loss_chunk=0",
    "optim.lr=1e-2", "optim.warmup_steps=0", "checkpoint.keep=2",
    "rl.num_generations=4", "rl.max_new_tokens=6", f"rl.rewards=[{{function: '{REWARD}'}}]",
]


# Dr. GRPO (and the same shapes) in every grpo test: their programs compile once (the tests' XLA cache)
GRPO = ("data.objective.name=grpo", "rl.loss_type=dr_grpo", "rl.scale_rewards=none")


def share_of_e(prompts, completions, **fields):
    """A reward a random model's samples differ in: the share of the letter e in the completion."""
    return [c.count("e") / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"And God said {i}", "answer": "light"}) + "\n" for i in range(64)))
    return str(path)


@pytest.fixture(scope="module")
def ptx_text(tmp_path_factory):
    """PPO-ptx's pretraining documents (rl.ptx_sources)."""
    path = tmp_path_factory.mktemp("ptx") / "ptx.jsonl"
    path.write_text("".join(json.dumps({"text": f"In the beginning God created the heaven and the earth {i}. And the "
                                                "earth was without form, and void."}) + "\n" for i in range(40)))
    return str(path)


def _ptx(path, coef=0.5):
    return (f"rl.ptx_coef={coef}", f"rl.ptx_sources=[{{path: {path}}}]")


def _config(run_dir, prompts, *extra):
    return load_config(None, [*MICRO_RL, f"run_dir={run_dir}", f"data.sources=[{{path: {prompts}}}]", *extra])


def _run(cfg, devices=None):
    trainer = Trainer(cfg, devices=devices)
    try:
        trainer.run()
    finally:
        trainer.close()
    return {row["step"]: row for row in read_metrics(cfg.run_dir)}


def test_rows_left_pad_the_prompt_then_put_the_completion_window_with_the_loss_on_its_targets():
    out, window = rows([np.array([5, 6, 7]), np.array([9])], np.array([[1, 2, 3], [4, 0, 0]]),
                       np.array([[1, 1, 0], [1, 0, 0]]), seq_len=6)
    assert window == 3  # the completions' width (their bucket is wider); the prompts' bucket is cut to 6 + 1 - 3
    np.testing.assert_array_equal(out["inputs"], [[0, 5, 6, 7, 1, 2], [0, 0, 0, 9, 4, 0]])
    np.testing.assert_array_equal(out["targets"], [[5, 6, 7, 1, 2, 0], [0, 0, 9, 4, 0, 0]])
    np.testing.assert_array_equal(out["loss_mask"], [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0]])
    np.testing.assert_array_equal(out["positions"], [[0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 1, 1]])
    np.testing.assert_array_equal(out["segment_ids"], [[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    # longer prompts and completions: buckets (16 wide prompts here), the window the longest completion's
    long, window = rows([np.arange(1, 12), np.arange(1, 4)], np.ones((2, 40), np.int32),
                        np.array([[1] * 17 + [0] * 23, [1] * 3 + [0] * 37]), seq_len=64)
    assert window == 20 and long["inputs"].shape == (2, 16 + 20 - 1)
    np.testing.assert_array_equal(long["loss_mask"].sum(1), [17, 3])
    np.testing.assert_array_equal(long["targets"][0, 15:15 + 17], np.ones(17))


def test_a_shared_prefix_gives_the_whole_rows_log_probs_values_and_gradients():
    """rl.shared_prefix runs each prompt once for its group (online.shared_prefix_hidden): the window's log-probs,
    entropies, values and the gradient of a loss of them equal those of whole rows (each prompt run per row)."""
    import jax.numpy as jnp

    from jaxllm.models import bind, model_spec
    from jaxllm.rl.online import window_logps
    from tests.conftest import random_params, tiny_model_config

    cfg = tiny_model_config(value_head=True)
    graphdef, params = model_spec(cfg)[0], random_params(cfg, seed=3)
    rng, n = np.random.default_rng(0), 3
    prompts = [p for size in (5, 19, 1) for p in [rng.integers(3, 100, size)] * n]  # three groups of n
    lengths = rng.integers(1, 9, len(prompts))
    completions = rng.integers(3, 100, (len(prompts), 8))
    mask = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
    (whole, window), (cut, same) = (rows(prompts, completions, mask, 48, shared_prefix=s) for s in (False, True))
    assert window == same == 8 and cut["prefix_inputs"].shape == (9, 19) and cut["inputs"].shape == (9, 8)
    weights = jnp.asarray(rng.normal(size=(len(prompts), window)), jnp.float32)

    def run(params, batch):
        logps, entropy, _, values = window_logps(bind(graphdef, params), batch, 0.7, 0, window, True, n)
        return jnp.sum(weights * (logps + 0.1 * values * batch["loss_mask"][:, -window:])), (logps, entropy, values)

    (a, (logps_a, entropy_a, values_a)), grads_a = jax.value_and_grad(run, has_aux=True)(params, whole)
    (b, (logps_b, entropy_b, values_b)), grads_b = jax.value_and_grad(run, has_aux=True)(params, cut)
    on = whole["loss_mask"][:, -window:] > 0
    np.testing.assert_allclose(logps_b, logps_a, atol=2e-5, rtol=0)
    np.testing.assert_allclose(entropy_b, entropy_a, atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(values_b)[on], np.asarray(values_a)[on], atol=2e-5, rtol=0)
    assert np.abs(np.asarray(logps_a)[on]).min() > 0 and float(np.abs(np.asarray(a))) > 0
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(gb, ga, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("objective", [GRPO, ("data.objective.name=rloo",), ("data.objective.name=ppo", "rl.kl_coef=0")],
                         ids=["grpo", "rloo", "ppo"])
def test_trains_from_the_cli_and_logs_the_rollout_metrics(objective, prompts, tmp_path):
    run_dir = tmp_path / "run"
    code = main(["train", "configs/tiny.yaml", *MICRO_RL, f"run_dir={run_dir}", f"data.sources=[{{path: {prompts}}}]",
                 *objective, "train.steps=2", "checkpoint.every=2", f"eval.sources=[{{path: {prompts}}}]",
                 "eval.batches=1", "eval.at_start=true", "rl.beta=0", "rl.eval_samples=3"])
    assert code == 0
    rows_ = {row["step"]: row for row in read_metrics(run_dir)}
    assert 0 <= rows_[0]["eval_reward"] <= 1 and rows_[0]["eval_reward/share_of_e"] == rows_[0]["eval_reward"]
    # rl.eval_samples: 3 sampled completions of each of the 8 held-out prompts, beside the greedy ones
    sampled = rows_[0]["eval_reward_sampled"]
    assert 0 <= sampled <= 1 and rows_[0]["eval_reward_sampled/share_of_e"] == sampled and sampled != rows_[0]["eval_reward"]
    last = rows_[2]
    for key in ("loss", "reward", "reward_std", "rewards/share_of_e/mean", "rewards/share_of_e/std", "entropy",
                "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
                "rollout_tokens_per_sec", "train_tokens_per_sec", "rollout_share", "eval_reward"):
        assert np.isfinite(last[key]), key
    assert 1 <= last["completions/mean_length"] <= 6 and 0 < last["rollout_share"] < 1
    assert 0 <= last["frac_reward_zero_std"] <= 1 and last["tokens_per_sec"] < last["train_tokens_per_sec"]
    if "data.objective.name=ppo" in objective:  # a value head trained beside the policy
        assert np.isfinite(last["value_loss"]) and np.isfinite(last["vf_clipfrac"]) and last["value_loss"] > 0
    assert (run_dir / "checkpoints" / "2").is_dir()


def test_first_update_loss_is_the_dr_grpo_formula(prompts, tmp_path):
    """epochs = minibatches = 1: the ratio is 1, so Dr. GRPO's loss is -sum_i A_i * n_i / (B * max_new_tokens)
    over the batch's completions (A_i: advantage, n_i: completion tokens)."""
    cfg = _config(tmp_path / "run", prompts, *GRPO, "train.steps=1", "checkpoint.every=1")
    trainer = Trainer(cfg)
    try:
        batch = next(trainer.data)
        metrics = jax.device_get(trainer.train_step(trainer._global_batch(batch)))
    finally:
        trainer.close()
    advantages, tokens = batch["advantages"][:, 0], batch["loss_mask"].sum(1)
    assert np.abs(advantages).max() > 0  # the rewards differ within groups
    # Dr. GRPO: advantages are rewards minus their group's mean; the batch holds the rollout's two whole groups
    np.testing.assert_allclose(advantages.sum(), 0, atol=1e-6)
    want = -np.sum(advantages * tokens) / (8 * 6)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5, atol=1e-7)
    assert metrics["clip_ratio/region_mean"] == 0


def test_ptx_adds_its_coefficient_times_the_clm_loss_of_its_pretraining_rows(prompts, ptx_text, tmp_path):
    """PPO-ptx (rl.ptx_coef): each update's batch holds train.batch_size clm rows of rl.ptx_sources; the objective
    is the RL loss (still logged as `loss`) + ptx_coef * their token-mean cross-entropy, as the clm objective
    (jaxllm.train.losses) computes it on the same rows, logged as `ptx_loss`; and the update differs from one
    without it."""
    from jaxllm.rl.objectives import grpo_loss
    from jaxllm.train.losses import normalizers, pretraining_loss

    cfg = _config(tmp_path / "run", prompts, *GRPO, *_ptx(ptx_text, 0.5), "train.steps=1", "checkpoint.every=1")
    trainer = Trainer(cfg)
    try:
        local = next(trainer.data)
        assert local["ptx_inputs"].shape == local["ptx_loss_mask"].shape == (8, 32)
        batch = trainer._global_batch(local)
        params = trainer.state.params
        loss = jax.jit(lambda b, norms: grpo_loss(params, trainer.graphdef, b, norms, jax.random.key(0), {}, cfg))
        objective, metrics = loss(batch, normalizers(batch))
        clm = {k[4:]: v for k, v in batch.items() if k.startswith("ptx_")}
        want, _ = jax.jit(lambda c: pretraining_loss(params, trainer.graphdef, c, normalizers(c), 0.0,
                                                      jax.random.key(0)))(clm)
        assert float(want) > 1  # a random model's cross-entropy
        np.testing.assert_allclose(metrics["ptx_loss"], want, rtol=1e-5)
        np.testing.assert_allclose(objective, metrics["loss"] + 0.5 * want, rtol=0, atol=1e-5)
        # gradient accumulation: two micro-batches (whole groups) divided by the whole batch's counts sum to it
        halves = [loss({k: v[rows] for k, v in batch.items()}, normalizers(batch)) for rows in (slice(0, 4), slice(4, 8))]
        np.testing.assert_allclose(sum(h[1]["ptx_loss"] for h in halves), want, rtol=1e-5)
        np.testing.assert_allclose(sum(h[0] for h in halves), objective, rtol=0, atol=1e-5)
        # one update with the rows and one without (ptx_coef 0's batch), from the same parameters
        start = jax.tree.map(lambda x: x.copy(), trainer.state)
        logged = jax.device_get(trainer.train_step(batch))
        with_ptx, trainer.state = trainer.state.params, start
        without = jax.device_get(trainer.train_step({k: v for k, v in batch.items() if not k.startswith("ptx_")}))
    finally:
        trainer.close()
    np.testing.assert_allclose(logged["ptx_loss"], want, rtol=1e-5)
    assert "ptx_loss" not in without
    np.testing.assert_allclose(logged["loss"], without["loss"], rtol=1e-6)  # `loss` is the RL loss alone
    differ = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
              zip(jax.tree.leaves(with_ptx), jax.tree.leaves(trainer.state.params))]
    assert max(differ) > 1e-4


def test_the_rollout_spec_holds_the_ptx_rows_only_when_ptx_is_on(prompts, ptx_text, tmp_path):
    """What `jaxllm plan` compiles: with rl.ptx_coef > 0 the batch also holds [B, data.seq_len] clm rows."""
    from jaxllm.rl.objectives import rollout_spec

    on = rollout_spec(_config(tmp_path, prompts, *GRPO, *_ptx(ptx_text), "train.steps=1", "checkpoint.every=1"), 8)
    assert on["ptx_inputs"] == ((8, 32), np.dtype(np.int32)) and on["ptx_loss_mask"] == ((8, 32), np.dtype(np.float32))
    assert sorted(k for k in on if k.startswith("ptx_")) == ["ptx_inputs", "ptx_loss_mask", "ptx_positions",
                                                             "ptx_segment_ids", "ptx_targets"]
    off = rollout_spec(_config(tmp_path, prompts, *GRPO, "train.steps=1", "checkpoint.every=1"), 8)
    assert not [k for k in off if k.startswith("ptx_")]


def test_ptx_rows_count_against_cudnns_packed_document_limit():
    """cuDNN's packed attention takes at most a fixed number of documents per row (loop._check_segments): the ptx
    rows, packed clm rows, are checked as the RL rows are."""
    from jaxllm.train.loop import _check_segments

    rows = {"segment_ids": np.ones((2, 8), np.int32), "ptx_segment_ids": np.arange(16, dtype=np.int32).reshape(2, 8)}
    _check_segments({"segment_ids": rows["segment_ids"]}, 8)
    with pytest.raises(JaxllmError, match="a packed row holds 15 documents, more than the 8 cuDNN's"):
        _check_segments(rows, 8)


def test_eight_devices_give_one_devices_losses_and_a_stopped_run_resumes_exactly(prompts, ptx_text, tmp_path):
    # with PPO-ptx on: its pretraining rows' position resumes too (the same ptx_loss after the restart)
    extra = (*GRPO, "train.steps=4", "rl.minibatches=2", "checkpoint.every=2", *_ptx(ptx_text))
    eight = _run(_config(tmp_path / "eight", prompts, *extra))
    one = _run(_config(tmp_path / "one", prompts, *extra), devices=jax.devices()[:1])
    for step in (1, 2, 3, 4):
        np.testing.assert_allclose(eight[step]["loss"], one[step]["loss"], atol=1e-4)
        np.testing.assert_allclose(eight[step]["reward"], one[step]["reward"], atol=1e-4)
        np.testing.assert_allclose(eight[step]["ptx_loss"], one[step]["ptx_loss"], atol=1e-4)
    assert eight[1]["reward"] != eight[3]["reward"]  # two rollouts, of different prompts
    assert len({eight[step]["ptx_loss"] for step in (1, 2, 3, 4)}) == 4  # other ptx rows at every update
    # A stop (SIGTERM) during the first rollout's updates: the run finishes them, saves at step 2, and resumes.
    resumed_dir = tmp_path / "resumed"
    trainer = Trainer(_config(resumed_dir, prompts, *extra))
    step = trainer.train_step
    trainer.train_step = lambda batch: (trainer.request_stop(), step(batch))[1]
    try:
        assert trainer.run()["end_step"] == 2
    finally:
        trainer.close()
    resumed = _run(_config(resumed_dir, prompts, *extra))
    for step in (1, 2, 3, 4):
        assert resumed[step]["loss"] == eight[step]["loss"] and resumed[step]["reward"] == eight[step]["reward"]
        assert resumed[step]["ptx_loss"] == eight[step]["ptx_loss"]


def test_with_lora_the_reference_is_the_policy_with_adapters_off(prompts, tmp_path):
    # two updates per rollout (rl.epochs=2): the old log-probs are scored beside the reference's
    cfg = _config(tmp_path / "lora", prompts, *GRPO, "rl.beta=0.04", "rl.epochs=2", "model.lora.rank=4",
                  "model.lora.alpha=8", "train.steps=4", "checkpoint.every=2")
    trainer = Trainer(cfg)
    try:
        assert trainer.frozen == {}  # no second copy of the weights
        first = next(trainer.data)  # adapters start at zero: the reference is the policy itself
        mask = first["loss_mask"][:, -first["ref_logps"].shape[1]:] > 0  # the completion window's
        np.testing.assert_allclose(first["ref_logps"][mask], first["old_logps"][mask], atol=1e-6)
        trainer.train_step(trainer._global_batch(first))
        trainer.train_step(trainer._global_batch(next(trainer.data)))
        second = next(trainer.data)  # the next rollout's: after updates the adapters differ from zero, the reference does not move
        mask = second["loss_mask"][:, -second["ref_logps"].shape[1]:] > 0
        assert np.abs(second["ref_logps"][mask] - second["old_logps"][mask]).max() > 1e-4
    finally:
        trainer.close()


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=6", "train.batch_size=6 must be a multiple of rl.num_generations=4"),
    ("data.seq_len=6", "data.seq_len=6 leaves no room for a prompt before rl.max_new_tokens=6"),
    ("rl.rewards=[{function: no_such_reward}]", "is neither a built-in reward"),
    ("checkpoint.every=3", "checkpoint.every=3 must be a multiple of rl.epochs * rl.minibatches = 2"),
    ("rl.rewards=[]", "needs rl.rewards"),
    ("train.grad_accum=4", "the micro-batch of 2 .train.batch_size / train.grad_accum. must be a multiple of "
                           "rl.num_generations=4; change train.grad_accum"),
    ("train.neftune_noise_alpha=5", "with online RL set rl.shared_prefix=false to use them"),
    ("rl.eval_samples=-1", "rl.eval_samples must be >= 0"),
    ("rl.ptx_coef=-0.5", "rl.ptx_coef must be >= 0"),
    ("rl.ptx_coef=0.5", "rl.ptx_coef=0.5 mixes in a pretraining loss but rl.ptx_sources is empty"),
    ("rl.ptx_sources=[{path: builtin:kjv}]", "rl.ptx_sources would be ignored with rl.ptx_coef=0"),
    ("rl.ptx_sources=[{path: builtin:kjv, weight: 0}]", "rl.ptx_sources.0.weight must be > 0, got 0"),
])
def test_bad_configs_are_one_line_errors(override, message, prompts, tmp_path):
    with pytest.raises(JaxllmError, match=message.replace("[", r"\[").replace("*", r"\*")) as e:
        cfg = _config(tmp_path / "bad", prompts, "data.objective.name=grpo", "train.steps=4", "rl.minibatches=2",
                      "checkpoint.every=2", override)
        Trainer(cfg).close()
    assert "\n" not in str(e.value)


def test_ptx_outside_the_online_objectives_is_a_one_line_error(tmp_path):
    with pytest.raises(JaxllmError, match=r"rl.ptx_coef and rl.ptx_sources mix a pretraining loss into the online "
                                          r"objectives \(ppo, grpo, rloo\), but data.objective.name=sft") as e:
        load_config(None, [f"run_dir={tmp_path}", "data.objective.name=sft", *_ptx("builtin:kjv")])
    assert "\n" not in str(e.value)


def test_a_prompt_longer_than_the_row_leaves_is_a_record_error(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "And God said " * 20}) + "\n")
    cfg = _config(tmp_path / "run", str(path), "data.objective.name=grpo", "train.steps=1", "checkpoint.every=1",
                  "data.on_bad_record=error")
    prompts = prompt_pipeline(cfg, cfg.data.sources, PromptEncoder(cfg, load_tokenizer("builtin:kjv-sp4k")), 1, False)
    try:
        with pytest.raises(JaxllmError, match=r"long.jsonl:1: .*more than the 27 data.seq_len leaves"):
            next(prompts)
    finally:
        prompts.close()


def test_a_conversational_prompt_is_rendered_with_the_template_and_its_special_tokens(tmp_path):
    """zephyr's `</s>` after the user's turn is the EOS id (as training encodes it), not its characters; the
    rendering ends with the generation prompt."""
    cfg = _config(tmp_path / "run", "x.jsonl", "data.objective.name=grpo", "train.steps=1", "checkpoint.every=1",
                  "data.objective.chat_template=builtin:zephyr")
    tokenizer = load_tokenizer("builtin:kjv-sp4k")
    ids = PromptEncoder(cfg, tokenizer)({"prompt": [{"role": "user", "content": "Who said it?"}], "answer": "God"})["ids"]
    assert list(ids).count(tokenizer.eos_id) == 1
    assert tokenizer.decode(list(ids)).rstrip().endswith("<|assistant|>")
