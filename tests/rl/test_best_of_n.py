"""Best-of-n rounds (jaxllm/rl/best_of_n.py): the kept set holds each prompt's best sample, the rounds rotate
through the prompts, round 2 starts from round 1's weights, a finished command re-run does nothing, and a command
killed between rounds resumes to the uninterrupted result; `select`'s rules; bad configs are one-line errors."""

import functools
import json
import re
from collections import defaultdict
from typing import ClassVar

import jax
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.config import ConfigError, JaxllmError, load_config
from jaxllm.rl import best_of_n
from jaxllm.rl.best_of_n import run_best_of_n, select
from jaxllm.train.frozen import open_pretrained
from jaxllm.train.loop import Trainer
from jaxllm.train.metrics import read_metrics

REWARD = "tests.rl.test_best_of_n:share_of_e"
ONE = jax.devices()[:1]  # one device: the rounds' programs compile fast (rollouts on a mesh: test_rollout.py)
MICRO = [
    "model.vocab_size=4096", "model.d_model=32", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
    "model.mlp_dim=64", "model.max_seq_len=64", "model.tie_embeddings=true", "model.init_std=0.2",
    "data.seq_len=32", "data.shuffle_window=0", "data.prefetch=0", "data.objective.name=sft",
    "train.batch_size=8", "train.log_every=1", "train.progress_bar=false", "train.sample_prompt=null",
    "train.loss_chunk=0", "optim.lr=1e-2", "optim.warmup_steps=0", "checkpoint.keep=2", "checkpoint.every=100",
]
ROUNDS = ["rl.algorithm=best_of_n", "rl.num_generations=4", "rl.max_new_tokens=6",
          f"rl.rewards=[{{function: '{REWARD}'}}]", "rl.best_of_n.rounds=2", "rl.best_of_n.prompts_per_round=4",
          "rl.best_of_n.sft_steps=2", "rl.best_of_n.sample_batch_size=16", "eval.batches=1", "eval.at_start=true"]


def share_of_e(prompts, completions, **fields):
    """The reward prefers one token: the share of the letter e in the completion (a random model's differ)."""
    return [c.count("e") / max(len(c), 1) for c in completions]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Prompts (And God said 0..15) and a base model: a micro model's initial parameters, saved at step 0."""
    root = tmp_path_factory.mktemp("bon")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"And God said {i}", "answer": "light"}) + "\n"
                               for i in range(16)))
    cfg = load_config(None, [*MICRO, f"run_dir={root / 'base'}", "data.objective.name=clm", "train.steps=1"])
    trainer = Trainer(cfg, devices=ONE)
    try:
        trainer.save()
        trainer.checkpointer.wait()
    finally:
        trainer.close()
    return root, prompts


def _args(root, prompts, name):
    return [*MICRO, *ROUNDS, f"run_dir={root / name}", f"train.init_from={root / 'base'}",
            f"data.sources=[{{path: {prompts}}}]", f"eval.sources=[{{path: {prompts}}}]"]


class Spy(Trainer):
    """Records each run's parameters when it starts and when it closes, by run_dir."""

    starts: ClassVar[dict] = {}
    ends: ClassVar[dict] = {}

    def __init__(self, cfg, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        Spy.starts[cfg.run_dir] = jax.device_get(self.state.params)

    def close(self):
        Spy.ends[self.cfg.run_dir] = jax.device_get(self.state.params)
        super().close()


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _final_params(run_dir):
    from jaxllm import sharding
    from jaxllm.config import MeshConfig

    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    return jax.device_get(open_pretrained(run_dir / "checkpoints" / "2").params(mesh, sharding.make_rules()))


@pytest.fixture(scope="module")
def finished(setup):
    """2 rounds, uninterrupted, with the trainers spied on."""
    root, prompts = setup
    run_best_of_n(load_config(None, _args(root, prompts, "bon")), functools.partial(Spy, devices=ONE), devices=ONE)
    return root / "bon"


def test_the_cli_runs_the_rounds_for_rl_algorithm_best_of_n(setup, monkeypatch):
    root, prompts = setup
    calls = []
    monkeypatch.setattr(best_of_n, "run_best_of_n", lambda cfg, make_trainer: calls.append((cfg, make_trainer)))
    assert main(["train", "configs/tiny.yaml", *_args(root, prompts, "cli")]) == 0
    (cfg, make_trainer), = calls
    assert cfg.rl.algorithm == "best_of_n" and cfg.run_dir == str(root / "cli") and make_trainer is Trainer
    assert not (root / "cli").exists()  # no Trainer of its own


def test_rounds_keep_each_prompts_best_and_start_from_the_round_before(finished):
    rows = {row["step"]: row for row in read_metrics(finished, filename="rounds.jsonl")}
    assert sorted(rows) == [0, 1, 2] and all(0 <= rows[r]["eval_reward"] <= 1 for r in rows)
    for r in (1, 2):
        samples = _lines(finished / f"round-{r}" / "samples.jsonl")
        kept = _lines(finished / f"round-{r}" / "data.jsonl")
        groups = defaultdict(list)
        for s in samples:
            groups[s["prompt_index"]].append(s)
        assert len(samples) == 16 and len(groups) == 4 and len(kept) == 4
        # the rounds rotate through the prompts: round 1 the first four, round 2 the next four
        assert [groups[p][0]["prompt"] for p in range(4)] == [f"And God said {4 * (r - 1) + p}" for p in range(4)]
        for s in samples:  # the scores are the reward function's of the text kept in the file
            np.testing.assert_allclose(s["reward"], share_of_e([s["prompt"]], [s["completion"]])[0], rtol=1e-6)
        best = []
        for p in range(4):
            rewards = [s["reward"] for s in groups[p]]
            first_max = int(np.argmax(rewards))
            assert [s["kept"] for s in groups[p]] == [j == first_max for j in range(4)]
            best.append(groups[p][first_max])
        assert len({s["reward"] for s in samples}) > 4  # the samples differ: the choice is not trivial
        assert [(k["prompt"], k["completion"], k["reward"]) for k in kept] == \
            [(b["prompt"], b["completion"], b["reward"]) for b in best]
        np.testing.assert_allclose(rows[r]["reward_kept"], np.mean([b["reward"] for b in best]), rtol=1e-6)
        np.testing.assert_allclose(rows[r]["reward"], np.mean([s["reward"] for s in samples]), rtol=1e-6)
        assert rows[r]["kept"] == 4 and rows[r]["prompts_kept"] == 4 and rows[r]["reward_kept"] >= rows[r]["reward"]
    one, two = str((finished / "round-1").absolute()), str((finished / "round-2").absolute())
    jax.tree.map(np.testing.assert_array_equal, Spy.starts[two], Spy.ends[one])  # round 2 from round 1's weights
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, Spy.starts[one], Spy.ends[one])))  # round 1 trained
    assert load_config(finished / "round-2" / "config.yaml").train.init_from == str(
        finished.absolute() / "round-1" / "checkpoints" / "2")


def test_a_finished_command_run_again_does_nothing(finished, setup, monkeypatch):
    root, prompts = setup
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}
    made = []
    monkeypatch.setattr(best_of_n, "load_policy", lambda *a, **k: made.append("model"))
    summary = run_best_of_n(load_config(None, _args(root, prompts, "bon")), lambda cfg: made.append(cfg))
    assert made == [] and summary == {"rounds": {}, "stopped_early": False}
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == before


def test_killed_between_rounds_resumes_to_the_uninterrupted_result(finished, setup):
    root, prompts = setup
    cfg = load_config(None, [*_args(root, prompts, "killed"), "eval.sources=[]"])  # rows 1, 2: no held-out reward
    made = []

    def dies_at_round_2(c):
        if c.run_dir.endswith("round-2"):
            raise KeyboardInterrupt  # killed after round 1, its row and round 2's samples
        made.append(c.run_dir)
        return Trainer(c, devices=ONE)

    with pytest.raises(KeyboardInterrupt):
        run_best_of_n(cfg, dies_at_round_2, devices=ONE)
    assert [row["step"] for row in read_metrics(root / "killed", filename="rounds.jsonl")] == [1]
    samples = root / "killed" / "round-2" / "samples.jsonl"
    written = samples.stat().st_mtime_ns
    summary = run_best_of_n(cfg, lambda c: made.append(c.run_dir) or Trainer(c, devices=ONE), devices=ONE)
    assert [m.rsplit("-", 1)[1] for m in made] == ["1", "2"] and list(summary["rounds"]) == [2]
    assert samples.stat().st_mtime_ns == written  # round 2's samples reused
    assert [row["step"] for row in read_metrics(root / "killed", filename="rounds.jsonl")] == [1, 2]
    assert (root / "killed" / "round-2" / "data.jsonl").read_text() == (finished / "round-2" / "data.jsonl").read_text()
    jax.tree.map(np.testing.assert_array_equal, _final_params(root / "killed" / "round-2"),
                 _final_params(finished / "round-2"))


def test_select_keeps_the_best_or_all_above_the_threshold():
    rewards = np.array([0.2, 0.9, 0.9, 0.1,   np.nan, np.nan, np.nan, np.nan,   0.3, 0.1, 0.2, 0.0])
    assert select(rewards, 4) == [1, 8]  # ties: the first; a prompt nothing scored keeps none
    assert select(rewards, 4, min_reward=0.5) == [1]
    assert select(rewards, 4, candidates=np.arange(12) != 1) == [2, 8]
    texts = ["a", "b", "b", "c", "", "", "", "", "d", "e", "f", "g"]
    assert select(rewards, 4, keep="threshold", threshold=0.2, texts=texts) == [0, 1, 8, 10]  # the same text once
    assert select(rewards, 4, keep="threshold", threshold=0.2, min_reward=0.5) == [0, 1, 2]


@pytest.mark.parametrize("extra, message", [
    (["data.objective.name=clm"], "rl.algorithm=best_of_n fine-tunes on its best samples with the sft objective"),
    (["train.init_from=null"], "rl.algorithm=best_of_n samples from a trained model; set train.init_from"),
    (["rl.best_of_n.keep=threshold"], "rl.best_of_n.keep=threshold keeps the completions whose reward is >="),
    (["rl.best_of_n.sample_batch_size=6"], "rl.best_of_n.sample_batch_size (null: train.batch_size) = 6 must be a"),
    (["rl.best_of_n.rounds=0"], "rl.best_of_n.rounds must be >= 1, got 0"),
    (["rl.algorithm=grpo"], "rl.algorithm=grpo trains with data.objective.name=grpo, but it is sft"),
], ids=["objective", "init_from", "threshold", "sample_batch", "rounds", "algorithm"])
def test_bad_configs_are_one_line_errors(extra, message):
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        load_config(None, [*MICRO, *ROUNDS, "train.init_from=runs/x", *extra])


def test_a_round_that_keeps_nothing_is_an_error(setup):
    root, prompts = setup
    cfg = load_config(None, [*_args(root, prompts, "nothing"), "eval.sources=[]", "rl.best_of_n.min_reward=2"])
    with pytest.raises(JaxllmError, match="^best-of-n round 1 kept no completion of its 16 samples"):
        run_best_of_n(cfg, Trainer, devices=ONE)
    assert not (root / "nothing" / "round-1").exists()
